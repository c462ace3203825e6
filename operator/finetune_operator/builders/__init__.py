"""Pure builders: a typed FineTuneJob in, the desired child object as a dict out.

Nothing here talks to the API server; handlers apply what these return.
"""

from __future__ import annotations

from finetune_api.models import FineTuneJob
from finetune_api.schema import API_VERSION

from finetune_operator.labels import labels_for


def owner_reference(job: FineTuneJob) -> dict:
    return {"apiVersion": API_VERSION, "kind": FineTuneJob.KIND, "name": job.metadata.name,
            "uid": job.metadata.uid, "controller": True, "blockOwnerDeletion": True}


def object_meta(job: FineTuneJob, name: str, component: str, *, owned: bool = True) -> dict:
    meta = {"name": name, "namespace": job.metadata.namespace,
            "labels": labels_for(job.metadata.name, component)}
    if owned:
        meta["ownerReferences"] = [owner_reference(job)]
    return meta
