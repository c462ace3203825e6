"""Autoscaling scales on vLLM's `vllm:num_requests_waiting`: with KEDA (when its CRD exists)
through a Prometheus query; otherwise with an autoscaling/v2 HPA on the Pods metric
`vllm_num_requests_waiting`, the name prometheus-adapter gives it (its default rules turn
`:` into `_`; a rule `seriesQuery: 'vllm:num_requests_waiting'` with
`name: {as: vllm_num_requests_waiting}` exposes it).
"""

from __future__ import annotations

import re

from finetune_api.models import InferenceService

from finetune_operator.serving.common import meta

DEFAULT_PROMETHEUS = "http://prometheus-operated.monitoring.svc:9090"


def build_hpa(isvc: InferenceService) -> dict:
    """HPA on the per-pod `vllm_num_requests_waiting` (vllm:num_requests_waiting through
    prometheus-adapter; see the module docstring)."""
    scaling = isvc.spec.autoscaling
    return {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": meta(isvc),
            "spec": {
                "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": isvc.metadata.name},
                "minReplicas": max(1, scaling.min_replicas),
                "maxReplicas": scaling.max_replicas,
                "metrics": [{"type": "Pods", "pods": {
                    "metric": {"name": "vllm_num_requests_waiting"},
                    "target": {"type": "AverageValue", "averageValue": str(scaling.target_requests_waiting)}}}],
                # Loading a model takes minutes: scale down slowly.
                "behavior": {"scaleDown": {"stabilizationWindowSeconds": 300}},
            }}


def build_scaled_object(isvc: InferenceService, prometheus_url: str = DEFAULT_PROMETHEUS) -> dict:
    """KEDA ScaledObject (built when `scaledobjects.keda.sh` exists); KEDA can scale to zero."""
    scaling = isvc.spec.autoscaling
    ns, name = isvc.metadata.namespace, isvc.metadata.name
    query = (f'sum(vllm:num_requests_waiting{{namespace="{ns}",'
             f'pod=~"{re.escape(name)}-[a-z0-9]+-[a-z0-9]+"}})')
    return {"apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject", "metadata": meta(isvc),
            "spec": {
                "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
                "minReplicaCount": scaling.min_replicas,
                "maxReplicaCount": scaling.max_replicas,
                "cooldownPeriod": 300,
                "triggers": [{"type": "prometheus", "metadata": {
                    "serverAddress": prometheus_url, "query": query,
                    "threshold": str(scaling.target_requests_waiting)}}],
            }}
