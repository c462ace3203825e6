"""FineTuneJob handlers: create the children, follow the trainer Job, write status. The kopf
decorators that call them are in `finetune_operator/main.py`; API errors are handled in
`kube.py`, phases decided in `status.py`.

Every step is idempotent and derived from what is in the cluster, so an operator killed
at any moment and started again carries on: child names are deterministic (409 on create
means "already done"), the phase is re-derived from the Job and its pods, and transitions
are detected against the phase stored in status.
"""

from __future__ import annotations

import concurrent.futures
import contextvars
import datetime as dt
import json
import logging
import time
from collections.abc import Callable

import kopf

from finetune_api.models import FineTuneJob
from finetune_api.schema import GROUP, VERSION

from finetune_operator import admission, cache, kube, kueue, metrics, names, settings
from finetune_operator.builders import comparison_job, identity, review, storage, trainer_config, trainer_job
from finetune_operator.conditions import now_iso
from finetune_operator.handlers import facts, records
from finetune_operator.labels import FINETUNEJOB, FINETUNEJOB_NAME_ANNOTATION
from finetune_operator.locks import KeyedLocks
from finetune_operator.status import (
    DEPLOYED_SETTINGS_ANNOTATION, GPU_SECONDS_ANNOTATION, Observation, Phase, admission_status,
    deploy_digest, deployment_failed, deployment_observation, derive, late_deploy, parse_time,
    status_patch, trainer_completed,
)

PLURAL = "finetunejobs"
KEPT_ANNOTATION = f"{GROUP}/kept-while-served-by"
log = logging.getLogger("finetune_operator.finetunejob")
TRAINED = (Phase.COMPARING.value, Phase.AWAITING_APPROVAL.value, Phase.DEPLOYING.value, Phase.SUCCEEDED.value)

# One reconciliation at a time per FineTuneJob (spec handler, timer and watch events all
# write status; they must not interleave their read-modify-write of the conditions list).
_locks = KeyedLocks(metrics.reconcile_queue_depth)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


# --- applying children ------------------------------------------------------------------------


def _ensure_claim(job: FineTuneJob) -> None:
    body = storage.build_workspace_claim(job)
    if body is None:
        return
    core = kube.core()
    current = kube.create(body, core.create_namespaced_persistent_volume_claim,
                          core.read_namespaced_persistent_volume_claim)
    refs = (current.get("metadata") or {}).get("ownerReferences") or []
    desired = storage.desired_owner_references(job, refs)
    if refs != desired:
        core.patch_namespaced_persistent_volume_claim(
            body["metadata"]["name"], job.metadata.namespace,
            {"metadata": {"ownerReferences": desired or None}}, _content_type=kube.MERGE_PATCH)


def _create_owned(job: FineTuneJob, body: dict, create, read) -> dict:
    """Create a child; on 409 return the one there, but only if this job (its uid) owns it. A
    child of an earlier FineTuneJob of the same name (deleted, then re-created) is the garbage
    collector's to delete: adopting it would lose it under the new job, so wait for it to go."""
    current = kube.create(body, create, read)
    if current is None:  # deleted between the 409 and the read
        raise kopf.TemporaryError(f"{body['kind']} {body['metadata']['name']} is being deleted", delay=2)
    owners = (current.get("metadata") or {}).get("ownerReferences") or []
    if job.metadata.uid not in [r.get("uid") for r in owners]:
        previous = [r.get("uid") for r in owners if r.get("kind") == "FineTuneJob"]
        why = (f"still belongs to an earlier FineTuneJob {job.metadata.name} (uid {previous[0]}); waiting for "
               "the garbage collector to delete it" if previous else
               "exists and is not this FineTuneJob's; delete or rename it")
        raise kopf.TemporaryError(f"{body['kind']} {body['metadata']['name']} {why}", delay=2 if previous else 30)
    return current


def _ensure_service_account(job: FineTuneJob) -> None:
    core = kube.core()
    _create_owned(job, identity.build_service_account(job), core.create_namespaced_service_account,
                  core.read_namespaced_service_account)


def _ensure_role(job: FineTuneJob) -> None:
    rbac = kube.rbac()
    role = identity.build_role(job)
    current = _create_owned(job, role, rbac.create_namespaced_role, rbac.read_namespaced_role)
    if current["rules"] != role["rules"]:
        rbac.patch_namespaced_role(role["metadata"]["name"], job.metadata.namespace, {"rules": role["rules"]})


def _ensure_role_binding(job: FineTuneJob) -> None:
    # A RoleBinding may name its Role before the Role exists: no order between the two.
    rbac = kube.rbac()
    _create_owned(job, identity.build_role_binding(job), rbac.create_namespaced_role_binding,
                  rbac.read_namespaced_role_binding)


def _ensure_config(job: FineTuneJob) -> None:
    """Only for a config too large for the pod template (it travels there otherwise)."""
    body = trainer_config.build_config_map(job)
    if body is not None:
        core = kube.core()
        current = _create_owned(job, body, core.create_namespaced_config_map, core.read_namespaced_config_map)
        if current.get("data") != body["data"]:  # the spec was edited before training started
            core.patch_namespaced_config_map(body["metadata"]["name"], job.metadata.namespace,
                                             {"data": body["data"]})


def _ensure_review_config_map(job: FineTuneJob) -> None:
    """Created with the comparison Job, which fills it (the review page reads nothing from it
    before): one write fewer while a burst of new jobs waits for its trainer Jobs, and none for
    a job that never gets that far. Owned like the other children: an earlier job's of the
    same name (its comparison's results, the garbage collector's to delete) is never taken."""
    if job.spec.evaluation.comparison.enabled:
        core = kube.core()
        _create_owned(job, review.build_review_config_map(job), core.create_namespaced_config_map,
                      core.read_namespaced_config_map)


def _ensure_service(job: FineTuneJob) -> None:
    body = trainer_job.build_headless_service(job)
    if body is not None:
        _create_owned(job, body, kube.core().create_namespaced_service, kube.core().read_namespaced_service)


# The trainer Job's prerequisites, created at the same time (each is one or two requests; one
# after the other they were most of the time from a FineTuneJob to its Job under load). The
# Job comes after them: its pods need the ServiceAccount to exist.
# The trainer's config travels in the Job's pod template; only one too large for it has a
# ConfigMap (builders/trainer_config.py).
_PREREQUISITES = (_ensure_claim, _ensure_service_account, _ensure_role, _ensure_role_binding,
                  _ensure_config, _ensure_service)
_pool = concurrent.futures.ThreadPoolExecutor(max_workers=16, thread_name_prefix="children")


def _ensure_prerequisites(job: FineTuneJob) -> None:
    """All at once; the first error (in the order above) is raised once all have finished."""
    futures = [_pool.submit(contextvars.copy_context().run, ensure, job) for ensure in _PREREQUISITES]
    errors = [f.exception() for f in futures]
    for error in errors:
        if error is not None:
            raise error


def _read_trainer_job(job: FineTuneJob) -> dict | None:
    return _read_own_job(job, names.trainer_job(job.metadata.name))


def _read_own_job(job: FineTuneJob, name: str) -> dict | None:
    ns = job.metadata.namespace
    obj = cache.job(ns, name, lambda: kube.read(kube.batch().read_namespaced_job, name, ns))
    if obj is None:
        return None
    refs = obj["metadata"].get("ownerReferences") or []
    if job.metadata.uid not in [r.get("uid") for r in refs]:
        if any(r.get("kind") == "FineTuneJob" for r in refs):
            raise kopf.TemporaryError(f"Job {obj['metadata']['name']} still belongs to an earlier FineTuneJob "
                                      f"{job.metadata.name}; waiting for the garbage collector to delete it", delay=2)
        raise kopf.TemporaryError(f"Job {obj['metadata']['name']} exists but belongs to another "
                                  "object; delete it or rename this FineTuneJob", delay=30)
    return obj


def _ensure_trainer_job(job: FineTuneJob, body: dict, pending: dict, notes: list[tuple[str, str]]) -> None:
    """Create the Job (once), then make its suspend follow spec.suspend. Status updates go
    into `pending` (written by the caller, in one patch with admission's), what was done into
    `notes` (posted by the caller with the phase transition it leads to, in one Event)."""
    batch = kube.batch()
    queued = bool(job.spec.resources.queue_name)
    current = _read_trainer_job(job)
    if current is not None and current["metadata"].get("deletionTimestamp"):
        if job.spec.suspend:
            return
        raise kopf.TemporaryError("the previous trainer Job is still being deleted", delay=3)
    if current is None:
        if job.spec.suspend and (queued or job.status.trainer_job):
            return  # suspended before (re)creation; the Job is created on resume
        manifest = trainer_job.build_trainer_job(job, _trainer_image(job))
        current = kube.create(manifest, batch.create_namespaced_job, batch.read_namespaced_job)
        cache.remember(current)  # refreshes see it before the watch brings it
        admitted = "admitted (the spec's references exist); " if pending.get("conditions") else ""
        notes.append(("TrainerJobCreated", f"{admitted}created trainer Job {manifest['metadata']['name']}"))
        if not queued and not job.spec.suspend and not job.status.start_time:
            # A Job no queue holds starts as it is created (the Job controller sets its own
            # startTime a moment later): written in the same patch as the Job's name, not in
            # one more of its own. A queued Job's comes from the Job, once Kueue admits it.
            created = (current.get("metadata") or {}).get("creationTimestamp")
            pending["startTime"] = created or _now().strftime("%Y-%m-%dT%H:%M:%SZ")
            # Its first attempt too: counted from its pod a moment later, it was a status patch
            # of its own per job (#14).
            pending["attempts"] = max(job.status.attempts or 0, 1)
    # What the Job runs (an edit before training started built it again with a new image).
    image = current["spec"]["template"]["spec"]["containers"][0].get("image") or job.status.trainer_image
    if job.status.trainer_job != current["metadata"]["name"] or job.status.trainer_image != image:
        pending.update({"trainerJob": current["metadata"]["name"], "trainerImage": image})
    wants = job.spec.suspend
    if queued:
        if wants or job.status.phase == Phase.SUSPENDED.value:
            _suspend_queued(job, body, current, wants)
        return
    if bool(current["spec"].get("suspend")) != wants:
        batch.patch_namespaced_job(current["metadata"]["name"], job.metadata.namespace,
                                   {"spec": {"suspend": wants}})
        kopf.event(body, type="Normal", reason="Suspending" if wants else "Resuming",
                  message=("suspended the trainer Job; its pods checkpoint on SIGTERM" if wants else
                           "resumed the trainer Job; training continues from the latest checkpoint"))


# The spec digest each job was last warned about (SpecNotApplied): one Warning per edit.
_spec_warned: dict[tuple[str, str], str] = {}


def _rebuild_if_edited(job: FineTuneJob, body: dict, trainer: dict) -> None:
    """A spec edited after the trainer Job was built (its digest differs) but before training
    started: a Job Kueue still queues, or one created suspended, has no pods and has written no
    checkpoint, so it is deleted and built again from the new spec (the handler runs again in
    a moment and creates it). A queued Job goes to the back of its queue with its new Workload.
    Once training started, CEL refuses such edits; in the moment between a Job's start and
    status.startTime the edit is accepted, and a Warning says that the trainer keeps its spec."""
    built = (trainer["metadata"].get("annotations") or {}).get(trainer_job.SPEC_DIGEST_ANNOTATION)
    wanted = trainer_job.spec_digest(job)
    if built is None or built == wanted:
        return  # built from this spec (or by an operator that recorded no digest)
    name = trainer["metadata"]["name"]
    if job.status.start_time or not trainer["spec"].get("suspend") or (trainer.get("status") or {}).get("startTime"):
        if _spec_warned.get((job.metadata.namespace, job.metadata.name)) != wanted:
            _spec_warned[(job.metadata.namespace, job.metadata.name)] = wanted
            kopf.warn(body, reason="SpecNotApplied",
                      message=f"the spec changed after trainer Job {name} started: the trainer keeps the spec "
                              "it started with; create a new FineTuneJob to train with the new one")
        return
    kube.delete(kube.batch().delete_namespaced_job, name, job.metadata.namespace,
                propagation_policy="Background")
    cache.deleted("Job", job.metadata.namespace, name, trainer["metadata"].get("uid"))
    kopf.event(body, type="Normal", reason="Rebuilding",
               message=f"the spec changed before training started: deleted trainer Job {name} "
                       "(no pod had started) to create it again from the new spec")
    raise kopf.TemporaryError(f"trainer Job {name} deleted to be built again from the edited spec", delay=1)


def _suspend_queued(job: FineTuneJob, body: dict, current: dict, wants: bool) -> None:
    """Kueue owns a queued Job's suspend. Suspending deactivates the Job's Workload (Kueue
    evicts it: the Job is suspended and its pods checkpoint on SIGTERM) and resuming activates
    it again, in its old place in the queue. With no Workload to find (no Kueue, or none made
    yet), suspending deletes the Job instead, and resuming creates it again for Kueue."""
    found = kueue.workload_of(current)
    if found is not None:
        version, workload = found
        if kueue.is_active(workload) == wants:
            kueue.set_active(version, workload, not wants)
            name = workload["metadata"]["name"]
            kopf.event(body, type="Normal", reason="Suspending" if wants else "Resuming",
                       message=(f"deactivated Kueue Workload {name}: Kueue suspends the trainer Job "
                                "(its pods checkpoint on SIGTERM) and keeps its place in the queue"
                                if wants else f"activated Kueue Workload {name} again: it waits for "
                                "admission in its old place in the queue"))
        return
    if wants:
        kube.batch().delete_namespaced_job(current["metadata"]["name"], job.metadata.namespace,
                                           propagation_policy="Background")
        kopf.event(body, type="Normal", reason="Suspending",
                   message="deleted the trainer Job (no Kueue Workload found for it); checkpoints are kept")


def _ensure_comparison_job(job: FineTuneJob, notes: list[tuple[str, str]]) -> None:
    _ensure_review_config_map(job)  # the comparison fills it: it must exist before the Job
    manifest = comparison_job.build_comparison_job(job, settings.current.vllm_image,
                                                   settings.current.gpu_hour_price)
    batch = kube.batch()
    cache.remember(kube.create(manifest, batch.create_namespaced_job, batch.read_namespaced_job))
    notes.append(("ComparisonJobCreated", f"created comparison Job {manifest['metadata']['name']}: "
                                          "base vs fine-tuned through vLLM"))


def _trainer_image(job: FineTuneJob) -> str:
    """spec.resources.image (which CEL freezes once training started), else the operator's
    default as resolved when the first trainer Job was created (a Job re-created after an
    operator upgrade keeps it), else the default now."""
    return job.spec.resources.image or job.status.trainer_image or settings.current.trainer_image


def _patch_status(job: FineTuneJob, status: dict) -> None:
    """Onto the version of the job that `status` was computed from (a 409 when someone wrote
    since); the written object goes to the cache and `job` moves on to its version."""
    written = kube.patch_status(PLURAL, job.metadata.namespace, job.metadata.name, status,
                                resource_version=job.metadata.resource_version)
    _wrote(job, written)


def _patch_metadata(job: FineTuneJob, metadata: dict) -> None:
    written = kube.custom().patch_namespaced_custom_object(
        GROUP, VERSION, job.metadata.namespace, PLURAL, job.metadata.name, {"metadata": metadata})
    _wrote(job, written if isinstance(written, dict) else kube.as_dict(written))


def _wrote(job: FineTuneJob, written: dict) -> None:
    cache.remember(written)
    job.metadata.resource_version = (written.get("metadata") or {}).get("resourceVersion")


# --- admission -----------------------------------------------------------------------------------


def _admit(job: FineTuneJob, body: dict, obj: dict, pending: dict) -> bool:
    """Say whether the job may go on, and record the admission's outcome: a refusal is written
    at once; an admission goes into `pending`, written with the trainer Job's name in one patch.
    Raise TemporaryError to be called again when the problem may go away (a missing Secret or
    claim). A status patch and an event only when the outcome changes, not on every retry."""
    cluster = facts.gather(job)
    # Only a job that no current node fits needs to know whether its trainer Job exists (one
    # GET, skipped in the common case).
    note = admission.capacity_note(job, cluster)
    has_trainer = bool(note) and (bool(job.status.trainer_job) or _read_trainer_job(job) is not None)
    problem = admission.check(job, cluster, capacity_policy=settings.current.capacity_policy,
                              has_trainer=has_trainer)
    patch = admission_status(job, problem, (obj.get("status") or {}).get("conditions") or [],
                             now=now_iso())
    if problem is None:
        if patch is not None:
            pending.update(patch)
            if note and not has_trainer:
                kopf.warn(body, reason="WaitingForGPUCapacity",
                          message=f"{note}; creating the trainer Job anyway, so that an autoscaler or "
                                  "Kueue can add a node for its pod (the status shows the scheduler's "
                                  "message until one fits)")
        return True
    if patch is not None:
        _patch_status(job, patch)
        records.transition(body, job.status.phase, patch["phase"], problem.reason, problem.message)
        kopf.warn(body, reason=problem.reason, message=problem.message)
    if problem.retryable:
        raise kopf.TemporaryError(problem.message, delay=settings.current.admission_retry_seconds)
    return False


# --- the spec handler -------------------------------------------------------------------------


def ensure_children(namespace: str, name: str) -> None:
    started = time.monotonic()
    try:
        with _locks.hold((namespace, name)):
            # Status writes carry the version read here; one refused because the job changed
            # in between (a 409) is done again from a fresh read.
            # What was done goes into the transition's Event, also when that comes from the
            # second attempt (the trainer Job is not created twice).
            notes: list[tuple[str, str]] = []
            kube.again_on_conflict(lambda: _ensure_children_locked(namespace, name, notes=notes),
                                   lambda: _ensure_children_locked(namespace, name, fresh=True, notes=notes),
                                   metrics.status_conflicts.inc)
    except (kopf.TemporaryError, kopf.PermanentError):
        raise
    except Exception:
        metrics.reconcile_errors.inc()
        raise
    finally:
        metrics.reconcile_duration.observe(time.monotonic() - started)


def _ensure_children_locked(namespace: str, name: str, fresh: bool = False,
                            notes: list[tuple[str, str]] | None = None) -> None:
    """Admit, create what is missing, then refresh the status: one status write for all of
    it (admission's outcome, the trainer Job's name and the phase it leads to). The job comes
    from the watch cache (kopf indexes it before it calls this handler for the same event), or
    with `fresh` from a GET: after a 409, the cache may still hold the version refused."""
    def read() -> dict | None:
        return kube.read_own(PLURAL, namespace, name)

    obj = read() if fresh else cache.finetunejob(namespace, name, read)
    if obj is None or obj["metadata"].get("deletionTimestamp"):
        return
    job = FineTuneJob.from_resource(obj)
    if job.status.phase in (Phase.SUCCEEDED.value, Phase.FAILED.value) and not late_deploy(job):
        return
    pending: dict = {}
    notes = notes if notes is not None else []
    # A trained job (Comparing, AwaitingApproval, Deploying, or Succeeded with a late
    # spec.deploy) only goes on: refresh_status below; its trainer is never created again.
    if job.status.phase not in TRAINED:
        if not _admit(job, obj, obj, pending):
            return  # failed for good: nothing is created for it
        trainer = _read_trainer_job(job)
        if trainer is not None and not trainer["metadata"].get("deletionTimestamp"):
            _rebuild_if_edited(job, obj, trainer)
        if trainer is None or trainer["metadata"].get("deletionTimestamp"):
            # With this job's Job there (owned by its uid), its prerequisites were created
            # before it: a handler run again (a resume, a suspend) does not recreate them.
            _ensure_prerequisites(job)
        _ensure_trainer_job(job, obj, pending, notes)
    _refresh_status_locked(namespace, name, read_as=obj, pending=pending, notes=notes)


def holds_finalizer(spec: dict, meta: dict, **_) -> bool:
    """Whether a job needs the deletion handler (`release`), and so kopf's finalizer: when it
    deploys (its InferenceService entry goes with it), or when its claim may carry its owner
    reference (reclaimPolicy Delete: a later switch to Retain must take the reference off
    before the job goes). Once there, the finalizer stays until the job is deleted, whatever
    the spec says by then. Other jobs have nothing to release and are deleted at once,
    without the two patches that add and remove a finalizer."""
    storage = (spec or {}).get("storage") or {}
    return (bool((spec or {}).get("deploy"))
            or (not storage.get("existingClaim") and storage.get("reclaimPolicy") == "Delete")
            or settings.FINALIZER in ((meta or {}).get("finalizers") or []))


def release(namespace: str, name: str, body: dict) -> None:
    """Before the job goes: what spec.deploy added to an InferenceService is taken away (the
    other adapters there keep serving), and a retained claim keeps no owner reference to it."""
    job = FineTuneJob.from_resource(body)
    try:
        from finetune_operator.serving import handlers as serving
    except ImportError:  # an operator built without the serving controller
        serving = None
    if serving is not None:
        done = serving.withdraw_finetunejob(job, kube.api())
        if done:
            kopf.event(body, type="Normal", reason="Undeployed", message=done)
    if job.spec.storage.existing_claim is None and not storage.owns_claim(job):
        core = kube.core()
        claim = storage.claim_name(job)
        current = kube.read(core.read_namespaced_persistent_volume_claim, claim, namespace)
        if current is not None:
            refs = current["metadata"].get("ownerReferences") or []
            kept = [r for r in refs if r.get("uid") != job.metadata.uid]
            if kept != refs:
                core.patch_namespaced_persistent_volume_claim(claim, namespace,
                                                              {"metadata": {"ownerReferences": kept or None}},
                                                              _content_type=kube.MERGE_PATCH)
    _forget(namespace, name)


def _forget(namespace: str, name: str) -> None:
    """What the operator keeps in memory about a job that is gone."""
    records.forget(namespace, name)
    cache.forget(namespace, name)
    _status_written.pop((namespace, name), None)
    _spec_warned.pop((namespace, name), None)
    _refreshed_at.pop((namespace, name), None)


# --- status -------------------------------------------------------------------------------------


def _trainer_pods(trainer: dict) -> list[dict]:
    uid, ns = trainer["metadata"]["uid"], trainer["metadata"]["namespace"]

    def list_pods() -> list[dict]:
        pods = kube.core().list_namespaced_pod(ns, label_selector=f"{cache.CONTROLLER_UID}={uid}")
        return [kube.as_dict(p) for p in pods.items]

    return cache.trainer_pods(ns, uid, list_pods)


def _deploy(job: FineTuneJob, obs: Observation) -> Observation:
    """Add the result to its InferenceService and read how that stands."""
    try:
        from finetune_operator.serving import handlers as serving
    except ImportError:  # an operator built without the serving controller
        return deployment_observation(job, obs, None, None)
    endpoint = serving.ensure_for_finetunejob(job, kube.api())
    digest = deploy_digest(job)
    if job.metadata.annotations.get(DEPLOYED_SETTINGS_ANNOTATION) != digest:
        _patch_metadata(job, {"annotations": {DEPLOYED_SETTINGS_ANNOTATION: digest}})
    isvc = kube.read_own(serving.PLURAL, job.metadata.namespace, endpoint["name"])
    return deployment_observation(job, obs, endpoint, isvc)


def refresh_status(namespace: str, name: str) -> None:
    """Derive the status from the trainer Job and pods and write what changed. Level-triggered
    and coalesced: when a refresh of this job already waits, it will read everything this
    caller's event changed, so this one returns at once."""
    with _locks.coalesced((namespace, name)) as mine:
        if not mine:
            metrics.refreshes_coalesced.inc()
            return
        started = time.monotonic()
        try:
            # When our copy was behind (someone wrote since), read the job itself and go again.
            kube.again_on_conflict(lambda: _refresh_status_locked(namespace, name),
                                   lambda: _refresh_status_locked(namespace, name, fresh=True),
                                   metrics.status_conflicts.inc)
        except Exception:
            metrics.reconcile_errors.inc()
            _refreshed_at.pop((namespace, name), None)  # due again on the next pass
            raise
        finally:
            metrics.reconcile_duration.observe(time.monotonic() - started)


def _refresh_status_locked(namespace: str, name: str, fresh: bool = False, read_as: dict | None = None,
                           pending: dict | None = None, notes: list[tuple[str, str]] | None = None) -> None:
    """Reads come from the watch caches (cache.py): no request unless something changed.
    `read_as`: the job as its spec handler just read it; `pending`: status that handler has yet
    to write, written here with the rest in one patch; `notes`: (reason, message) of what it
    did, told in the transition's Event (or in Events of their own when the phase stays)."""
    notes = list(notes or [])
    def read() -> dict | None:
        return kube.read_own(PLURAL, namespace, name)

    obj = read_as if read_as is not None else read() if fresh else cache.finetunejob(namespace, name, read)
    if obj is None or obj["metadata"].get("deletionTimestamp"):
        return
    written = obj.get("status") or {}
    if pending:
        obj = {**obj, "status": {**written, **pending}}
    job = FineTuneJob.from_resource(obj)
    now = _now()
    trainer = _read_trainer_job(job)
    pods = _trainer_pods(trainer) if trainer else []
    # Jobs from before status.gpuSecondsByPod recorded them in an annotation.
    recorded = dict(job.status.gpu_seconds_by_pod or {}) or \
        json.loads(job.metadata.annotations.get(GPU_SECONDS_ANNOTATION) or "{}")
    comparison = None
    if job.spec.evaluation.comparison.enabled and (
            trainer_completed(trainer) or job.status.phase in (Phase.COMPARING.value, Phase.AWAITING_APPROVAL.value)):
        comparison = _read_own_job(job, names.comparison_job(name))
    obs = derive(job, trainer, pods, now=now, recorded_gpu_seconds=recorded, comparison_job=comparison)
    if obs.phase is Phase.COMPARING and comparison is None:
        _ensure_comparison_job(job, notes)
        comparison = _read_own_job(job, names.comparison_job(name))  # the one just created
        obs = derive(job, trainer, pods, now=now, recorded_gpu_seconds=recorded, comparison_job=comparison)
    if obs.phase is Phase.DEPLOYING:
        try:
            obs = _deploy(job, obs)
        except Exception as e:  # noqa: BLE001 - stay Deploying and try again on the next resync
            log.warning("%s/%s: deploying failed: %s", namespace, name, e)
            obs = deployment_failed(obs, e)
    status = status_patch(job, obs, now=now, gpu_hour_price=settings.current.gpu_hour_price,
                          existing_conditions=(obj.get("status") or {}).get("conditions") or [])
    started = ((trainer or {}).get("status") or {}).get("startTime")
    if started and not job.status.start_time:
        # The Job controller sets it when the Job first runs unsuspended (not while Kueue queues it).
        status["startTime"] = parse_time(str(started)).strftime("%Y-%m-%dT%H:%M:%SZ")
    changed = {k: v for k, v in {**(pending or {}), **status}.items() if written.get(k) != v}
    if changed and not _only_gpu_hours_moved(namespace, name, changed, obs):
        _patch_status(job, changed)
        _status_written[(namespace, name)] = time.monotonic()
    records.transition(obj, job.status.phase, obs.phase.value, obs.reason, obs.message, notes)
    records.observe(job, obs, obj, now)
    if obs.phase.terminal:
        _expire(job, obj, now)
    _refreshed_at[(namespace, name)] = time.monotonic()


# While a job runs its GPU hours (and each pod's GPU seconds) grow at every refresh; alone, they
# are written at most this often (every other change, and the final figure, at once).
GPU_HOURS_WRITE_SECONDS = 60.0
_status_written: dict[tuple[str, str], float] = {}  # when each job's status was last written


def _only_gpu_hours_moved(namespace: str, name: str, changed: dict, obs: Observation) -> bool:
    last = _status_written.get((namespace, name))
    return (not obs.phase.terminal and set(changed) <= {"gpuHours", "estimatedCost", "gpuSecondsByPod"}
            and last is not None and time.monotonic() - last < GPU_HOURS_WRITE_SECONDS)


def _expire(job: FineTuneJob, obj: dict, now: dt.datetime) -> None:
    """ttlSecondsAfterFinished: delete the FineTuneJob (the claim follows its reclaim policy)."""
    ttl = job.spec.ttl_seconds_after_finished
    finished = parse_time(job.status.completion_time)
    if ttl is None or finished is None or (now - finished).total_seconds() < ttl:
        return
    from finetune_operator.serving import handlers as serving

    server = serving.served_by(job, kube.api())
    if server is not None:
        # Kept while served: the claim may go with the job (reclaimPolicy Delete) and vLLM reads
        # the adapter from it. It expires once the InferenceService no longer names it.
        if not job.metadata.annotations.get(KEPT_ANNOTATION):
            kopf.event(obj, type="Normal", reason="KeptWhileServed", message=f"ttlSecondsAfterFinished has passed, but "
                      f"InferenceService {server} serves this job: it is kept until it no longer does")
            _patch_metadata(job, {"annotations": {KEPT_ANNOTATION: server}})
        return
    kopf.event(obj, type="Normal", reason="Expired", message=f"deleting: finished {ttl}s ago (ttlSecondsAfterFinished)")
    kube.delete(kube.custom().delete_namespaced_custom_object, GROUP, VERSION, job.metadata.namespace,
                PLURAL, job.metadata.name)


# --- following the trainer -------------------------------------------------------------------


def needs_resync(status, spec, **_) -> bool:
    """A finished job has nothing left to observe, unless its TTL is still to run out."""
    return (status or {}).get("phase") not in (Phase.SUCCEEDED, Phase.FAILED) \
        or (spec or {}).get("ttlSecondsAfterFinished") is not None


def due_for_resync() -> list[tuple[str, str]]:
    """The cached jobs whose status can still move with time alone (resync.py). A job not yet
    admitted is its spec handler's: admission retries on its own schedule."""
    due = []
    mono, wall = time.monotonic(), _now()
    for obj in cache.all_finetunejobs():
        meta, status = obj.get("metadata") or {}, obj.get("status") or {}
        admitted = any(c.get("type") == "Admitted" and c.get("status") == "True"
                       for c in status.get("conditions") or [])
        if admitted and not meta.get("deletionTimestamp") and needs_resync(status, obj.get("spec")):
            key = (meta.get("namespace"), meta.get("name"))
            if _periodic_due(key, obj, mono, wall):
                due.append(key)
    return due


# Phases whose status the resync pass refreshes on every pass: a failed deployment is tried
# again from it, and there are few such jobs at a time.
EVERY_PASS = (Phase.COMPARING.value, Phase.AWAITING_APPROVAL.value, Phase.DEPLOYING.value)
# When each job's status was last refreshed (monotonic), for the periodic pass.
_refreshed_at: dict[tuple[str, str], float] = {}


def _periodic_due(key: tuple[str, str], obj: dict, mono: float, wall: dt.datetime) -> bool:
    """Whether the periodic pass refreshes this job now. Events refresh a job when its trainer
    Job or pods change, and when anyone but the operator writes it (the trainer's progress, an
    approval: `on_finetunejob_event`). What moves with time alone is little: GPU hours (written
    alone at most every GPU_HOURS_WRITE_SECONDS, so a running job is refreshed that often) and
    a TTL running out. Refreshing every job on every pass cost O(N) refreshes per pass over a
    run that lasts O(N): the operator's CPU grew 4.5x for 3x the jobs (#14, session 8)."""
    status, spec = obj.get("status") or {}, obj.get("spec") or {}
    phase = status.get("phase")
    last = _refreshed_at.get(key)
    if last is None or phase in EVERY_PASS:
        return True  # never refreshed by this operator (a restart), or its last refresh failed
    if phase in (Phase.SUCCEEDED.value, Phase.FAILED.value):
        ttl, finished = spec.get("ttlSecondsAfterFinished"), parse_time(status.get("completionTime"))
        return ttl is None or finished is None or (wall - finished).total_seconds() >= ttl
    return mono - last >= GPU_HOURS_WRITE_SECONDS


def on_finetunejob_event(body: dict, refresh: Callable[[str, str], None]) -> None:
    """A FineTuneJob's watch event that the operator did not cause (the trainer reported
    progress, a user approved or annotated it) refreshes it: its phase follows at once, not at
    the next periodic pass. Jobs the operator has not refreshed yet are their spec (or resume)
    handler's, and finished ones have nothing left to follow."""
    meta = body.get("metadata") or {}
    key = (meta.get("namespace"), meta.get("name"))
    if key not in _refreshed_at or meta.get("deletionTimestamp") or cache.own_write(body):
        return
    if needs_resync(body.get("status"), body.get("spec")):
        refresh(*key)


def forget_gone() -> int:
    """Drop what the operator keeps in memory about FineTuneJobs that are gone: phases and GPU
    hours counted (records), our writes not yet seen by the watch (cache), kopf's diff bases.
    A job without a finalizer (one that deploys nothing, see `holds_finalizer`) leaves without
    a deletion handler, so the resync loop calls this on every pass. Returns how many went."""
    if not cache.bound("finetunejobs"):
        return 0
    present, uids = set(), set()
    for obj in cache.all_finetunejobs():
        meta = obj.get("metadata") or {}
        present.add((meta.get("namespace"), meta.get("name")))
        uids.add(meta.get("uid"))
    gone = [key for key in set(_status_written) | set(_refreshed_at) | records.known() if key not in present]
    for namespace, name in gone:
        _forget(namespace, name)
    settings.diffbase.forget_except(uids)
    settings.progress.forget_except(uids)
    return len(gone)


def _owner_name(body: dict) -> str | None:
    for ref in body["metadata"].get("ownerReferences") or []:
        if ref.get("kind") == FineTuneJob.KIND:
            return ref.get("name")
    return None


def on_trainer_job_event(body: dict, refresh: Callable[[str, str], None] | None = None,
                         deleted: bool = False) -> None:
    """`refresh`: how to refresh the owner (the operator schedules it: resync.Resync.soon)."""
    if deleted:
        meta = body["metadata"]
        cache.deleted("Job", meta["namespace"], meta["name"], meta.get("uid"))
    owner = _owner_name(body)
    if owner:
        (refresh or refresh_status)(body["metadata"]["namespace"], owner)


def on_trainer_pod_event(body: dict, refresh: Callable[[str, str], None] | None = None) -> None:
    meta = body["metadata"]
    owner = (meta.get("annotations") or {}).get(FINETUNEJOB_NAME_ANNOTATION) or (meta.get("labels") or {}).get(FINETUNEJOB)
    if owner:
        # the FineTuneJob may be gone already: nothing left to refresh
        kube.call(refresh or refresh_status, body["metadata"]["namespace"], owner, absent=True)
