"""The InferenceService controller's kopf routes: decorators only, each delegating to
`serving.handlers`. `finetune_operator.main` imports this module; on its own
(`kopf run -m finetune_operator.serving.routes`) it runs the serving controller alone.
"""

from __future__ import annotations

import kopf

from finetune_api.schema import GROUP, VERSION

from finetune_operator.labels import APP, MANAGED_BY
from finetune_operator.serving import handlers
from finetune_operator.serving.common import INFERENCESERVICE_LABEL

CHILD_SELECTOR = {MANAGED_BY: APP, INFERENCESERVICE_LABEL: kopf.PRESENT}


@kopf.on.event(GROUP, VERSION, handlers.PLURAL)
def inferenceservice_event(type: str, body: dict, namespace: str, name: str, **_) -> None:
    handlers.on_inferenceservice_event(type, body, namespace, name)


@kopf.on.event("apps", "v1", "deployments", labels=CHILD_SELECTOR)
@kopf.on.event("v1", "pods", labels=CHILD_SELECTOR)
def child_event(body: dict, namespace: str, **_) -> None:
    handlers.on_child_event(body, namespace)


@kopf.on.event(GROUP, VERSION, "finetunejobs")
def finetunejob_event(type: str, namespace: str, name: str, **_) -> None:
    handlers.on_finetunejob_event(namespace, name)
