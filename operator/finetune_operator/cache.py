"""Watch-fed caches of what a status refresh reads: FineTuneJobs, their Jobs (trainer and
comparison) and their trainer pods; and which claims exist, for admission. A refresh then
makes no request to read state; it writes only what changed.

The caches are kopf indexes (`main.py` registers the functions below). kopf feeds them from
the watches it runs anyway, and holds every other handler back until each indexed resource's
initial list is in, so a refresh never sees a half-filled cache after a restart (it would
take a running job for one without a Job).

Our own writes show at once: a status patch's response goes into `remember`, and a read
returns whichever of it and the watched copy is newer. A copy that is stale all the same (a
user's write still on its way) cannot clobber anything: status patches carry the
resourceVersion they were computed from (`kube.patch_status`), and a conflict reads the
object again.

Without a bound index (unit tests, the serving controller alone) every read falls back to
the API, as before.
"""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, Optional

from finetune_operator import kube
from finetune_operator.labels import FINETUNEJOB, label_value

# Batch's own label on a Job's pods: the Job's uid.
CONTROLLER_UID = "batch.kubernetes.io/controller-uid"
Key = tuple[str, str]

_indexes: dict[str, Any] = {}
# Our own latest writes, by (kind, namespace, name), until the watch catches up: FineTuneJob
# status and metadata patches, Jobs just created.
_written: dict[tuple[str, str, str], dict] = {}
_written_at: dict[tuple[str, str, str], float] = {}  # when each was remembered (monotonic)
# A write the watch has not brought after this long was of an object deleted since.
UNSEEN_WRITE_SECONDS = 60.0
_written_guard = threading.Lock()
# The resourceVersions of our latest FineTuneJob writes, by (namespace, name): a watch event
# of one of them is the operator's own doing (`own_write`), not news to refresh on.
_own_versions: dict[Key, list[str]] = {}
OWN_VERSIONS_KEPT = 8


def trim(body: Any) -> dict:
    """A plain, detached copy without managedFields (about half of a pod's bytes, never read)."""
    out = {k: copy.deepcopy(v) for k, v in dict(body).items() if k != "metadata"}
    out["metadata"] = _meta(body)
    return out


def _meta(body: Any) -> dict:
    return {k: copy.deepcopy(v) for k, v in dict(body.get("metadata") or {}).items() if k != "managedFields"}


def _containers(spec: Any, keep: tuple[str, ...]) -> list[dict]:
    return [{k: copy.deepcopy(c[k]) for k in keep if k in c} for c in (spec or {}).get("containers") or []]


def trim_job(body: Any) -> dict:
    """What a refresh reads of a Job: metadata, status, spec.suspend and its containers' images.
    A Job's pod template (env, volumes, probes, the trainer's arguments) is most of its bytes,
    and the cache holds two Jobs per FineTuneJob."""
    spec = body.get("spec") or {}
    template = (spec.get("template") or {}).get("spec") or {}
    return {"apiVersion": body.get("apiVersion"), "kind": body.get("kind") or "Job",
            "metadata": _meta(body), "status": copy.deepcopy(dict(body.get("status") or {})),
            "spec": {"suspend": spec.get("suspend"),
                     "template": {"spec": {"containers": _containers(template, ("name", "image"))}}}}


def trim_pod(body: Any) -> dict:
    """What a refresh reads of a trainer pod: metadata, status, the node and its containers'
    names, images and resources (GPUs counted from the limits)."""
    spec = body.get("spec") or {}
    return {"apiVersion": body.get("apiVersion"), "kind": body.get("kind") or "Pod",
            "metadata": _meta(body), "status": copy.deepcopy(dict(body.get("status") or {})),
            "spec": {"nodeName": spec.get("nodeName"),
                     "containers": _containers(spec, ("name", "image", "resources"))}}


# --- index functions (kopf calls them on every watch event of their resource) ---------------


def index_finetunejob(namespace: str, name: str, body: Any, **_: Any) -> dict:
    return {(namespace, name): trim(body)}


def index_job(namespace: str, name: str, body: Any, **_: Any) -> dict:
    return {(namespace, name): trim_job(body)}


def index_trainer_pod(namespace: str, labels: Any, body: Any, **_: Any) -> dict:
    uid = (labels or {}).get(CONTROLLER_UID)
    return {(namespace, uid): trim_pod(body)} if uid else {}


def index_claim(namespace: str, name: str, **_: Any) -> dict:
    """Only that the claim exists: admission's check of `storage.existingClaim` and `pvc://`
    sources. Many jobs name one claim; a GET of it for every new job was one request in 19."""
    return {(namespace, name): True}


def bind(**indexes: Any) -> None:
    """Called from the handlers with kopf's index objects (the same ones every time)."""
    for name, index in indexes.items():
        if index is not None and _indexes.get(name) is not index:
            _indexes[name] = index


def bound(name: str) -> bool:
    return name in _indexes


def reset() -> None:
    """Forget the bound indexes and our writes (tests; an operator that stopped leading)."""
    _indexes.clear()
    with _written_guard:
        _written.clear()
        _written_at.clear()
        _own_versions.clear()


def _values(index_name: str, key: Key) -> Optional[list[dict]]:
    """The index's values at `key` ([] when none), or None when the index is not bound."""
    index = _indexes.get(index_name)
    if index is None:
        return None
    for _ in range(5):  # the event loop may change the store while this thread copies it
        try:
            store = index.get(key)
            return list(store) if store is not None else []
        except RuntimeError:
            continue
    return list(index.get(key) or [])


def _rv(obj: Optional[dict]) -> int:
    try:
        return int(((obj or {}).get("metadata") or {}).get("resourceVersion") or 0)
    except ValueError:  # resourceVersions are opaque; etcd's are integers
        return 0


# --- reads -----------------------------------------------------------------------------------


def _newest(kind: str, namespace: str, name: str, watched: Optional[dict]) -> Optional[dict]:
    """The newer of the watched copy and our own last write of it (dropped once the watch has
    caught up); a write of an object of another uid (deleted, re-created) never counts."""
    key = (kind, namespace, name)
    with _written_guard:
        mine = _written.get(key)
        if mine is not None and watched is not None and _rv(watched) >= _rv(mine):
            del _written[key]
            mine = None
        if mine is not None and watched is None and \
                time.monotonic() - _written_at.get(key, 0.0) > UNSEEN_WRITE_SECONDS:
            # The watch never brought it: it was deleted before we looked (its DELETED event
            # normally drops it, see `deleted`). Taking it for present would wait for a Job
            # that is gone; taking it for absent at worst creates it again, which answers 409.
            del _written[key]
            mine = None
    if mine is None:
        return watched
    if watched is None or mine["metadata"].get("uid") == watched["metadata"].get("uid"):
        return mine
    return watched


def finetunejob(namespace: str, name: str, read: Callable[[], Optional[dict]]) -> Optional[dict]:
    """The FineTuneJob: the newer of the watched copy and our last write; `read()` (a GET)
    when the watch has not got it (gone, or created a moment ago and not yet seen)."""
    found = _values("finetunejobs", (namespace, name))
    if not found:
        return read()
    return _newest("FineTuneJob", namespace, name, found[0])


def remember(obj: Optional[dict]) -> None:
    """Our own write's response (a FineTuneJob patched, a Job created): newer than the watch
    until the watch delivers it."""
    if not obj:
        return
    meta = obj.get("metadata") or {}
    key = (obj.get("kind") or "", meta.get("namespace"), meta.get("name"))
    with _written_guard:
        if key[0] == "FineTuneJob" and meta.get("resourceVersion"):
            versions = _own_versions.setdefault(key[1:], [])
            versions.append(meta["resourceVersion"])
            del versions[:-OWN_VERSIONS_KEPT]
        current = _written.get(key)
        if current is None or _rv(obj) >= _rv(current):
            _written[key] = trim_job(obj) if key[0] == "Job" else trim(obj)
            _written_at[key] = time.monotonic()


def own_write(body: Any) -> bool:
    """Whether this version of a FineTuneJob is one the operator wrote (see `remember`)."""
    meta = body.get("metadata") or {}
    with _written_guard:
        return meta.get("resourceVersion") in _own_versions.get((meta.get("namespace"), meta.get("name")), ())


def deleted(kind: str, namespace: str, name: str, uid: Optional[str]) -> None:
    """The watch says this object is gone: our write of it (of that uid) no longer counts.
    Without this, a Job deleted before the watch's copy ever replaced our write (a job
    deleted and created again under its name at once) read as present for good."""
    key = (kind, namespace, name)
    with _written_guard:
        mine = _written.get(key)
        if mine is not None and (uid is None or (mine.get("metadata") or {}).get("uid") == uid):
            del _written[key]


def all_finetunejobs() -> list[dict]:
    """Every watched FineTuneJob (a snapshot); [] when the index is not bound."""
    index = _indexes.get("finetunejobs")
    if index is None:
        return []
    for _ in range(5):  # the event loop may change the index while this thread copies it
        try:
            return [values[0] for values in (list(store) for store in list(index.values())) if values]
        except RuntimeError:
            continue
    return []


def forget(namespace: str, name: str) -> None:
    """The job is gone: drop our writes of it and of its Jobs."""
    with _written_guard:
        _own_versions.pop((namespace, name), None)
        for key in list(_written):
            labels = _written[key]["metadata"].get("labels") or {}
            if key == ("FineTuneJob", namespace, name) or (
                    key[:2] == ("Job", namespace) and labels.get(FINETUNEJOB) == label_value(name)):
                del _written[key]


def job(namespace: str, name: str, read: Callable[[], Optional[dict]]) -> Optional[dict]:
    """A Job of the operator's (label managed-by), or one it has just created; `read()` when
    the index is not bound."""
    found = _values("jobs", (namespace, name))
    if found is None:
        return read()
    return _newest("Job", namespace, name, found[0] if found else None)


def claim_exists(namespace: str, name: str, read: Callable[[], bool]) -> bool:
    """Whether the claim exists: seen by the watch, or else `read()` (a GET): a claim created a
    moment ago may not have reached the watch yet, and a missing one costs a request only while
    the job waits for it (admission retries)."""
    found = _values("claims", (namespace, name))
    return bool(found) or read()


def trainer_pods(namespace: str, job_uid: str,
                 list_pods: Callable[[], Iterable[dict]]) -> list[dict]:
    found = _values("trainer_pods", (namespace, job_uid))
    if found is None:
        return list(list_pods())
    return found
