"""What every child of an InferenceService shares: names, labels, the owner reference, the port,
the URL, the names clients use, and the phases of its status."""

from __future__ import annotations

import enum

from finetune_api.models import InferenceService

from finetune_operator.builders import object_meta
from finetune_operator.labels import APP, COMPONENT, MANAGED_BY, label_value

PORT = 8000
PORT_NAME = "http"
COMPONENT_NAME = "inference"
INFERENCESERVICE_LABEL = "finetune.dev/inferenceservice"
# The pod template annotation that names the served configuration (see deployment.py).
REVISION_ANNOTATION = "finetune.dev/revision"


class ServingPhase(enum.StrEnum):
    """status.phase of an InferenceService."""

    PENDING = "Pending"
    PROGRESSING = "Progressing"
    READY = "Ready"
    DEGRADED = "Degraded"
    FAILED = "Failed"


def labels(isvc: InferenceService) -> dict[str, str]:
    """Labels of every child of an InferenceService (the selector is a subset)."""
    return {"app.kubernetes.io/name": "vllm", "app.kubernetes.io/instance": label_value(isvc.metadata.name),
            COMPONENT: COMPONENT_NAME, MANAGED_BY: APP, **selector(isvc)}


def selector(isvc: InferenceService) -> dict[str, str]:
    return {INFERENCESERVICE_LABEL: label_value(isvc.metadata.name)}


def meta(isvc: InferenceService) -> dict:
    """metadata of a child: the InferenceService's name, labels, and its owner reference."""
    return object_meta(isvc, isvc.metadata.name, labels=labels(isvc))


def service_url(isvc: InferenceService) -> str:
    return f"http://{isvc.metadata.name}.{isvc.metadata.namespace}.svc.cluster.local:{PORT}/v1"


def referenced_jobs(isvc: InferenceService) -> list[str]:
    """Names of the FineTuneJobs the spec reads (adapters first, then the merged model)."""
    names = [a.fine_tune_job_ref.name for a in isvc.spec.adapters if a.fine_tune_job_ref]
    merged = isvc.spec.merged_model
    if merged and merged.fine_tune_job_ref:
        names.append(merged.fine_tune_job_ref.name)
    return list(dict.fromkeys(names))


def served_model_name(isvc: InferenceService) -> str:
    """spec.vllm.servedModelName, else the object's name, else (when an adapter already has
    that name, as when a FineTuneJob deploys to an InferenceService of its own name) `<name>-base`."""
    vllm = isvc.spec.vllm
    if vllm and vllm.served_model_name:
        return vllm.served_model_name
    name = isvc.metadata.name
    return f"{name}-base" if any(a.name == name for a in isvc.spec.adapters) else name


def served_models(isvc: InferenceService) -> list[str]:
    return [served_model_name(isvc)] + [a.name for a in isvc.spec.adapters]
