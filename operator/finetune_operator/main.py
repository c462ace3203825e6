"""The operator's kopf registry: importing this module registers every handler.

Run it with `finetune-operator` (see cli.py) or `kopf run -m finetune_operator.main`.
No ML library is imported here or below.
"""

from __future__ import annotations

import logging

import kopf

from finetune_operator import metrics, settings
from finetune_operator.handlers import api, finetunejob  # noqa: F401 - registers the handlers

try:  # the InferenceService controller registers its own handlers when present
    from finetune_operator.handlers import inferenceservice  # noqa: F401
except ImportError:
    inferenceservice = None

log = logging.getLogger("finetune_operator")


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_) -> None:
    from finetune_operator.settings import configure_kopf, current

    configure_kopf(settings)
    api()  # fail at startup, not in the first handler, when there are no credentials
    metrics.serve(current.metrics_port)
    log.info("finetune-operator started: trainer image %s, metrics port %s, GPU-hour price %s",
             current.trainer_image, current.metrics_port or "off", current.gpu_hour_price)


@kopf.on.probe(id="api")
def api_reachable(**_) -> bool:
    from kubernetes import client

    client.VersionApi(api()).get_code()
    return True


__all__ = ["settings"]
