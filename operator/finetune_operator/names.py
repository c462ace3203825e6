"""Names of every object the operator creates for a FineTuneJob: one function each.

Names are deterministic (a restarted operator derives the same ones and finds what it
created before). Kubernetes caps most names that end up in labels at 63 characters; a
name that would be longer keeps a readable head and a short hash of the full name.
"""

from __future__ import annotations

import hashlib

MAX_NAME = 63


def shorten(text: str, limit: int = MAX_NAME, *, hash_of: str | None = None) -> str:
    """`text`, or when longer than `limit` its head and a stable hash of `hash_of` (default:
    `text`). The one way every name and label value is shortened."""
    if len(text) <= limit:
        return text
    digest = hashlib.sha256((hash_of or text).encode()).hexdigest()[:8]
    return f"{text[: limit - len(digest) - 1].rstrip('-.')}-{digest}"


def fit(base: str, suffix: str, limit: int = MAX_NAME) -> str:
    """`<base>-<suffix>`; when longer than `limit` the base is shortened, the suffix kept."""
    return f"{shorten(base, limit - len(suffix) - 1, hash_of=f'{base}-{suffix}')}-{suffix}"


def workspace_claim(job_name: str) -> str:
    return fit(job_name, "workspace")


def trainer_service_account(job_name: str) -> str:
    return fit(job_name, "trainer")


def trainer_role(job_name: str) -> str:
    return fit(job_name, "trainer")


def trainer_role_binding(job_name: str) -> str:
    return fit(job_name, "trainer")


def trainer_config_map(job_name: str) -> str:
    """Only for a config too large for the pod template (builders/trainer_config.py)."""
    return fit(job_name, "trainer-config")


def trainer_job(job_name: str) -> str:
    """One trainer Job per FineTuneJob: retries are the Job's own pods (backoffLimit).

    Kept at most 52 characters so the Job controller's pod names (`<job>-<index>-<rand>`)
    and the headless Service's DNS names stay valid.
    """
    return fit(job_name, "trainer", limit=52)


def trainer_service(job_name: str) -> str:
    """The headless Service of a multi-node trainer; its name is the pods' subdomain."""
    return trainer_job(job_name)


def comparison_job(job_name: str) -> str:
    """The comparison Job (base vs fine-tuned through vLLM), after the trainer Job completed."""
    return fit(job_name, "compare", limit=52)


def review_config_map(job_name: str) -> str:
    """What the comparison Job publishes for the review page (the operator serves it)."""
    return fit(job_name, "review")
