"""Checks the schema cannot make: does what the spec names exist in the cluster, and can
any node hold one trainer pod, does the trainer config fit in a ConfigMap? Pure: the
facts are gathered by the handler.

A missing Secret, claim or PriorityClass is retried (creating it later lets the job go on).
A trainer pod larger than every current node is not a problem by default: GPU pools that
scale from zero (cluster-autoscaler, Karpenter) or are provisioned through Kueue add nodes only
for pods that exist and wait, so the Job is created and the job stays Pending with the
scheduler's message (`capacity_note` says why up front). Failing for good instead is opt-in,
for clusters that cannot grow (`--capacity-policy fail`). A job that already has a trainer Job
is never failed by admission.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from finetune_api.models import FineTuneJob

from finetune_operator.builders.trainer_config import (
    MLFLOW_SECRET_KEYS, OBJECT_STORAGE_REQUIRED_KEYS, config_too_large, other_claims,
)


@dataclass
class ClusterFacts:
    secrets: dict[str, set[str]] = field(default_factory=dict)  # name -> keys
    claims: set[str] = field(default_factory=set)
    priority_classes: set[str] | None = None  # None: could not be read, not checked
    node_gpus: list[int] | None = None  # allocatable nvidia.com/gpu of each node; None: unknown


@dataclass(frozen=True)
class Problem:
    reason: str
    message: str
    retryable: bool


def secret_refs(job: FineTuneJob) -> list[tuple[str, object]]:
    refs = []
    if job.spec.model.token_secret_ref:
        refs.append(("spec.model.tokenSecretRef", job.spec.model.token_secret_ref))
    push = job.spec.output.push
    if push and push.token_secret_ref:
        refs.append(("spec.output.push.tokenSecretRef", push.token_secret_ref))
    tracking = job.spec.tracking
    if tracking and tracking.wandb and tracking.wandb.api_key_secret_ref:
        refs.append(("spec.tracking.wandb.apiKeySecretRef", tracking.wandb.api_key_secret_ref))
    return refs


def secret_names(job: FineTuneJob) -> list[str]:
    """Every Secret the job names (whose keys admission reads)."""
    names = [ref.name for _, ref in secret_refs(job)]
    tracking = job.spec.tracking
    if tracking and tracking.mlflow and tracking.mlflow.secret_ref:
        names.append(tracking.mlflow.secret_ref.name)
    if job.spec.object_storage:
        names.append(job.spec.object_storage.secret_ref.name)
    return list(dict.fromkeys(names))


def claims_to_check(job: FineTuneJob) -> list[tuple[str, str]]:
    out = []
    if job.spec.storage.existing_claim:
        out.append(("spec.storage.existingClaim", job.spec.storage.existing_claim))
    out += [("a pvc:// source", c.claim) for c in other_claims(job)]
    return out


RETRY_NOTE = "the job starts as soon as it exists (checked again every few seconds)"


CAPACITY_WAIT, CAPACITY_FAIL = "wait", "fail"
CAPACITY_POLICIES = (CAPACITY_WAIT, CAPACITY_FAIL)


def capacity_note(job: FineTuneJob, facts: ClusterFacts) -> str | None:
    """Why no current node can run a trainer pod, or None when one can (or nobody knows)."""
    gpus = job.spec.resources.gpus_per_node
    if gpus <= 0 or facts.node_gpus is None:
        return None
    largest = max(facts.node_gpus, default=0)
    if gpus <= largest:
        return None
    return (f"spec.resources.gpusPerNode is {gpus} but the largest current node has {largest} "
            f"allocatable nvidia.com/gpu")


def check(job: FineTuneJob, facts: ClusterFacts, *, capacity_policy: str = CAPACITY_WAIT,
          has_trainer: bool = False) -> Problem | None:
    ns = job.metadata.namespace
    for where, ref in secret_refs(job):
        if ref.name not in facts.secrets:
            return Problem("SecretNotFound", f"{where}: Secret {ns}/{ref.name} does not exist; "
                           f"create it and {RETRY_NOTE}", True)
        if ref.key not in facts.secrets[ref.name]:
            return Problem("SecretKeyNotFound", f"{where}: Secret {ns}/{ref.name} has no key "
                           f"{ref.key!r} (keys: {', '.join(sorted(facts.secrets[ref.name])) or 'none'}); "
                           f"add it and {RETRY_NOTE}", True)
    tracking = job.spec.tracking
    if tracking and tracking.mlflow and tracking.mlflow.secret_ref:
        secret = tracking.mlflow.secret_ref.name
        if secret not in facts.secrets:
            return Problem("SecretNotFound", f"spec.tracking.mlflow.secretRef: Secret {ns}/{secret} does not "
                           f"exist; create it and {RETRY_NOTE}", True)
        if not set(MLFLOW_SECRET_KEYS) & set(facts.secrets[secret]):
            return Problem("SecretKeyNotFound", f"spec.tracking.mlflow.secretRef: Secret {ns}/{secret} has "
                           f"none of the keys {', '.join(MLFLOW_SECRET_KEYS)} (keys: "
                           f"{', '.join(sorted(facts.secrets[secret])) or 'none'}); add them and {RETRY_NOTE}", True)
    storage = job.spec.object_storage
    if storage:
        secret = storage.secret_ref.name
        if secret not in facts.secrets:
            return Problem("SecretNotFound", f"spec.objectStorage.secretRef: Secret {ns}/{secret} does "
                           f"not exist; create it and {RETRY_NOTE}", True)
        missing = [k for k in OBJECT_STORAGE_REQUIRED_KEYS if k not in facts.secrets[secret]]
        if missing:
            return Problem("SecretKeyNotFound", f"spec.objectStorage.secretRef: Secret {ns}/{secret} has "
                           f"no key {', '.join(missing)} (keys: "
                           f"{', '.join(sorted(facts.secrets[secret])) or 'none'}); add it and {RETRY_NOTE}", True)
    for where, claim in claims_to_check(job):
        if claim not in facts.claims:
            return Problem("ClaimNotFound", f"{where}: PersistentVolumeClaim {ns}/{claim} does not "
                           f"exist; create it and {RETRY_NOTE}", True)
    pc = job.spec.resources.priority_class_name
    if pc and facts.priority_classes is not None and pc not in facts.priority_classes:
        return Problem("PriorityClassNotFound", f"spec.resources.priorityClassName: PriorityClass "
                       f"{pc} does not exist; create it and {RETRY_NOTE}", True)
    if not job.status.trainer_job:  # a job with a Job had a config that fit
        too_large = config_too_large(job)
        if too_large:
            return Problem("TrainerConfigTooLarge", too_large, False)
    note = capacity_note(job, facts)
    if note and capacity_policy == CAPACITY_FAIL and not has_trainer:
        return Problem("InsufficientGPUCapacity",
                       f"{note}, and this operator runs with --capacity-policy fail (the cluster cannot "
                       f"grow): no node can run a trainer pod. Lower gpusPerNode (and raise nodes) and "
                       f"create the job again", False)
    return None
