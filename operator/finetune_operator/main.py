"""The operator's routing table: kopf decorators only, each delegating to a handler module
(`handlers/finetunejob.py`; the InferenceService routes are in `serving/routes.py`, imported
here). Importing this module registers every handler.

Run it with `finetune-operator` (see cli.py) or `kopf run -m finetune_operator.main`.
No ML library is imported here or below.
"""

from __future__ import annotations

import contextvars
import logging
import threading

import kopf

from finetune_api.schema import GROUP, VERSION

from finetune_operator import cache, kube, resync, review_http, settings
from finetune_operator.builders.trainer_job import COMPONENT as TRAINER
from finetune_operator.handlers import finetunejob
from finetune_operator.labels import APP, COMPONENT, MANAGED_BY

try:  # the InferenceService controller registers its own routes when present
    from finetune_operator.serving import routes as serving_routes  # noqa: F401
except ImportError:
    serving_routes = None
else:
    # An InferenceService status write refreshes the FineTuneJobs in Deploying that it serves at
    # once: Deploying -> Succeeded follows the server's Ready, not the next resync (#14).
    serving_routes.handlers.refresh_finetunejob = finetunejob.refresh_status

log = logging.getLogger("finetune_operator")
FINETUNEJOBS = finetunejob.PLURAL


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_) -> None:
    from finetune_operator.settings import configure_kopf, current

    configure_kopf(settings)
    kube.api()  # fail at startup, not in the first handler, when there are no credentials
    review_http.serve(current.metrics_port)  # /metrics and the review pages
    log.info("finetune-operator started: trainer image %s, vLLM image %s, metrics port %s, "
             "GPU-hour price %s", current.trainer_image, current.vllm_image,
             current.metrics_port or "off", current.gpu_hour_price)


@kopf.on.probe(id="loop")
async def event_loop_alive(**_) -> bool:
    """The liveness probe checks only that the event loop runs (this coroutine runs on it). It
    makes no API call and needs no executor thread: busy handler threads, or an API server that
    is away for a while, must not get the operator restarted (restarting helps neither)."""
    return True


# --- caches: kopf indexes fed by the watches (cache.py). kopf starts no other handler before
# each of these has its initial list, so a refresh never reads a half-filled cache.


# These, and the Job and pod event handlers below, are coroutines: they only copy or mark, and
# run on kopf's event loop. As plain functions kopf ran each in its executor, two thread
# hand-offs per watch event next to 32 handler threads contending for the GIL.


@kopf.index(GROUP, VERSION, FINETUNEJOBS)
async def finetunejobs_cache(body: dict, **kwargs) -> dict:
    # A write the operator did not make (the trainer's progress, an approval) refreshes the job.
    finetunejob.on_finetunejob_event(body, _resync.soon)
    return cache.index_finetunejob(body=body, **kwargs)


@kopf.index("batch", "v1", "jobs", labels={MANAGED_BY: APP})
async def jobs_cache(**kwargs) -> dict:
    return cache.index_job(**kwargs)


@kopf.index("v1", "pods", labels={MANAGED_BY: APP, COMPONENT: TRAINER})
async def trainer_pods_cache(**kwargs) -> dict:
    return cache.index_trainer_pod(**kwargs)


# Only which claims exist, for admission (many jobs name one claim: no GET per job).
@kopf.index("v1", "persistentvolumeclaims")
async def claims_cache(**kwargs) -> dict:
    return cache.index_claim(**kwargs)


# One resync loop for every job (resync.py), not a kopf timer per job.
_resync = resync.Resync(settings.current.resync_seconds, finetunejob.due_for_resync,
                        finetunejob.refresh_status, prune=finetunejob.forget_gone)
_resync_guard = threading.Lock()


def _bind(kwargs: dict) -> None:
    cache.bind(finetunejobs=kwargs.get("finetunejobs_cache"), jobs=kwargs.get("jobs_cache"),
               trainer_pods=kwargs.get("trainer_pods_cache"), claims=kwargs.get("claims_cache"))
    if not _resync.started:
        with _resync_guard:
            if not _resync.started:
                # Started from the first handler, whose context lets the loop post kopf events.
                _resync.start(contextvars.copy_context())


@kopf.on.cleanup()
def stop_resync(**_) -> None:
    _resync.stop()


@kopf.on.create(GROUP, VERSION, FINETUNEJOBS)
@kopf.on.resume(GROUP, VERSION, FINETUNEJOBS)
@kopf.on.update(GROUP, VERSION, FINETUNEJOBS, field="spec")
def finetunejob_spec(namespace: str, name: str, **kwargs) -> None:
    _bind(kwargs)
    finetunejob.ensure_children(namespace, name)


@kopf.on.delete(GROUP, VERSION, FINETUNEJOBS, when=finetunejob.holds_finalizer)
def finetunejob_deleted(namespace: str, name: str, body: dict, **_) -> None:
    finetunejob.release(namespace, name, body)


@kopf.on.event("batch", "v1", "jobs", labels={MANAGED_BY: APP})
async def trainer_job_event(body: dict, type: str, **kwargs) -> None:
    _bind(kwargs)
    finetunejob.on_trainer_job_event(body, _resync.soon, deleted=type == "DELETED")


@kopf.on.event("v1", "pods", labels={MANAGED_BY: APP, COMPONENT: TRAINER})
async def trainer_pod_event(body: dict, **kwargs) -> None:
    _bind(kwargs)
    finetunejob.on_trainer_pod_event(body, _resync.soon)


__all__ = ["settings"]
