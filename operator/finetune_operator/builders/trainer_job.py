"""The trainer Job (and, for multi-node runs, its headless Service).

One Job per FineTuneJob, named deterministically: a restarted operator that creates it
again gets 409 AlreadyExists and carries on. Retries are the Job's own pods:
`podFailurePolicy` fails the Job at once on the trainer's permanent exit code (bad data or
config) and ignores disruptions (preemption, drain), so only real crashes count against
`backoffLimit`. `podReplacementPolicy: Failed` starts a replacement only after the old pod
is gone, so two trainers never write checkpoints to the volume at the same time.
"""

from __future__ import annotations

import hashlib
import json

from finetune_api import layout
from finetune_api.exitcodes import PERMANENT
from finetune_api.layout import WORKSPACE
from finetune_api.models import FineTuneJob, to_dict
from finetune_api.schema import GROUP, IMMUTABLE_SECTIONS

from finetune_operator import names
from finetune_operator.builders import object_meta
from finetune_operator.builders.placement import GPU_RESOURCE, place
from finetune_operator.builders.storage import WORKSPACE_VOLUME, claim_name
from finetune_operator.builders.trainer_config import (
    CONFIG_DIR, CONFIG_PATH, MLFLOW_SECRET_KEYS, MODEL_TOKEN_ENV, OBJECT_STORAGE_KEYS,
    OBJECT_STORAGE_REQUIRED_KEYS, PUSH_TOKEN_ENV, TRAINER_METRICS_PORT, WANDB_KEY_ENV, other_claims,
    pod_config, results_mount,
)
from finetune_operator.labels import FINETUNEJOB_NAME_ANNOTATION, KUEUE_QUEUE, labels_for

COMPONENT = "trainer"
CONTAINER = "trainer"
BACKOFF_LIMIT = 3
TERMINATION_GRACE_SECONDS = 120  # the trainer writes a checkpoint on SIGTERM
MASTER_PORT = 29500
RUN_AS_USER = 1000
# The spec sections a trainer Job was built from, hashed: a spec edited before training
# started (a job Kueue still queues, or one created suspended) is seen by its Job's digest, and
# the Job is built again (handlers/finetunejob.py). Once training started, CEL freezes them.
SPEC_DIGEST_ANNOTATION = f"{GROUP}/spec-digest"


def spec_digest(job: FineTuneJob) -> str:
    """The spec sections that are immutable once training started (schema.IMMUTABLE_SECTIONS),
    hashed: the same digest for the same trainer Job."""
    sections = {s: to_dict(getattr(job.spec, s)) for s in IMMUTABLE_SECTIONS}
    return hashlib.sha256(json.dumps(sections, sort_keys=True, default=str).encode()).hexdigest()[:16]


# Restarts of the worker group (a node lost or replaced) before the pods fail; the Job's
# backoffLimit counts what is left after that.
MAX_RESTARTS = 3
# The launcher's share of the grace period: workers checkpoint within it, the rest is slack.
WORKER_GRACE_SECONDS = TERMINATION_GRACE_SECONDS - 10


def trainer_command(job: FineTuneJob) -> list[str]:
    """The container command, as a list (no shell ever sees a user string).

    Several processes (GPUs or nodes) go through the trainer's launcher (`finetune_trainer
    launch`, wrapping torchrun): it gives the pod one exit code (42 or 43) and one termination
    message, forwards SIGTERM with the pod's grace period, and for several nodes joins an
    elastic c10d rendezvous whose store pod 0's launcher hosts under the headless Service.
    """
    res = job.spec.resources
    if res.nodes <= 1 and res.gpus_per_node <= 1:
        return ["python", "-m", "finetune_trainer", "train", "--config", CONFIG_PATH]
    command = ["python", "-m", "finetune_trainer", "launch", "--config", CONFIG_PATH,
               "--nproc-per-node", str(max(res.gpus_per_node, 1)),
               "--grace-seconds", str(WORKER_GRACE_SECONDS)]
    if res.nodes > 1:
        job_name = names.trainer_job(job.metadata.name)
        service = names.trainer_service(job.metadata.name)
        command += ["--nnodes", str(res.nodes), "--node-rank", "$(JOB_COMPLETION_INDEX)",
                    "--rdzv-endpoint", f"{job_name}-0.{service}:{MASTER_PORT}",
                    "--rdzv-id", job.metadata.uid or job.metadata.name,
                    "--max-restarts", str(MAX_RESTARTS),
                    "--local-addr", f"{job_name}-$(JOB_COMPLETION_INDEX).{service}"]
    return command


def _resources(job: FineTuneJob) -> dict:
    res = job.spec.resources
    requests: dict[str, str] = {}
    limits: dict[str, str] = {}
    if res.cpu:
        requests["cpu"] = limits["cpu"] = res.cpu
    if res.memory:
        requests["memory"] = limits["memory"] = res.memory
    if res.gpus_per_node > 0:
        requests[GPU_RESOURCE] = limits[GPU_RESOURCE] = str(res.gpus_per_node)
    out = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out


def _secret_env(name: str, ref) -> dict:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}}


def _env(job: FineTuneJob, image: str) -> list[dict]:
    env = [{"name": "HF_HOME", "value": layout.under(WORKSPACE, layout.HF_CACHE)},
           # Recorded in the model card, so an artifact says which trainer made it.
           {"name": "FINETUNE_IMAGE", "value": image},
           {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
           # The trainer fails fast (GPUUnavailable) when CUDA cannot use the GPUs it was given.
           {"name": "FINETUNE_GPUS_PER_NODE", "value": str(job.spec.resources.gpus_per_node)}]
    if job.spec.model.token_secret_ref:
        env.append(_secret_env(MODEL_TOKEN_ENV, job.spec.model.token_secret_ref))
    push = job.spec.output.push
    if push and push.token_secret_ref:
        env.append(_secret_env(PUSH_TOKEN_ENV, push.token_secret_ref))
    tracking = job.spec.tracking
    if tracking and tracking.mlflow and tracking.mlflow.secret_ref:
        # Named keys only (not envFrom): a Secret cannot set other variables such as PATH.
        # Each is optional: a token, or a username and password.
        env += [{"name": key, "valueFrom": {"secretKeyRef": {
            "name": tracking.mlflow.secret_ref.name, "key": key, "optional": True}}}
            for key in MLFLOW_SECRET_KEYS]
    if tracking and tracking.wandb and tracking.wandb.api_key_secret_ref:
        env.append(_secret_env(WANDB_KEY_ENV, tracking.wandb.api_key_secret_ref))
    if job.spec.object_storage:
        secret = job.spec.object_storage.secret_ref.name
        env += [{"name": key, "valueFrom": {"secretKeyRef": {
            "name": secret, "key": key, "optional": key not in OBJECT_STORAGE_REQUIRED_KEYS}}}
            for key in OBJECT_STORAGE_KEYS]
    return env


def _volumes(job: FineTuneJob, config_volume: dict) -> tuple[list[dict], list[dict]]:
    volumes = [
        {"name": WORKSPACE_VOLUME, "persistentVolumeClaim": {"claimName": claim_name(job)}},
        config_volume,
        {"name": "tmp", "emptyDir": {}},
    ]
    mounts = [
        {"name": WORKSPACE_VOLUME, "mountPath": WORKSPACE},
        {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    if job.spec.resources.gpus_per_node > 0:
        # PyTorch data loaders and NCCL need more shared memory than a container's default.
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory"}})
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
    for i, claim in enumerate(other_claims(job)):
        volumes.append({"name": f"claim-{i}", "persistentVolumeClaim": {
            "claimName": claim.claim, "readOnly": True}})
        mounts.append({"name": f"claim-{i}", "mountPath": claim.path, "readOnly": True})
    results = results_mount(job)
    if results is not None:
        volumes.append({"name": "results", "persistentVolumeClaim": {"claimName": results.claim}})
        mounts.append({"name": "results", "mountPath": layout.RESULTS_DIR, "subPath": results.path})
    return volumes, mounts


def build_pod_template(job: FineTuneJob, image: str) -> dict:
    res = job.spec.resources
    config_annotations, config_volume = pod_config(job)
    volumes, mounts = _volumes(job, config_volume)
    image = res.image or image
    container = {
        "name": CONTAINER,
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "command": trainer_command(job),
        "env": _env(job, image),
        "ports": [{"name": "metrics", "containerPort": TRAINER_METRICS_PORT}],
        "resources": _resources(job),
        "volumeMounts": mounts,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": {"allowPrivilegeEscalation": False, "runAsNonRoot": True,
                            "capabilities": {"drop": ["ALL"]}},
    }
    if res.nodes > 1:
        container["ports"].append({"name": "rendezvous", "containerPort": MASTER_PORT})
    spec: dict = {
        "restartPolicy": "Never",
        "serviceAccountName": names.trainer_service_account(job.metadata.name),
        "automountServiceAccountToken": True,
        "terminationGracePeriodSeconds": TERMINATION_GRACE_SECONDS,
        "securityContext": {"runAsNonRoot": True, "runAsUser": RUN_AS_USER,
                            "runAsGroup": RUN_AS_USER, "fsGroup": RUN_AS_USER,
                            "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [container],
        "volumes": volumes,
    }
    place(spec, gpus=res.gpus_per_node, node_selector=res.node_selector, tolerations=res.tolerations,
          affinity=res.affinity, priority_class_name=res.priority_class_name)
    if res.nodes > 1:
        spec["subdomain"] = names.trainer_service(job.metadata.name)
    return {"metadata": {"labels": labels_for(job.metadata.name, COMPONENT),
                         "annotations": {FINETUNEJOB_NAME_ANNOTATION: job.metadata.name,
                                         **config_annotations}}, "spec": spec}


def build_trainer_job(job: FineTuneJob, image: str, *, suspend: bool | None = None) -> dict:
    """The trainer Job. `suspend` defaults to what the spec and Kueue ask for at creation."""
    res = job.spec.resources
    meta = object_meta(job, names.trainer_job(job.metadata.name), COMPONENT)
    meta["annotations"] = {SPEC_DIGEST_ANNOTATION: spec_digest(job)}
    if res.queue_name:
        meta["labels"][KUEUE_QUEUE] = res.queue_name
    if suspend is None:
        # Kueue admits a queued Job by unsuspending it; it must be created suspended.
        suspend = bool(res.queue_name) or job.spec.suspend
    spec: dict = {
        "backoffLimit": BACKOFF_LIMIT,
        "podReplacementPolicy": "Failed",
        "podFailurePolicy": {"rules": [
            {"action": "FailJob",
             "onExitCodes": {"containerName": CONTAINER, "operator": "In", "values": [PERMANENT]}},
            {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
        ]},
        "suspend": suspend,
        "template": build_pod_template(job, image),
    }
    if res.active_deadline_seconds:
        spec["activeDeadlineSeconds"] = res.active_deadline_seconds
    if res.nodes > 1:
        spec.update({"completionMode": "Indexed", "completions": res.nodes, "parallelism": res.nodes})
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta, "spec": spec}


def build_headless_service(job: FineTuneJob) -> dict | None:
    """The Service giving multi-node trainer pods stable DNS names; None for one node."""
    if job.spec.resources.nodes <= 1:
        return None
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": object_meta(job, names.trainer_service(job.metadata.name), COMPONENT),
            "spec": {"clusterIP": "None", "publishNotReadyAddresses": True,
                     "selector": {"batch.kubernetes.io/job-name": names.trainer_job(job.metadata.name)},
                     "ports": [{"name": "rendezvous", "port": MASTER_PORT,
                                "targetPort": MASTER_PORT}]}}
