"""Where a pod runs: the scheduling fields every pod the operator builds carries, set one way."""

from __future__ import annotations

from typing import Any, Sequence

from finetune_api.models import to_dict

GPU_RESOURCE = "nvidia.com/gpu"


def place(pod_spec: dict, *, gpus: int, node_selector: dict[str, str], tolerations: Sequence[Any],
          affinity: dict | None, priority_class_name: str | None) -> dict:
    """Add nodeSelector, tolerations (plus the GPU taint's when the pod asks for GPUs),
    affinity and priorityClassName to `pod_spec`, leaving out what is unset."""
    if node_selector:
        pod_spec["nodeSelector"] = dict(node_selector)
    tols = [to_dict(t) for t in tolerations]
    if gpus > 0 and not any(t.get("key") == GPU_RESOURCE for t in tols):
        # GPU pools carry a taint like nvidia.com/gpu:NoSchedule; a GPU pod tolerates it.
        tols.append({"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"})
    if tols:
        pod_spec["tolerations"] = tols
    if affinity:
        pod_spec["affinity"] = affinity
    if priority_class_name:
        pod_spec["priorityClassName"] = priority_class_name
    return pod_spec
