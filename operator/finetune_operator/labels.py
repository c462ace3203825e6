"""The labels every object created for a FineTuneJob carries: one function builds them."""

from __future__ import annotations

from finetune_operator.names import shorten

APP = "finetune-operator"
FINETUNEJOB = "finetune.dev/finetunejob"
COMPONENT = "app.kubernetes.io/component"
MANAGED_BY = "app.kubernetes.io/managed-by"
KUEUE_QUEUE = "kueue.x-k8s.io/queue-name"
# The FineTuneJob's full name on its trainer pods: the label holds a hashed form past 63
# characters, which cannot be mapped back.
FINETUNEJOB_NAME_ANNOTATION = "finetune.dev/finetunejob-name"


def labels_for(job_name: str, component: str) -> dict[str, str]:
    """Labels of a child of FineTuneJob `job_name`; `component` is e.g. `trainer`, `workspace`."""
    return {
        "app.kubernetes.io/name": "finetune",
        "app.kubernetes.io/instance": label_value(job_name),
        COMPONENT: component,
        MANAGED_BY: APP,
        FINETUNEJOB: label_value(job_name),
    }


def label_value(name: str) -> str:
    """A label value (at most 63 characters) naming `name`; long names keep a stable hash."""
    return shorten(name, 63)


def selector_for(job_name: str, component: str | None = None) -> str:
    """A label selector string matching the children of one FineTuneJob."""
    parts = [f"{MANAGED_BY}={APP}", f"{FINETUNEJOB}={label_value(job_name)}"]
    if component:
        parts.append(f"{COMPONENT}={component}")
    return ",".join(parts)
