"""The Service in front of the vLLM pods (the OpenAI API on port 8000)."""

from __future__ import annotations

from finetune_api.models import InferenceService

from finetune_operator.serving.common import PORT, PORT_NAME, meta, selector


def build_service(isvc: InferenceService) -> dict:
    return {"apiVersion": "v1", "kind": "Service", "metadata": meta(isvc),
            "spec": {"type": "ClusterIP", "selector": selector(isvc),
                     "ports": [{"name": PORT_NAME, "port": PORT, "targetPort": PORT_NAME, "protocol": "TCP"}]}}
