"""InferenceService handlers: check what is to be served, apply the vLLM children, write status.
The kopf decorators that call them are in `serving/routes.py`.

One reconciliation (`reconcile`) does everything and is idempotent; it runs on every event of
the InferenceService, of its Deployment and pods, and of the FineTuneJobs it names, so a
referenced job that succeeds, a rollout that finishes or a pod that crash-loops all update
the status. Children are applied with server-side apply (field manager `finetune-operator`).

Bad input (a rank above maxLoraRank, an adapter from a full fine-tuning job, another base
model, forbidden extra args) is refused with a condition and the Deployment is left as it
was: pods already serving keep serving the previous configuration.

`ensure_for_finetunejob` is called by the FineTuneJob handler when a job with spec.deploy
finished training: it creates the InferenceService or adds the job's adapter to it.
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import threading
from typing import Callable, Optional

from kubernetes import client

from finetune_api.models import FineTuneJob, InferenceService, to_dict
from finetune_api.schema import GROUP, VERSION

from finetune_operator import kube, metrics, settings
from finetune_operator.conditions import now_iso
from finetune_operator.labels import APP, MANAGED_BY
from finetune_operator.locks import KeyedLocks
from finetune_operator.serving import (
    adapters, autoscaling, common, deployment, disruption, monitoring, promotion, promptcheck, service,
)
from finetune_operator.serving.checks import check
from finetune_operator.serving.common import (
    INFERENCESERVICE_LABEL, REVISION_ANNOTATION, referenced_jobs, selector, service_url,
)
from finetune_operator.serving.references import references
from finetune_operator.serving.status import READY, status_for
from finetune_operator.status import Phase

PLURAL = "inferenceservices"
PROMETHEUS_URL = os.environ.get("FINETUNE_PROMETHEUS_URL", autoscaling.DEFAULT_PROMETHEUS)
PODMONITOR_CRD = "podmonitors.monitoring.coreos.com"
KEDA_CRD = "scaledobjects.keda.sh"
log = logging.getLogger("finetune_operator.inferenceservice")
_locks = KeyedLocks(metrics.reconcile_queue_depth)  # one reconciliation at a time per InferenceService


# --- reconciliation ---------------------------------------------------------------------------


def _read_job(namespace: str, name: str) -> Optional[FineTuneJob]:
    obj = kube.read_own("finetunejobs", namespace, name)
    return None if obj is None else FineTuneJob.from_resource(obj)


def _pods(isvc: InferenceService) -> list[dict]:
    labels = ",".join(f"{k}={v}" for k, v in selector(isvc).items())
    pods = kube.core().list_namespaced_pod(isvc.metadata.namespace, label_selector=labels)
    return [kube.as_dict(p) for p in pods.items]


def reconcile(namespace: str, name: str) -> None:
    with _locks.hold((namespace, name)):
        obj = kube.read_own(PLURAL, namespace, name)
        if obj is None or obj["metadata"].get("deletionTimestamp"):
            return
        isvc = InferenceService.from_resource(obj)
        jobs = {n: _read_job(namespace, n) for n in referenced_jobs(isvc)}
        problems = check(isvc, jobs)
        old = obj.get("status") or {}
        revision = old.get("revision")
        want, gated = None, {}
        if not problems:
            want, gated, keep = _plan(isvc, jobs, old)
            revision = _apply_children(isvc, jobs, keep)
        current = kube.read(kube.apps().read_namespaced_deployment, name, namespace)
        pods = _pods(isvc) if current else []
        replicas = adapters.sync(isvc, want, pods, revision, old, _simulated_node)
        if gated:
            decided = promotion.decide(isvc, jobs, gated, replicas, _server_for_pod(pods),
                                       lambda n: _read_job(namespace, n))
            if any(r.result != decided[n].result for n, r in gated.items()):
                # promoted or refused: load what now serves under each name
                old = {**old, "replicaAdapters": [r.to_status() for r in replicas],
                       "promotions": [r.to_status() for r in decided.values()]}
                want, gated, _ = _plan(isvc, jobs, old)
                replicas = adapters.sync(isvc, want, pods, revision, old, _simulated_node)
            else:
                gated = decided  # still evaluating (not loaded yet, or scoring failed): retried below
        prompts = promptcheck.check(isvc, jobs, replicas, _server_for_pod(pods)) if want is not None else None
        written = _write_status(obj, isvc, problems, current, pods, revision, replicas, want or {}, gated, prompts)
        failed = [f"pod {r.pod}: {r.error}" for r in replicas if r.error]
        failed += [f"{r.name}: {r.message}" for r in gated.values() if r.result == promotion.EVALUATING]
        if failed:
            raise adapters.AdapterSyncError("; ".join(failed))
    if written:
        _follow_deploying_jobs(namespace, jobs)


# How to refresh a FineTuneJob's status: the FineTuneJob controller's own refresh, set by the
# operator that runs both controllers (main.py). None when this controller runs alone
# (`kopf run -m finetune_operator.serving.routes`): the jobs' status is someone else's then.
refresh_finetunejob: Optional[Callable[[str, str], None]] = None


def _follow_deploying_jobs(namespace: str, jobs: dict[str, Optional[FineTuneJob]]) -> None:
    """A status just written may be what a FineTuneJob in Deploying waits for (this server
    Ready and serving its adapter): refresh those jobs now, so that they go Succeeded with this
    write rather than at the next resync (up to --resync-seconds later; issue #14)."""
    refresh = refresh_finetunejob
    if refresh is None:
        return
    for name, job in jobs.items():
        if job is not None and job.status.phase == Phase.DEPLOYING.value:
            try:
                refresh(namespace, name)
            except Exception as exc:  # noqa: BLE001 - the periodic resync refreshes it anyway
                log.warning("%s/%s: refreshing FineTuneJob %s failed: %s", namespace, name, name, exc)


def _plan(isvc: InferenceService, jobs: dict, status: dict):
    return promotion.plan(isvc, jobs, adapters.wanted(isvc, jobs), promotion.records(status),
                          lambda n: _read_job(isvc.metadata.namespace, n), deployment.job_adapter_path)


def _server_for_pod(pods: list[dict]):
    ips = {p["metadata"]["name"]: (p.get("status") or {}).get("podIP") for p in pods}
    return lambda pod: adapters.HTTPServer(f"http://{ips[pod]}:{common.PORT}")


_simulated: dict[str, bool] = {}


def _simulated_node(node_name: str) -> bool:
    """Whether pods on this node run nothing (kwok's fake nodes), cached per node."""
    if not node_name:
        return False
    if node_name not in _simulated:
        node = kube.read(kube.core().read_node, node_name)
        annotations = ((node or {}).get("metadata") or {}).get("annotations") or {}
        _simulated[node_name] = adapters.SIMULATED_NODE_ANNOTATION in annotations
    return _simulated[node_name]


def _apply_children(isvc: InferenceService, jobs: dict[str, FineTuneJob], keep: dict[str, FineTuneJob]) -> str:
    ns, name = isvc.metadata.namespace, isvc.metadata.name
    desired = deployment.build_deployment(isvc, jobs, settings.current.vllm_image, keep)
    kube.apply(desired)
    kube.apply(service.build_service(isvc))
    if disruption.wants_pdb(isvc):
        kube.apply(disruption.build_pdb(isvc))
    else:
        kube.delete_applied("PodDisruptionBudget", ns, name)
    if kube.crd_exists(PODMONITOR_CRD):
        kube.apply(monitoring.build_pod_monitor(isvc))
    keda = kube.crd_exists(KEDA_CRD)
    if isvc.spec.autoscaling and keda:
        kube.apply(autoscaling.build_scaled_object(isvc, PROMETHEUS_URL))
        kube.delete_applied("HorizontalPodAutoscaler", ns, name)
    elif isvc.spec.autoscaling:
        kube.apply(autoscaling.build_hpa(isvc))
    else:
        kube.delete_applied("HorizontalPodAutoscaler", ns, name)
        if keda:
            kube.delete_applied("ScaledObject", ns, name)
    return desired["spec"]["template"]["metadata"]["annotations"][REVISION_ANNOTATION]


def _write_status(obj: dict, isvc: InferenceService, problems, current, pods, revision, replicas, want,
                  gated, prompts) -> bool:
    """Write what changed in the status; returns whether anything did."""
    old = obj.get("status") or {}
    status = status_for(isvc, problems, current, pods, revision, old.get("conditions") or [], now_iso(),
                        replicas, want, gated, prompts)
    changed = {k: v for k, v in status.items() if old.get(k) != v}
    changed.update({k: None for k in ("promotions", "replicaAdapters") if k in old and k not in status})
    if not changed:
        return False
    if old.get("phase") != status["phase"]:
        ready = next(c for c in status["conditions"] if c["type"] == READY)
        log.info("%s/%s: %s -> %s (%s: %s)", isvc.metadata.namespace, isvc.metadata.name, old.get("phase"),
                 status["phase"], ready["reason"], ready["message"])
    kube.patch_status(PLURAL, isvc.metadata.namespace, isvc.metadata.name, changed)
    return True


# A failed reconciliation is retried with exponential backoff (kopf does not retry event
# handlers, and no other event may come): RETRY_BASE, 2x, 4x, ... up to RETRY_MAX seconds.
RETRY_BASE, RETRY_MAX = 2.0, 60.0
_retries: dict[tuple[str, str], tuple[int, threading.Timer | None]] = {}
_retries_lock = threading.Lock()


def reconcile_logged(namespace: str, name: str) -> None:
    """For event handlers: a failure is logged, counted and retried with backoff until a
    reconciliation succeeds."""
    try:
        reconcile(namespace, name)
    except Exception as exc:  # noqa: BLE001 - any failure is retried, none is dropped
        metrics.reconcile_errors.inc()
        delay = _schedule_retry(namespace, name)
        log.warning("%s/%s: reconciling failed (retrying in %.0f s): %s", namespace, name, delay, exc)
    else:
        with _retries_lock:
            attempt, timer = _retries.pop((namespace, name), (0, None))
        if timer is not None:
            timer.cancel()


def _schedule_retry(namespace: str, name: str) -> float:
    key = (namespace, name)
    with _retries_lock:
        attempt, timer = _retries.get(key, (0, None))
        delay = min(RETRY_MAX, RETRY_BASE * (2 ** attempt))
        if timer is not None and timer.is_alive():
            return delay  # one pending retry per InferenceService is enough

        def retry() -> None:
            with _retries_lock:
                _retries[key] = (attempt + 1, None)
            reconcile_logged(namespace, name)

        # In the failed handler's context: kopf's settings and event queue live in context
        # variables, and the FineTuneJob refresh a retry may make posts Events through them.
        timer = threading.Timer(delay, contextvars.copy_context().run, args=(retry,))
        timer.daemon = True
        _retries[key] = (attempt, timer)
        timer.start()
        return delay


# --- what the routes call -----------------------------------------------------------------------


def on_child_event(body: dict, namespace: str) -> None:
    owner = _owner(body)
    if owner:
        reconcile_logged(namespace, owner)


def on_inferenceservice_event(event_type: str | None, body: dict, namespace: str, name: str) -> None:
    references.observe(event_type, body)
    if event_type != "DELETED":
        reconcile_logged(namespace, name)


def on_finetunejob_event(namespace: str, name: str) -> None:
    """A referenced job that succeeds (or is recreated) changes what is served. The servers
    that read it come from the InferenceServices' own events (no LIST per job event)."""
    for server in references.servers_of(namespace, name):
        reconcile_logged(namespace, server)


def _owner(body: dict) -> Optional[str]:
    refs = body.get("metadata", {}).get("ownerReferences") or []
    for ref in refs:
        if ref.get("kind") == InferenceService.KIND:
            return ref["name"]
    if body.get("kind") == "Pod":
        # Pods belong to a ReplicaSet; the label names the InferenceService (same name as
        # the Deployment, or a hashed label value for very long names).
        return body.get("metadata", {}).get("labels", {}).get(INFERENCESERVICE_LABEL)
    return None


# --- FineTuneJob -> InferenceService ----------------------------------------------------------


class DeployConflict(Exception):
    """The job cannot be added to the named InferenceService (the message says why; `reason`
    becomes the job's condition reason)."""

    def __init__(self, message: str, reason: str = "DeployFailed"):
        super().__init__(message)
        self.reason = reason


def ensure_for_finetunejob(job: FineTuneJob | dict, api_client: Optional[client.ApiClient] = None,
                           attempts: int = 5) -> dict:
    """Create the InferenceService spec.deploy names (default: the job's name) serving this job's
    adapter (or merged model), or add/update the adapter entry named after the job.

    Read-modify-write with the resourceVersion, retried on 409; several jobs targeting one
    server each add their own entry. Returns `{"name", "url"}`.
    """
    job = job if isinstance(job, FineTuneJob) else FineTuneJob.from_resource(job)
    deploy = job.spec.deploy
    if deploy is None:
        raise ValueError(f"FineTuneJob {job.metadata.name} has no spec.deploy")
    ns, target = job.metadata.namespace, deploy.inference_service or job.metadata.name
    custom = kube.custom(api_client)
    for _ in range(attempts):
        current = kube.read_own(PLURAL, ns, target, api_client)
        # None: created or changed meanwhile (409); read again
        if current is None:
            done = kube.call(custom.create_namespaced_custom_object, GROUP, VERSION, ns, PLURAL,
                             _new_isvc(job, target), conflict=True)
        else:
            spec = with_deploy_settings(_with_job(current["spec"], job, target), job,
                                        _served_jobs(current, job, api_client))
            if spec == current["spec"]:
                break
            body = {"apiVersion": current["apiVersion"], "kind": current["kind"],
                    "metadata": current["metadata"], "spec": spec}
            done = kube.call(custom.replace_namespaced_custom_object, GROUP, VERSION, ns, PLURAL,
                             target, body, conflict=True)
        if done is not None:
            break
    else:
        raise DeployConflict(f"InferenceService {ns}/{target} kept changing; gave up after {attempts} attempts")
    isvc_stub = InferenceService.from_resource({"metadata": {"name": target, "namespace": ns},
                                                "spec": {"model": {"source": job.spec.model.source}}})
    return {"name": target, "url": service_url(isvc_stub)}


def _new_isvc(job: FineTuneJob, target: str) -> dict:
    model = to_dict(job.spec.model)
    spec: dict = {"model": model, "replicas": 1, "resources": {"gpus": 1}}
    ref = {"fineTuneJobRef": {"name": job.metadata.name}}
    if job.spec.method.uses_adapter:
        spec["adapters"] = [{"name": adapter_name(job), **ref}]
    else:
        spec["mergedModel"] = ref
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": InferenceService.KIND,
            "metadata": {"name": target, "namespace": job.metadata.namespace,
                         "labels": {MANAGED_BY: APP},
                         "annotations": {f"{GROUP}/created-by-finetunejob": job.metadata.name}},
            "spec": with_deploy_settings(spec, job, [])}


# spec.deploy field -> where it goes in the InferenceService's spec
_DEPLOY_FIELDS = {"replicas": ("replicas",), "gpus": ("resources", "gpus"),
                  "nodeSelector": ("resources", "nodeSelector"),
                  "tolerations": ("resources", "tolerations")}


def deploy_settings(job: FineTuneJob) -> dict[str, tuple[tuple[str, ...], object]]:
    """The InferenceService values a job's spec.deploy sets: `{"spec.deploy.<field>": (path in
    the InferenceService's spec, value)}`. Unset fields (and empty maps/lists) set nothing."""
    deploy = job.spec.deploy
    if deploy is None:
        return {}
    given = to_dict(deploy)
    out: dict[str, tuple[tuple[str, ...], object]] = {}
    for key, path in _DEPLOY_FIELDS.items():
        if given.get(key) not in (None, {}, []):
            out[f"spec.deploy.{key}"] = (path, given[key])
    for key, value in (given.get("vllm") or {}).items():
        if value not in (None, []):
            out[f"spec.deploy.vllm.{key}"] = (("vllm", key), value)
    return out


def _targets(job: FineTuneJob, target: str) -> bool:
    return job.spec.deploy is not None and (job.spec.deploy.inference_service or job.metadata.name) == target


def with_deploy_settings(spec: dict, job: FineTuneJob, others: list[FineTuneJob]) -> dict:
    """`spec` (an InferenceService's) with the values `job`'s spec.deploy sets applied: the job's
    value replaces the server's (last deploy wins over a hand edit). `others` are the other jobs
    the server already serves; one whose spec.deploy targets this server and sets the same field
    to another value makes this a DeployConflict naming the field and both values. gpus 0 also
    sets vllm.tensorParallelSize to 1 unless the job sets it (vLLM on CPU shards over nothing)."""
    mine = deploy_settings(job)
    target = job.spec.deploy.inference_service or job.metadata.name
    for other in others:
        if other.metadata.name == job.metadata.name or not _targets(other, target):
            continue
        theirs = deploy_settings(other)
        for field_name, (_, value) in mine.items():
            if field_name in theirs and theirs[field_name][1] != value:
                raise DeployConflict(
                    f"{field_name} is {_show(value)} here but {_show(theirs[field_name][1])} in FineTuneJob "
                    f"{other.metadata.name}, which InferenceService {target} already serves; make "
                    "them agree or unset one of them", reason="DeployConflict")
    spec = {**spec, "resources": dict(spec.get("resources") or {})}
    if "vllm" in spec or any(path[0] == "vllm" for path, _ in mine.values()):
        spec["vllm"] = dict(spec.get("vllm") or {})
    for path, value in mine.values():
        if len(path) == 1:
            spec[path[0]] = value
        else:
            spec[path[0]][path[1]] = value
    if spec["resources"].get("gpus") == 0 and "spec.deploy.vllm.tensorParallelSize" not in mine \
            and spec.get("vllm"):
        spec["vllm"]["tensorParallelSize"] = 1
    if not spec["resources"]:
        spec.pop("resources")
    return spec


def _show(value: object) -> str:
    return json.dumps(value, sort_keys=True)


def _with_job(spec: dict, job: FineTuneJob, target: str) -> dict:
    spec = {**spec}
    ref = {"fineTuneJobRef": {"name": job.metadata.name}}
    if not job.spec.method.uses_adapter:
        if spec.get("adapters"):
            raise DeployConflict(f"FineTuneJob {job.metadata.name} did full fine-tuning (a whole model, no "
                                 f"adapter) but InferenceService {target} serves adapters; deploy it to "
                                 "another InferenceService")
        spec["mergedModel"] = ref
        return spec
    if spec.get("mergedModel"):
        raise DeployConflict(f"InferenceService {target} serves a merged model and cannot take the adapter "
                             f"of FineTuneJob {job.metadata.name}; deploy it to another InferenceService")
    adapters = [dict(a) for a in spec.get("adapters") or []]
    entry = {"name": adapter_name(job), **ref}
    for i, adapter in enumerate(adapters):
        if adapter["name"] == entry["name"]:
            adapters[i] = {**adapter, **ref}  # a new version: its promotion gate, if any, stays
            break
    else:
        adapters.append(entry)
    spec["adapters"] = adapters
    return spec


def adapter_name(job: FineTuneJob) -> str:
    """The name a job's adapter is served under (spec.deploy.adapterName, else the job's name)."""
    return (job.spec.deploy.adapter_name if job.spec.deploy else None) or job.metadata.name


def _served_jobs(current: dict, job: FineTuneJob, api_client: Optional[client.ApiClient]) -> list[FineTuneJob]:
    """The other FineTuneJobs the InferenceService `current` serves (those that still exist)."""
    if not deploy_settings(job):
        return []  # this job sets nothing, so nothing can conflict
    isvc = InferenceService.from_resource(current)
    out = []
    for other in referenced_jobs(isvc):
        if other != job.metadata.name:
            obj = kube.read_own("finetunejobs", job.metadata.namespace, other, api_client)
            if obj is not None:
                out.append(FineTuneJob.from_resource(obj))
    return out


def served_by(job: FineTuneJob, api_client: Optional[client.ApiClient] = None) -> Optional[str]:
    """The InferenceService that spec.deploy put this job in, if it still serves it."""
    if job.spec.deploy is None:
        return None
    target = job.spec.deploy.inference_service or job.metadata.name
    current = kube.read_own(PLURAL, job.metadata.namespace, target, api_client)
    if current is None:
        return None
    spec = current.get("spec") or {}
    refs = [(a.get("fineTuneJobRef") or {}).get("name") for a in spec.get("adapters") or []]
    refs.append(((spec.get("mergedModel") or {}).get("fineTuneJobRef") or {}).get("name"))
    return target if job.metadata.name in refs else None


def withdraw_finetunejob(job: FineTuneJob, api_client: Optional[client.ApiClient] = None,
                         attempts: int = 5) -> Optional[str]:
    """Take away what spec.deploy added, as the job goes: its adapter entry (the other
    adapters keep serving), or the whole InferenceService when this job created it and
    nothing else is left in it. Returns what was done, or None."""
    target = served_by(job, api_client)
    if target is None:
        return None
    ns, custom = job.metadata.namespace, kube.custom(api_client)
    for _ in range(attempts):
        current = kube.read_own(PLURAL, ns, target, api_client)
        if current is None:
            return None
        spec = dict(current["spec"])
        adapters = [a for a in spec.get("adapters") or []
                    if (a.get("fineTuneJobRef") or {}).get("name") != job.metadata.name]
        merged = ((spec.get("mergedModel") or {}).get("fineTuneJobRef") or {}).get("name") == job.metadata.name
        created_here = (current["metadata"].get("annotations") or {}).get(
            f"{GROUP}/created-by-finetunejob") == job.metadata.name
        if created_here and not adapters and (merged or not spec.get("mergedModel")):
            kube.delete(custom.delete_namespaced_custom_object, GROUP, VERSION, ns, PLURAL, target)
            return f"deleted InferenceService {target}, which served only this job"
        if merged:
            spec.pop("mergedModel", None)
        if adapters:
            spec["adapters"] = adapters
        else:
            spec.pop("adapters", None)
        body = {"apiVersion": current["apiVersion"], "kind": current["kind"],
                "metadata": current["metadata"], "spec": spec}
        if kube.call(custom.replace_namespaced_custom_object, GROUP, VERSION, ns, PLURAL, target, body,
                     conflict=True) is not None:
            return f"removed this job's {'model' if merged else 'adapter'} from InferenceService {target}"
    raise DeployConflict(f"InferenceService {ns}/{target} kept changing; gave up after {attempts} attempts")
