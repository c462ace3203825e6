"""The PodDisruptionBudget that keeps one vLLM replica up through node drains."""

from __future__ import annotations

from finetune_api.models import InferenceService

from finetune_operator.serving.common import meta, selector


def wants_pdb(isvc: InferenceService) -> bool:
    scaling = isvc.spec.autoscaling
    return (scaling.min_replicas if scaling else isvc.spec.replicas) > 1


def build_pdb(isvc: InferenceService) -> dict:
    """Keeps one replica up through node drains (only when more than one runs)."""
    return {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": meta(isvc),
            "spec": {"minAvailable": 1, "selector": {"matchLabels": selector(isvc)}}}
