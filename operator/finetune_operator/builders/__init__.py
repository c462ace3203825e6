"""Pure builders: a typed FineTuneJob in, the desired child object as a dict out (the
InferenceService's children are built in `finetune_operator.serving`).

Nothing here talks to the API server; handlers apply what these return.
"""

from __future__ import annotations

from typing import Optional, Union

from finetune_api.models import FineTuneJob, InferenceService
from finetune_api.schema import API_VERSION

from finetune_operator.labels import labels_for

Owner = Union[FineTuneJob, InferenceService]


def owner_reference(owner: Owner) -> dict:
    """The controller reference of a child: the garbage collector deletes it with its owner."""
    return {"apiVersion": API_VERSION, "kind": owner.KIND, "name": owner.metadata.name,
            "uid": owner.metadata.uid, "controller": True, "blockOwnerDeletion": True}


def object_meta(owner: Owner, name: str, component: Optional[str] = None, *,
                labels: Optional[dict[str, str]] = None, owned: bool = True) -> dict:
    """metadata of a child of `owner`: a FineTuneJob's children get labels_for(job, component)."""
    meta = {"name": name, "namespace": owner.metadata.namespace,
            "labels": labels if labels is not None else labels_for(owner.metadata.name, component)}
    if owned:
        meta["ownerReferences"] = [owner_reference(owner)]
    return meta
