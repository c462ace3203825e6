"""The job volume: a PersistentVolumeClaim mounted at /workspace in the trainer.

With `reclaimPolicy: Delete` the claim is owned by the FineTuneJob and the garbage
collector removes it with the job. With `Retain` it carries no owner reference, so deleting
the FineTuneJob leaves it (and the checkpoints and artifacts on it) in place. A claim named
by `existingClaim` is the user's: it is never created, owned or deleted.
"""

from __future__ import annotations

from finetune_api.layout import WORKSPACE
from finetune_api.models import FineTuneJob

from finetune_operator import names
from finetune_operator.builders import object_meta, owner_reference

WORKSPACE_VOLUME = "workspace"
COMPONENT = "workspace"
DEFAULT_ACCESS_MODES = ["ReadWriteOnce"]


def claim_name(job: FineTuneJob) -> str:
    return job.spec.storage.existing_claim or names.workspace_claim(job.metadata.name)


def owns_claim(job: FineTuneJob) -> bool:
    return job.spec.storage.existing_claim is None and job.spec.storage.reclaim_policy == "Delete"


def build_workspace_claim(job: FineTuneJob) -> dict | None:
    """The PVC to create, or None when the spec names an existing claim."""
    storage = job.spec.storage
    if storage.existing_claim:
        return None
    access_modes = list(storage.access_modes or DEFAULT_ACCESS_MODES)
    if job.spec.resources.nodes > 1 and storage.access_modes is None:
        # Every node of a multi-node run writes checkpoints to the same volume.
        access_modes = ["ReadWriteMany"]
    spec: dict = {"accessModes": access_modes,
                  "resources": {"requests": {"storage": storage.size}}}
    if storage.storage_class_name:
        spec["storageClassName"] = storage.storage_class_name
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": object_meta(job, claim_name(job), COMPONENT, owned=owns_claim(job)),
            "spec": spec}


def desired_owner_references(job: FineTuneJob, current: list[dict]) -> list[dict]:
    """The claim's owner references per reclaim policy, keeping owners that are not ours."""
    others = [ref for ref in current or [] if ref.get("uid") != job.metadata.uid]
    return others + [owner_reference(job)] if owns_claim(job) else others
