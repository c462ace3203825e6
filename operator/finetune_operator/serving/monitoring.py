"""The PodMonitor that lets the Prometheus Operator scrape vLLM's /metrics."""

from __future__ import annotations

from finetune_api.models import InferenceService

from finetune_operator.serving.common import PORT_NAME, meta, selector


def build_pod_monitor(isvc: InferenceService) -> dict:
    """For the Prometheus Operator (built when `podmonitors.monitoring.coreos.com` exists)."""
    return {"apiVersion": "monitoring.coreos.com/v1", "kind": "PodMonitor", "metadata": meta(isvc),
            "spec": {"selector": {"matchLabels": selector(isvc)},
                     "podMetricsEndpoints": [{"port": PORT_NAME, "path": "/metrics", "interval": "15s"}]}}
