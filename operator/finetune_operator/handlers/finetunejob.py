"""FineTuneJob handlers: create the children, follow the trainer Job, write status.

Every step is idempotent and derived from what is in the cluster, so an operator killed
at any moment and started again carries on: child names are deterministic (409 on create
means "already done"), the phase is re-derived from the Job and its pods, and transitions
are detected against the phase stored in status.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import threading
import time
from contextlib import contextmanager

import kopf
from kubernetes import client
from kubernetes.client.rest import ApiException

from finetune_api.models import FineTuneJob
from finetune_api.schema import GROUP, VERSION

from finetune_operator import admission, metrics, names, settings
from finetune_operator.builders import identity, storage, trainer_config, trainer_job
from finetune_operator.conditions import ADMITTED, FAILED, FALSE, TRUE, ConditionUpdate, now_iso, set_conditions
from finetune_operator.handlers import api
from finetune_operator.labels import APP, COMPONENT, FINETUNEJOB, MANAGED_BY
from finetune_operator.status import (
    GPU_SECONDS_ANNOTATION, PHASES, Observation, Phase, derive, parse_time, status_patch,
)

PLURAL = "finetunejobs"
# A merge patch replaces lists (ownerReferences) where a strategic one would merge them.
MERGE_PATCH = "application/merge-patch+json"
log = logging.getLogger("finetune_operator.finetunejob")

# One reconciliation at a time per FineTuneJob (spec handler, timer and watch events all
# write status; they must not interleave their read-modify-write of the conditions list).
_locks: dict[tuple[str, str], threading.Lock] = {}
_locks_guard = threading.Lock()
_phases: dict[tuple[str, str], str] = {}  # for the finetune_operator_jobs gauge


@contextmanager
def _locked(namespace: str, name: str):
    with _locks_guard:
        lock = _locks.setdefault((namespace, name), threading.Lock())
    with lock:
        yield


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _custom() -> client.CustomObjectsApi:
    return client.CustomObjectsApi(api())


def _core() -> client.CoreV1Api:
    return client.CoreV1Api(api())


def _batch() -> client.BatchV1Api:
    return client.BatchV1Api(api())


def _as_dict(obj) -> dict:
    return api().sanitize_for_serialization(obj)


# --- applying children ------------------------------------------------------------------------


def _create(kind: str, body: dict, create, read=None) -> dict | None:
    """Create `body`; on 409 return the existing object (read) or None."""
    try:
        return _as_dict(create(body["metadata"]["namespace"], body))
    except ApiException as e:
        if e.status != 409:
            raise
        return _as_dict(read(body["metadata"]["name"], body["metadata"]["namespace"])) if read else None


def _ensure_claim(job: FineTuneJob) -> None:
    body = storage.build_workspace_claim(job)
    if body is None:
        return
    core = _core()
    current = _create("PersistentVolumeClaim", body, core.create_namespaced_persistent_volume_claim,
                      core.read_namespaced_persistent_volume_claim)
    refs = (current.get("metadata") or {}).get("ownerReferences") or []
    desired = storage.desired_owner_references(job, refs)
    if refs != desired:
        core.patch_namespaced_persistent_volume_claim(
            body["metadata"]["name"], job.metadata.namespace,
            {"metadata": {"ownerReferences": desired or None}}, _content_type=MERGE_PATCH)


def _ensure_identity(job: FineTuneJob) -> None:
    core, rbac = _core(), client.RbacAuthorizationV1Api(api())
    _create("ServiceAccount", identity.build_service_account(job), core.create_namespaced_service_account)
    role = identity.build_role(job)
    if _create("Role", role, rbac.create_namespaced_role, rbac.read_namespaced_role)["rules"] != role["rules"]:
        rbac.patch_namespaced_role(role["metadata"]["name"], job.metadata.namespace, {"rules": role["rules"]})
    _create("RoleBinding", identity.build_role_binding(job), rbac.create_namespaced_role_binding)


def _ensure_config(job: FineTuneJob) -> None:
    body = trainer_config.build_config_map(job)
    core = _core()
    current = _create("ConfigMap", body, core.create_namespaced_config_map, core.read_namespaced_config_map)
    if current.get("data") != body["data"] and not job.started:
        core.patch_namespaced_config_map(body["metadata"]["name"], job.metadata.namespace,
                                         {"data": body["data"]})


def _ensure_service(job: FineTuneJob) -> None:
    body = trainer_job.build_headless_service(job)
    if body is not None:
        _create("Service", body, _core().create_namespaced_service)


def _read_trainer_job(job: FineTuneJob) -> dict | None:
    try:
        obj = _as_dict(_batch().read_namespaced_job(names.trainer_job(job.metadata.name),
                                                    job.metadata.namespace))
    except ApiException as e:
        if e.status == 404:
            return None
        raise
    owners = [r.get("uid") for r in (obj["metadata"].get("ownerReferences") or [])]
    if job.metadata.uid not in owners:
        raise kopf.TemporaryError(f"Job {obj['metadata']['name']} exists but belongs to another "
                                  "object; delete it or rename this FineTuneJob", delay=30)
    return obj


def _ensure_trainer_job(job: FineTuneJob, body: dict) -> None:
    """Create the Job (once), then make its suspend follow spec.suspend."""
    batch = _batch()
    queued = bool(job.spec.resources.queue_name)
    current = _read_trainer_job(job)
    if current is not None and current["metadata"].get("deletionTimestamp"):
        if job.spec.suspend:
            return
        raise kopf.TemporaryError("the previous trainer Job is still being deleted", delay=3)
    if current is None:
        if job.spec.suspend and (queued or job.status.trainer_job):
            return  # suspended before (re)creation; the Job is created on resume
        manifest = trainer_job.build_trainer_job(job, settings.current.trainer_image)
        current = _create("Job", manifest, batch.create_namespaced_job, batch.read_namespaced_job)
        kopf.info(body, reason="TrainerJobCreated", message=f"created trainer Job {manifest['metadata']['name']}")
    if not job.status.start_time or job.status.trainer_job != current["metadata"]["name"]:
        _patch_status(job, {"startTime": job.status.start_time or current["metadata"]["creationTimestamp"],
                            "trainerJob": current["metadata"]["name"]})
    wants = job.spec.suspend
    if queued:
        # Kueue owns the Job's suspend; suspending a queued job deletes its Job instead
        # (pods get SIGTERM and checkpoint), and resuming creates it again, suspended, for Kueue.
        if wants:
            batch.delete_namespaced_job(current["metadata"]["name"], job.metadata.namespace,
                                        propagation_policy="Background")
            kopf.info(body, reason="Suspending", message="deleted the trainer Job; checkpoints are kept")
        return
    if bool(current["spec"].get("suspend")) != wants:
        batch.patch_namespaced_job(current["metadata"]["name"], job.metadata.namespace,
                                   {"spec": {"suspend": wants}})
        kopf.info(body, reason="Suspending" if wants else "Resuming",
                  message=("suspended the trainer Job; its pods checkpoint on SIGTERM" if wants else
                           "resumed the trainer Job; training continues from the latest checkpoint"))


def _patch_status(job: FineTuneJob, status: dict) -> None:
    _custom().patch_namespaced_custom_object_status(GROUP, VERSION, job.metadata.namespace, PLURAL,
                                                    job.metadata.name, {"status": status})


# --- admission -----------------------------------------------------------------------------------


def _gather_facts(job: FineTuneJob) -> admission.ClusterFacts:
    core, ns = _core(), job.metadata.namespace
    facts = admission.ClusterFacts()
    for _, ref in admission.secret_refs(job):
        try:
            secret = core.read_namespaced_secret(ref.name, ns)
            facts.secrets[ref.name] = set((secret.data or {}).keys()) | set((secret.string_data or {}).keys())
        except ApiException as e:
            if e.status != 404:
                raise
    for _, claim in admission.claims_to_check(job):
        try:
            core.read_namespaced_persistent_volume_claim(claim, ns)
            facts.claims.add(claim)
        except ApiException as e:
            if e.status != 404:
                raise
    if job.spec.resources.priority_class_name:
        try:
            client.SchedulingV1Api(api()).read_priority_class(job.spec.resources.priority_class_name)
            facts.priority_classes = {job.spec.resources.priority_class_name}
        except ApiException as e:
            if e.status == 404:
                facts.priority_classes = set()
            elif e.status != 403:
                raise
    if job.spec.resources.gpus_per_node > 0:
        try:
            facts.node_gpus = _node_gpus()
        except ApiException as e:
            if e.status != 403:
                raise
    return facts


# Admission needs only each node's allocatable GPUs. Listing every node for every new
# FineTuneJob, and building a typed model of each, was most of the operator's CPU when many
# jobs arrive at once (200 nodes: about a third of its samples), so the list is read raw and
# shared for a few seconds.
NODE_GPUS_TTL_SECONDS = 5.0
_node_gpus_cache: tuple[float, list[int]] | None = None
_node_gpus_guard = threading.Lock()


def _node_gpus() -> list[int]:
    global _node_gpus_cache
    with _node_gpus_guard:
        if _node_gpus_cache and time.monotonic() - _node_gpus_cache[0] < NODE_GPUS_TTL_SECONDS:
            return _node_gpus_cache[1]
        raw = _core().list_node(_preload_content=False)
        nodes = json.loads(raw.data)["items"]
        gpus = [int(((n.get("status") or {}).get("allocatable") or {}).get("nvidia.com/gpu", "0")) for n in nodes]
        _node_gpus_cache = (time.monotonic(), gpus)
        return gpus


def _admit(job: FineTuneJob, body: dict, obj: dict) -> bool:
    """Write the Admitted condition and say whether the job may go on; raise TemporaryError to
    be called again when the problem may go away (a missing Secret or claim)."""
    problem = admission.check(job, _gather_facts(job))
    conditions = (obj.get("status") or {}).get("conditions") or []
    stamp = now_iso()
    if problem is None:
        if (next((c for c in conditions if c.get("type") == ADMITTED), {}) or {}).get("status") != TRUE:
            _patch_status(job, {"conditions": set_conditions(
                conditions, [ConditionUpdate(ADMITTED, TRUE, "Admitted",
                                             "the Secrets, claims and node capacity the spec needs exist")],
                generation=job.metadata.generation, now=stamp),
                "observedGeneration": job.metadata.generation, "phase": job.status.phase or Phase.PENDING.value})
            kopf.info(body, reason="Admitted", message="the spec's references exist; creating the trainer")
        return True
    updates = [ConditionUpdate(ADMITTED, FALSE, problem.reason, problem.message)]
    phase = Phase.PENDING
    if not problem.retryable:
        updates.append(ConditionUpdate(FAILED, TRUE, problem.reason, problem.message))
        phase = Phase.FAILED
    _patch_status(job, {"conditions": set_conditions(conditions, updates, generation=job.metadata.generation,
                                                     now=stamp),
                        "observedGeneration": job.metadata.generation, "phase": phase.value,
                        **({"completionTime": stamp} if phase is Phase.FAILED else {})})
    _record_transition(body, job.status.phase, phase.value, problem.reason, problem.message)
    kopf.warn(body, reason=problem.reason, message=problem.message)
    if problem.retryable:
        raise kopf.TemporaryError(problem.message, delay=settings.current.admission_retry_seconds)
    return False


# --- the spec handler -------------------------------------------------------------------------


def _read(namespace: str, name: str) -> dict | None:
    try:
        return _custom().get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    except ApiException as e:
        if e.status == 404:
            return None
        raise


def ensure_children(namespace: str, name: str) -> None:
    started = time.monotonic()
    try:
        with _locked(namespace, name):
            obj = _read(namespace, name)
            if obj is None or obj["metadata"].get("deletionTimestamp"):
                return
            job = FineTuneJob.from_resource(obj)
            if job.status.phase in (Phase.SUCCEEDED.value, Phase.FAILED.value):
                return
            if not _admit(job, obj, obj):
                return  # failed for good: nothing is created for it
            _ensure_claim(job)
            _ensure_identity(job)
            _ensure_config(job)
            _ensure_service(job)
            _ensure_trainer_job(job, obj)
    except (kopf.TemporaryError, kopf.PermanentError):
        raise
    except Exception:
        metrics.reconcile_errors.inc()
        raise
    finally:
        metrics.reconcile_duration.observe(time.monotonic() - started)
    refresh_status(namespace, name)


@kopf.on.create(GROUP, VERSION, PLURAL)
def on_create(namespace: str, name: str, **_) -> None:
    ensure_children(namespace, name)


@kopf.on.resume(GROUP, VERSION, PLURAL)
def on_resume(namespace: str, name: str, **_) -> None:
    ensure_children(namespace, name)


@kopf.on.update(GROUP, VERSION, PLURAL, field="spec")
def on_spec_change(namespace: str, name: str, **_) -> None:
    ensure_children(namespace, name)


@kopf.on.delete(GROUP, VERSION, PLURAL)
def on_delete(namespace: str, name: str, body: dict, **_) -> None:
    """Retain: make sure the claim has no owner reference left before the job goes."""
    job = FineTuneJob.from_resource(body)
    if job.spec.storage.existing_claim is None and not storage.owns_claim(job):
        core = _core()
        claim = storage.claim_name(job)
        try:
            current = core.read_namespaced_persistent_volume_claim(claim, namespace)
        except ApiException as e:
            if e.status != 404:
                raise
        else:
            refs = [_as_dict(r) for r in current.metadata.owner_references or []]
            kept = [r for r in refs if r.get("uid") != job.metadata.uid]
            if kept != refs:
                core.patch_namespaced_persistent_volume_claim(claim, namespace,
                                                              {"metadata": {"ownerReferences": kept or None}},
                                                              _content_type=MERGE_PATCH)
    _phases.pop((namespace, name), None)
    metrics.set_job_counts(_counts(), PHASES)


# --- status -------------------------------------------------------------------------------------


def _counts() -> dict[str, int]:
    counts: dict[str, int] = {}
    for phase in _phases.values():
        counts[phase] = counts.get(phase, 0) + 1
    return counts


def _record_transition(body: dict, old: str | None, new: str, reason: str, message: str) -> None:
    if old == new:
        return
    metrics.phase_transitions.labels(**{"from": old or "", "to": new}).inc()
    text = f"{old or 'New'} -> {new}: {reason}: {message}"[:1000]
    if new == Phase.FAILED.value:
        kopf.warn(body, reason=reason, message=text)
    else:
        kopf.info(body, reason=new, message=text)
    log.info("%s/%s %s", body["metadata"].get("namespace"), body["metadata"].get("name"), text)


def _trainer_pods(trainer: dict) -> list[dict]:
    uid = trainer["metadata"]["uid"]
    pods = _core().list_namespaced_pod(trainer["metadata"]["namespace"],
                                       label_selector=f"batch.kubernetes.io/controller-uid={uid}")
    return [_as_dict(p) for p in pods.items]


def _deploy(job: FineTuneJob, obs: Observation) -> Observation:
    """Add the result to its InferenceService; Succeeded once that serves it and is Ready."""
    try:
        from finetune_operator.handlers import inferenceservice
    except ImportError:
        inferenceservice = None
    ensure = getattr(inferenceservice, "ensure_for_finetunejob", None)
    carry = dict(gpu_seconds=obs.gpu_seconds, attempts=obs.attempts, restarts=obs.restarts,
                 first_running_at=obs.first_running_at)
    if ensure is None:
        return Observation(Phase.SUCCEEDED, "TrainingCompleted",
                           "training completed; spec.deploy was not acted on: this operator has no "
                           "InferenceService controller", **carry)
    endpoint = ensure(job, api())
    isvc = _custom().get_namespaced_custom_object(GROUP, VERSION, job.metadata.namespace,
                                                  "inferenceservices", endpoint["name"])
    st = isvc.get("status") or {}
    served = job.metadata.name in (st.get("servedModels") or [])
    if st.get("phase") == "Ready" and served and st.get("observedGeneration") == isvc["metadata"]["generation"]:
        return Observation(Phase.SUCCEEDED, "Deployed", f"training completed; served by InferenceService "
                           f"{endpoint['name']} as model {job.metadata.name!r} at {endpoint['url']}",
                           endpoint=endpoint, **carry)
    ready = next((c for c in st.get("conditions") or [] if c.get("type") == "Ready"), {})
    return Observation(Phase.DEPLOYING, "WaitingForInferenceService",
                       f"training completed; InferenceService {endpoint['name']} is "
                       f"{st.get('phase') or 'starting'}: {ready.get('message') or 'rolling out'}",
                       endpoint=endpoint, **carry)


def refresh_status(namespace: str, name: str) -> None:
    """Derive the status from the trainer Job and pods and write what changed."""
    started = time.monotonic()
    try:
        with _locked(namespace, name):
            _refresh_status_locked(namespace, name)
    except Exception:
        metrics.reconcile_errors.inc()
        raise
    finally:
        metrics.reconcile_duration.observe(time.monotonic() - started)


def _refresh_status_locked(namespace: str, name: str) -> None:
    obj = _read(namespace, name)
    if obj is None or obj["metadata"].get("deletionTimestamp"):
        return
    job = FineTuneJob.from_resource(obj)
    now = _now()
    trainer = _read_trainer_job(job)
    pods = _trainer_pods(trainer) if trainer else []
    recorded = json.loads(job.metadata.annotations.get(GPU_SECONDS_ANNOTATION) or "{}")
    obs = derive(job, trainer, pods, now=now, recorded_gpu_seconds=recorded)
    if obs.phase is Phase.DEPLOYING:
        try:
            obs = _deploy(job, obs)
        except Exception as e:  # noqa: BLE001 - stay Deploying and try again on the next resync
            log.warning("%s/%s: deploying failed: %s", namespace, name, e)
            obs = Observation(Phase.DEPLOYING, "DeployFailed", f"adding the adapter to the "
                              f"InferenceService failed: {e}; retrying", obs.gpu_seconds, obs.attempts,
                              obs.restarts, obs.first_running_at)
    status = status_patch(job, obs, now=now, gpu_hour_price=settings.current.gpu_hour_price,
                          existing_conditions=(obj.get("status") or {}).get("conditions") or [])
    old = obj.get("status") or {}
    changed = {k: v for k, v in status.items() if old.get(k) != v}
    if changed:
        _patch_status(job, changed)
    _record_transition(obj, job.status.phase, obs.phase.value, obs.reason, obs.message)
    _observe_metrics(job, obs, obj, now)
    if _gpu_seconds_drifted(recorded, obs.gpu_seconds):
        _custom().patch_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, name,
            {"metadata": {"annotations": {GPU_SECONDS_ANNOTATION: json.dumps(obs.gpu_seconds, sort_keys=True)}}})
    if obs.phase.terminal:
        _expire(job, obj, now)


def _gpu_seconds_drifted(recorded: dict[str, float], current: dict[str, float]) -> bool:
    """Persist per-pod GPU seconds when a pod is new or a minute ahead of the record."""
    return any(uid not in recorded or seconds - recorded[uid] >= 60 for uid, seconds in current.items()
               if seconds > 0)


def _observe_metrics(job: FineTuneJob, obs: Observation, obj: dict, now: dt.datetime) -> None:
    key = (job.metadata.namespace, job.metadata.name)
    _phases[key] = obs.phase.value
    metrics.set_job_counts(_counts(), PHASES)
    delta = obs.gpu_hours - (job.status.gpu_hours or 0.0)
    if delta > 0:
        metrics.gpu_hours.inc(delta)
    created = parse_time(obj["metadata"].get("creationTimestamp"))
    old = job.status.phase
    if created and obs.phase.running and old in (None, Phase.PENDING.value) and obs.restarts == 0 \
            and obs.reason not in ("Resumed", "Retrying") and obs.first_running_at:
        metrics.time_to_training_start.observe(
            max((parse_time(obs.first_running_at) - created).total_seconds(), 0))
    if created and obs.phase.terminal and old != obs.phase.value:
        metrics.job_duration.observe(max((now - created).total_seconds(), 0))


def _expire(job: FineTuneJob, obj: dict, now: dt.datetime) -> None:
    """ttlSecondsAfterFinished: delete the FineTuneJob (the claim follows its reclaim policy)."""
    ttl = job.spec.ttl_seconds_after_finished
    finished = parse_time(job.status.completion_time)
    if ttl is None or finished is None or (now - finished).total_seconds() < ttl:
        return
    kopf.info(obj, reason="Expired", message=f"deleting: finished {ttl}s ago (ttlSecondsAfterFinished)")
    try:
        _custom().delete_namespaced_custom_object(GROUP, VERSION, job.metadata.namespace, PLURAL,
                                                  job.metadata.name)
    except ApiException as e:
        if e.status != 404:
            raise


# --- following the trainer -------------------------------------------------------------------


def _needs_resync(status, spec, **_) -> bool:
    """A finished job has nothing left to observe, unless its TTL is still to run out."""
    return (status or {}).get("phase") not in ("Succeeded", "Failed") \
        or (spec or {}).get("ttlSecondsAfterFinished") is not None


@kopf.timer(GROUP, VERSION, PLURAL, interval=settings.current.resync_seconds, initial_delay=2,
            idle=None, when=_needs_resync)
def resync(namespace: str, name: str, **_) -> None:
    refresh_status(namespace, name)


def _owner_name(body: dict) -> str | None:
    for ref in body["metadata"].get("ownerReferences") or []:
        if ref.get("kind") == FineTuneJob.KIND:
            return ref.get("name")
    return None


@kopf.on.event("batch", "v1", "jobs", labels={MANAGED_BY: APP})
def trainer_job_event(body: dict, **_) -> None:
    owner = _owner_name(body)
    if owner:
        refresh_status(body["metadata"]["namespace"], owner)


@kopf.on.event("v1", "pods", labels={MANAGED_BY: APP, COMPONENT: trainer_job.COMPONENT})
def trainer_pod_event(body: dict, **_) -> None:
    owner = (body["metadata"].get("labels") or {}).get(FINETUNEJOB)
    if owner:
        try:
            refresh_status(body["metadata"]["namespace"], owner)
        except ApiException as e:
            if e.status != 404:
                raise
