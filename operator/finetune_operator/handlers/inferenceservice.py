"""InferenceService handlers: check what is to be served, apply the vLLM children, write status.

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

import logging
import os
import threading
from contextlib import contextmanager
from typing import Optional

import kopf
from kubernetes import client
from kubernetes.client.rest import ApiException

from finetune_api.models import FineTuneJob, InferenceService, to_dict
from finetune_api.schema import GROUP, VERSION

from finetune_operator import serving, settings
from finetune_operator.builders import inference
from finetune_operator.conditions import FALSE, TRUE, ConditionUpdate, now_iso, set_conditions
from finetune_operator.handlers import api
from finetune_operator.labels import APP, MANAGED_BY

PLURAL = "inferenceservices"
FIELD_MANAGER = "finetune-operator"
APPLY_PATCH = "application/apply-patch+yaml"
READY, PROGRESSING, DEGRADED = "Ready", "Progressing", "Degraded"
CHILD_SELECTOR = {MANAGED_BY: APP, inference.INFERENCESERVICE_LABEL: kopf.PRESENT}
PROMETHEUS_URL = os.environ.get("FINETUNE_PROMETHEUS_URL", inference.DEFAULT_PROMETHEUS)
PODMONITOR_CRD = "podmonitors.monitoring.coreos.com"
KEDA_CRD = "scaledobjects.keda.sh"
# Kinds the operator applies: (group, version, plural); "" is the core group.
PLURALS = {
    "Deployment": ("apps", "v1", "deployments"),
    "Service": ("", "v1", "services"),
    "PodDisruptionBudget": ("policy", "v1", "poddisruptionbudgets"),
    "PodMonitor": ("monitoring.coreos.com", "v1", "podmonitors"),
    "HorizontalPodAutoscaler": ("autoscaling", "v2", "horizontalpodautoscalers"),
    "ScaledObject": ("keda.sh", "v1alpha1", "scaledobjects"),
}
log = logging.getLogger("finetune_operator.inferenceservice")

_locks: dict[tuple[str, str], threading.Lock] = {}
_locks_guard = threading.Lock()


@contextmanager
def _locked(namespace: str, name: str):
    with _locks_guard:
        lock = _locks.setdefault((namespace, name), threading.Lock())
    with lock:
        yield


# --- the API ----------------------------------------------------------------------------------


def _custom(api_client=None) -> client.CustomObjectsApi:
    return client.CustomObjectsApi(api_client or api())


def _as_dict(obj) -> dict:
    return api().sanitize_for_serialization(obj)


def _apply(body: dict) -> None:
    group, version, plural = PLURALS[body["kind"]]
    ns, name = body["metadata"]["namespace"], body["metadata"]["name"]
    if group == "":
        getattr(client.CoreV1Api(api()), f"patch_namespaced_{body['kind'].lower()}")(
            name, ns, body, field_manager=FIELD_MANAGER, force=True, _content_type=APPLY_PATCH)
        return
    _custom().patch_namespaced_custom_object(group, version, ns, plural, name, body, field_manager=FIELD_MANAGER,
                                             force=True, _content_type=APPLY_PATCH)


def _delete(kind: str, namespace: str, name: str) -> None:
    group, version, plural = PLURALS[kind]
    try:
        _custom().delete_namespaced_custom_object(group, version, namespace, plural, name)
    except ApiException as e:
        if e.status != 404:
            raise


def _crd_exists(name: str) -> bool:
    try:
        client.ApiextensionsV1Api(api()).read_custom_resource_definition(name)
        return True
    except ApiException as e:
        if e.status in (403, 404):
            return False
        raise


def _read_job(namespace: str, name: str) -> Optional[FineTuneJob]:
    try:
        return FineTuneJob.from_resource(_custom().get_namespaced_custom_object(
            GROUP, VERSION, namespace, "finetunejobs", name))
    except ApiException as e:
        if e.status == 404:
            return None
        raise


def _read_isvc(namespace: str, name: str, api_client=None) -> Optional[dict]:
    try:
        return _custom(api_client).get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    except ApiException as e:
        if e.status == 404:
            return None
        raise


def _read_deployment(namespace: str, name: str) -> Optional[dict]:
    try:
        return _as_dict(client.AppsV1Api(api()).read_namespaced_deployment(name, namespace))
    except ApiException as e:
        if e.status == 404:
            return None
        raise


def _pods(isvc: InferenceService) -> list[dict]:
    selector = ",".join(f"{k}={v}" for k, v in inference.selector(isvc).items())
    pods = client.CoreV1Api(api()).list_namespaced_pod(isvc.metadata.namespace, label_selector=selector)
    return [_as_dict(p) for p in pods.items]


# --- reconciliation ---------------------------------------------------------------------------


def reconcile(namespace: str, name: str) -> None:
    with _locked(namespace, name):
        obj = _read_isvc(namespace, name)
        if obj is None or obj["metadata"].get("deletionTimestamp"):
            return
        isvc = InferenceService.from_resource(obj)
        jobs = {n: _read_job(namespace, n) for n in serving.referenced_jobs(isvc)}
        problems = serving.check(isvc, jobs)
        revision = (obj.get("status") or {}).get("revision")
        if not problems:
            revision = _apply_children(isvc, jobs)
        deployment = _read_deployment(namespace, name)
        pods = _pods(isvc) if deployment else []
        _write_status(obj, isvc, problems, deployment, pods, revision)


def _apply_children(isvc: InferenceService, jobs: dict[str, FineTuneJob]) -> str:
    ns, name = isvc.metadata.namespace, isvc.metadata.name
    deployment = inference.build_deployment(isvc, jobs, settings.current.vllm_image)
    _apply(deployment)
    _apply(inference.build_service(isvc))
    if inference.wants_pdb(isvc):
        _apply(inference.build_pdb(isvc))
    else:
        _delete("PodDisruptionBudget", ns, name)
    if _crd_exists(PODMONITOR_CRD):
        _apply(inference.build_pod_monitor(isvc))
    keda = _crd_exists(KEDA_CRD)
    if isvc.spec.autoscaling and keda:
        _apply(inference.build_scaled_object(isvc, PROMETHEUS_URL))
        _delete("HorizontalPodAutoscaler", ns, name)
    elif isvc.spec.autoscaling:
        _apply(inference.build_hpa(isvc))
    else:
        _delete("HorizontalPodAutoscaler", ns, name)
        if keda:
            _delete("ScaledObject", ns, name)
    return deployment["spec"]["template"]["metadata"]["annotations"][inference.REVISION_ANNOTATION]


def status_for(isvc: InferenceService, problems: list[serving.Problem], deployment: Optional[dict],
               pods: list[dict], revision: Optional[str], existing_conditions: list[dict], now: str) -> dict:
    """The status to write (pure): problems with the spec first, then the rollout's state."""
    generation = isvc.metadata.generation
    state = serving.rollout(deployment, pods, revision or "")
    status: dict = {"observedGeneration": generation, "url": inference.service_url(isvc),
                    "servedModels": inference.served_models(isvc), "revision": revision,
                    "replicas": state.replicas, "readyReplicas": state.ready_replicas}
    if problems:
        waiting = all(p.waiting for p in problems)
        phase = serving.PENDING if waiting else serving.FAILED
        reason = problems[0].reason if len({p.reason for p in problems}) == 1 else (
            "WaitingForFineTuneJobs" if waiting else "InvalidSpec")
        message = "; ".join(p.message for p in problems)
        if deployment:
            message += f" (the Deployment is left as it was: {state.ready_replicas} ready replica(s) " \
                       "keep serving the previous configuration)"
        updates = [ConditionUpdate(READY, FALSE, reason, message),
                   ConditionUpdate(PROGRESSING, FALSE, reason, message),
                   ConditionUpdate(DEGRADED, FALSE if waiting else TRUE, reason, message)]
    else:
        phase = state.phase
        updates = [
            ConditionUpdate(READY, TRUE if phase == serving.READY else FALSE, state.reason, state.message),
            ConditionUpdate(PROGRESSING, TRUE if phase == serving.PROGRESSING else FALSE, state.reason,
                            state.message),
            ConditionUpdate(DEGRADED, TRUE if phase == serving.DEGRADED else FALSE, state.reason, state.message),
        ]
    status["phase"] = phase
    status["conditions"] = set_conditions(existing_conditions, updates, generation=generation, now=now)
    return {k: v for k, v in status.items() if v is not None}


def _write_status(obj: dict, isvc: InferenceService, problems, deployment, pods, revision) -> None:
    old = obj.get("status") or {}
    status = status_for(isvc, problems, deployment, pods, revision, old.get("conditions") or [], now_iso())
    changed = {k: v for k, v in status.items() if old.get(k) != v}
    if not changed:
        return
    if old.get("phase") != status["phase"]:
        ready = next(c for c in status["conditions"] if c["type"] == READY)
        log.info("%s/%s: %s -> %s (%s: %s)", isvc.metadata.namespace, isvc.metadata.name, old.get("phase"),
                 status["phase"], ready["reason"], ready["message"])
    _custom().patch_namespaced_custom_object_status(GROUP, VERSION, isvc.metadata.namespace, PLURAL,
                                                    isvc.metadata.name, {"status": changed})


def _reconcile_logged(namespace: str, name: str) -> None:
    try:
        reconcile(namespace, name)
    except ApiException as e:
        # Event handlers are not retried; the next event of the object or its children is.
        log.warning("%s/%s: reconciling failed: %s %s %s", namespace, name, e.status, e.reason,
                    (e.body or "")[:500])


# --- kopf wiring ------------------------------------------------------------------------------


@kopf.on.event(GROUP, VERSION, PLURAL)
def inferenceservice_event(type: str, namespace: str, name: str, **_) -> None:
    if type != "DELETED":
        _reconcile_logged(namespace, name)


@kopf.on.event("apps", "v1", "deployments", labels=CHILD_SELECTOR)
@kopf.on.event("v1", "pods", labels=CHILD_SELECTOR)
def child_event(body: dict, namespace: str, **_) -> None:
    owner = _owner(body)
    if owner:
        _reconcile_logged(namespace, owner)


@kopf.on.event(GROUP, VERSION, "finetunejobs")
def finetunejob_event(type: str, namespace: str, name: str, **_) -> None:
    """A referenced job that succeeds (or is recreated) changes what is served."""
    for obj in _custom().list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)["items"]:
        isvc = InferenceService.from_resource(obj)
        if name in serving.referenced_jobs(isvc):
            _reconcile_logged(namespace, isvc.metadata.name)


def _owner(body: dict) -> Optional[str]:
    refs = body.get("metadata", {}).get("ownerReferences") or []
    for ref in refs:
        if ref.get("kind") == InferenceService.KIND:
            return ref["name"]
    if body.get("kind") == "Pod":
        # Pods belong to a ReplicaSet; the label names the InferenceService (same name as
        # the Deployment, or a hashed label value for very long names).
        return body.get("metadata", {}).get("labels", {}).get(inference.INFERENCESERVICE_LABEL)
    return None


# --- FineTuneJob -> InferenceService ----------------------------------------------------------


class DeployConflict(Exception):
    """The job cannot be added to the named InferenceService (the message says why)."""


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
    custom = _custom(api_client)
    for _ in range(attempts):
        current = _read_isvc(ns, target, api_client)
        try:
            if current is None:
                custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, _new_isvc(job, target))
            else:
                spec = _with_job(current["spec"], job, target)
                if spec == current["spec"]:
                    break
                body = {"apiVersion": current["apiVersion"], "kind": current["kind"],
                        "metadata": current["metadata"], "spec": spec}
                custom.replace_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, target, body)
            break
        except ApiException as e:
            if e.status != 409:  # 409: created or changed meanwhile; read again
                raise
    else:
        raise DeployConflict(f"InferenceService {ns}/{target} kept changing; gave up after {attempts} attempts")
    isvc_stub = InferenceService.from_resource({"metadata": {"name": target, "namespace": ns},
                                                "spec": {"model": {"source": job.spec.model.source}}})
    return {"name": target, "url": inference.service_url(isvc_stub)}


def _new_isvc(job: FineTuneJob, target: str) -> dict:
    deploy = job.spec.deploy
    model = to_dict(job.spec.model)
    resources: dict = {"gpus": deploy.gpus}
    if deploy.node_selector:
        resources["nodeSelector"] = dict(deploy.node_selector)
    if deploy.tolerations:
        resources["tolerations"] = [to_dict(t) for t in deploy.tolerations]
    spec: dict = {"model": model, "replicas": deploy.replicas, "resources": resources}
    if deploy.vllm:
        spec["vllm"] = to_dict(deploy.vllm)
        if deploy.gpus == 0:
            spec["vllm"]["tensorParallelSize"] = 1
    ref = {"fineTuneJobRef": {"name": job.metadata.name}}
    if job.spec.method.uses_adapter:
        spec["adapters"] = [{"name": job.metadata.name, **ref}]
    else:
        spec["mergedModel"] = ref
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": InferenceService.KIND,
            "metadata": {"name": target, "namespace": job.metadata.namespace,
                         "labels": {MANAGED_BY: APP},
                         "annotations": {f"{GROUP}/created-by-finetunejob": job.metadata.name}},
            "spec": spec}


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
    entry = {"name": job.metadata.name, **ref}
    for i, adapter in enumerate(adapters):
        if adapter["name"] == job.metadata.name:
            adapters[i] = entry
            break
    else:
        adapters.append(entry)
    spec["adapters"] = adapters
    return spec
