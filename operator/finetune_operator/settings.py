"""What the operator is told on its command line, and how kopf is configured from it."""

from __future__ import annotations

import copy
import json
import os
import types
from dataclasses import dataclass, field

import kopf
from kopf._cogs.structs import dicts

from finetune_operator.labels import APP, MANAGED_BY
from finetune_operator.serving.deployment import DEFAULT_IMAGE

GROUP = "finetune.dev"
FINALIZER = f"{GROUP}/finalizer"
DEFAULT_TRAINER_IMAGE = "ghcr.io/finetune-dev/finetune-trainer:0.1.0"
DEFAULT_VLLM_IMAGE = DEFAULT_IMAGE


@dataclass
class OperatorConfig:
    namespaces: list[str] = field(default_factory=list)  # empty: all namespaces
    metrics_port: int = 8080
    liveness_port: int = 8081
    log_level: str = "INFO"
    gpu_hour_price: float = 0.0
    trainer_image: str = DEFAULT_TRAINER_IMAGE
    vllm_image: str = DEFAULT_VLLM_IMAGE
    # How often each FineTuneJob's status is re-derived even without events (gpuHours grow).
    resync_seconds: float = 10.0
    # A Secret or claim the spec names does not exist yet: check again after this many seconds.
    admission_retry_seconds: float = 10.0
    # A GPU request larger than every current node: "wait" (create the Job; autoscalers and
    # Kueue add nodes for pending pods) or "fail" (clusters that cannot grow).
    capacity_policy: str = "wait"
    # Where the leader-election Lease lives by default (the chart sets POD_NAMESPACE).
    leader_election_namespace: str = ""
    # Threads running the (synchronous) handlers. Handlers mostly wait for the API server, so
    # many jobs arriving at once need many more than the CPUs.
    workers: int = 32

    @classmethod
    def from_env(cls) -> "OperatorConfig":
        """Defaults overridable by environment (a Deployment can set them without flags)."""
        return cls(
            trainer_image=os.environ.get("FINETUNE_TRAINER_IMAGE", DEFAULT_TRAINER_IMAGE),
            vllm_image=os.environ.get("FINETUNE_VLLM_IMAGE", DEFAULT_VLLM_IMAGE),
            gpu_hour_price=float(os.environ.get("FINETUNE_GPU_HOUR_PRICE", "0") or 0),
            resync_seconds=float(os.environ.get("FINETUNE_RESYNC_SECONDS", "10") or 10),
            leader_election_namespace=os.environ.get("POD_NAMESPACE", ""),
        )


# The running operator's configuration; cli.main replaces it before kopf starts.
current = OperatorConfig.from_env()


# Kinds the operator watches with no change handler (only indexes and event handlers): kopf
# needs no diff base for them. Adding a create/update/resume/delete handler for one of these
# kinds means taking it out of here (test_operator_structure checks the registry).
UNDIFFED_KINDS = frozenset({"Job", "Pod", "Deployment", "PersistentVolumeClaim", "InferenceService"})


class MemoryDiffBaseStorage(kopf.DiffBaseStorage):
    """kopf's "last handled" copy of each object's spec, kept in memory instead of in an
    annotation written onto the object after every handled change (one more request and one
    more watch event per FineTuneJob, for each of N jobs).

    The handlers do not need it: they are level-triggered (the same function handles create,
    resume and update, and derives everything from what is in the cluster). So after a restart
    or a failover, when this is empty, kopf sees each object as new and runs that function once
    for it, which is what `on.resume` did. kopf only uses it to tell a spec change from any
    other event. Objects gone are dropped by `forget_except`."""

    def __init__(self) -> None:
        super().__init__()
        self._essences: dict[str, object] = {}

    def build(self, *, body, extra_fields=None):  # type: ignore[no-untyped-def]
        """The spec (and any other top-level field but status), labels and annotations, less
        the operator's own (`finetune.dev/...`) and kubectl's last-applied copy. kopf's own
        build deep-copies the whole object, status and managedFields included, then drops
        most of it: for every watch event of every FineTuneJob, a seventh of the operator's
        busy time at N=300.

        None for the kinds that no change handler watches (UNDIFFED_KINDS): kopf builds an
        essence for every watch event of every resource it watches, though only change handlers
        (create, update, resume, delete) ever compare one; a Job's or pod's spec (its pod
        template) deep-copied for every event of every trainer Job and pod was wasted work."""
        if body.get("kind") in UNDIFFED_KINDS:
            return None
        essence = {k: copy.deepcopy(v) for k, v in body.items()
                   if k not in ("apiVersion", "kind", "metadata", "status")}
        meta = body.get("metadata") or {}
        kept: dict = {}
        if meta.get("labels"):
            kept["labels"] = dict(meta["labels"])
        annotations = {k: v for k, v in (meta.get("annotations") or {}).items()
                       if not k.startswith((f"{GROUP}/", "kopf.zalando.org/"))
                       and k != "kubectl.kubernetes.io/last-applied-configuration"}
        if annotations:
            kept["annotations"] = annotations
        if kept:
            essence["metadata"] = kept
        if extra_fields:
            dicts.cherrypick(src=body, dst=essence, fields=extra_fields, picker=copy.deepcopy)
        return essence

    def fetch(self, *, body):  # type: ignore[no-untyped-def]
        return self._essences.get(body.get("metadata", {}).get("uid"))

    def store(self, *, body, patch, essence):  # type: ignore[no-untyped-def]
        uid = body.get("metadata", {}).get("uid")
        if uid:
            self._essences[uid] = essence

    def forget_except(self, uids: set[str]) -> None:
        for uid in [u for u in list(self._essences) if u not in uids]:
            self._essences.pop(uid, None)


class MemoryProgressStorage(kopf.AnnotationsProgressStorage):
    """kopf's per-handler progress (started, retries, delayed until), kept in memory. In
    annotations, kopf wrote it and a "kopf-managed" marker onto every FineTuneJob the first
    time a handler ran, even when it succeeded at once: one more request per job. After a
    restart the handler runs again from its first attempt, which a level-triggered handler
    takes in its stride. Only `touch` (the dummy annotation that wakes kopf up for a delayed
    retry) still writes to the object, and only when a handler waits to be retried."""

    def __init__(self) -> None:
        super().__init__(prefix=GROUP)
        self._records: dict[tuple[str, str], dict] = {}

    @staticmethod
    def _uid(body) -> str:  # type: ignore[no-untyped-def]
        return body.get("metadata", {}).get("uid") or ""

    def fetch(self, *, key, body):  # type: ignore[no-untyped-def]
        record = self._records.get((self._uid(body), key))
        return dict(record) if record is not None else None

    def store(self, *, key, record, body, patch):  # type: ignore[no-untyped-def]
        # Like the API server does with a patch's nulls: a field set to None is gone.
        self._records[(self._uid(body), key)] = {k: v for k, v in dict(record).items() if v is not None}

    def purge(self, *, key, body, patch):  # type: ignore[no-untyped-def]
        self._records.pop((self._uid(body), key), None)

    def clear(self, *, essence):  # type: ignore[no-untyped-def]
        """kopf's clear deep-copies the essence, then drops this storage's annotations from it.
        The diff base's essences (MemoryDiffBaseStorage.build) carry none of them and are
        never changed after they are built, so there is nothing to copy or drop: the copy was
        5% of the operator's busy samples at N=1000 (#14, session 10)."""
        return essence

    def forget_except(self, uids: set[str]) -> None:
        for found in [k for k in list(self._records) if k[0] not in uids]:
            self._records.pop(found, None)


diffbase = MemoryDiffBaseStorage()
progress = MemoryProgressStorage()


def _loads(text, *args, **kwargs):  # type: ignore[no-untyped-def]
    """json.loads through msgspec's decoder (about twice as fast on Kubernetes objects); the
    standard library's for anything it refuses, so invalid input raises json's own error."""
    import msgspec

    if args or kwargs:
        return json.loads(text, *args, **kwargs)
    try:
        return msgspec.json.decode(text)
    except msgspec.DecodeError:
        return json.loads(text)


def decode_watch_events_fast() -> bool:
    """kopf parses every line of every watch stream with the standard library's json.loads: a
    quarter of the operator's busy CPU at N=1000 (#14, session 10: 1000 FineTuneJobs bring
    about 30 watch events each, the Jobs' and pods' with their whole pod template). Its
    stream reader (kopf._cogs.clients.api) is given a `json` whose `loads` is msgspec's.
    False, and nothing changed, when msgspec is missing or kopf reads its streams otherwise."""
    try:
        import msgspec  # noqa: F401
        from kopf._cogs.clients import api as kopf_api
    except ImportError:
        return False
    current = getattr(kopf_api, "json", None)
    if getattr(current, "loads", None) is _loads:
        return True
    if current is not json:
        return False
    shim = types.ModuleType("json")
    shim.__dict__.update(json.__dict__)
    shim.loads = _loads
    kopf_api.json = shim
    return True


def configure_kopf(settings: kopf.OperatorSettings) -> None:
    decode_watch_events_fast()
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = progress
    settings.persistence.diffbase_storage = diffbase
    # After its own patch, kopf waits this long for the watch to bring that version before it
    # handles the object again. Past it, kopf handles an older copy without the annotations
    # above and runs the creation handlers again: with the default 5 s that happened two or
    # three times per job when 300 arrived at once on a loaded API server.
    settings.persistence.consistency_timeout = 30.0
    # Watches end on the server's side after server_timeout and are abandoned by the client
    # after client_timeout, so a restarted API server is noticed within a minute.
    settings.watching.server_timeout = 60
    settings.watching.client_timeout = 90
    settings.watching.connect_timeout = 10
    settings.watching.reconnect_backoff = 1.0
    settings.networking.request_timeout = 30
    # kopf's own log lines become Events only from WARNING up (a handler that failed or
    # waits); its INFO lines ("Handler ... succeeded", "Creation is processed") were two or
    # three Events per job that told the user nothing. The operator's own Normal events are
    # posted with kopf.event(type="Normal"), which this level does not filter.
    settings.posting.level = 30
    settings.execution.max_workers = current.workers
    # A FineTuneJob deleted while its resync timer runs in a worker thread keeps kopf's
    # finalizer until kopf looks again at the exiting timer: every 60 s by default, so
    # `kubectl delete ftj` hung for a minute now and then (the lifecycle suite's deletion test
    # flaked on it). Look again every second instead.
    settings.background.cancellation_polling = 1.0
    # kopf's own peering is off: with several replicas, only the holder of the leader Lease
    # runs kopf at all (leader.py, --leader-elect); a standby makes no request but the Lease's.
    settings.peering.standalone = True
    # Watch only the operator's own pods, Jobs and Deployments: the server filters by label,
    # so other workloads' churn never reaches the operator (nor its caches).
    for resource in (("v1", "pods"), ("batch", "jobs"), ("apps", "deployments")):
        settings.watching.label_selectors[resource] = f"{MANAGED_BY}={APP}"
