"""Conditions of a FineTuneJob: the one function that writes them.

A condition list is merged by type; `lastTransitionTime` changes only when the status of a
condition changes, and every condition records the generation it was computed for.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

# Condition types.
ADMITTED = "Admitted"
RUNNING = "Running"
SUSPENDED = "Suspended"
SUCCEEDED = "Succeeded"
FAILED = "Failed"
# spec.tracking: False while a tracker is unreachable (training goes on without it).
TRACKING_AVAILABLE = "TrackingAvailable"
PUSHED = "Pushed"
# spec.evaluation.comparison: True once base vs fine-tuned was measured, False when it could not be.
COMPARED = "Compared"
# spec.deploy.requireApproval: False while awaiting a person or after a rejection, True once approved.
APPROVED = "Approved"

TRUE, FALSE = "True", "False"


def now_iso(now: dt.datetime | None = None) -> str:
    now = now or dt.datetime.now(dt.timezone.utc)
    return now.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class ConditionUpdate:
    type: str
    status: str
    reason: str
    message: str


def set_conditions(existing: list[dict], updates: list[ConditionUpdate], *, generation: int | None,
                   now: str) -> list[dict]:
    """`existing` with `updates` merged in by type (pure; order of first appearance kept)."""
    merged = [dict(c) for c in existing]
    index = {c.get("type"): i for i, c in enumerate(merged)}
    for update in updates:
        new = {"type": update.type, "status": update.status, "reason": update.reason,
               "message": update.message[:32768]}
        if generation is not None:
            new["observedGeneration"] = generation
        old = merged[index[update.type]] if update.type in index else None
        if old is not None and old.get("status") == update.status and old.get("lastTransitionTime"):
            new["lastTransitionTime"] = old["lastTransitionTime"]
        else:
            new["lastTransitionTime"] = now
        if old is None:
            index[update.type] = len(merged)
            merged.append(new)
        else:
            merged[index[update.type]] = new
    return merged


def find(conditions: list[dict], type_: str) -> dict | None:
    return next((c for c in conditions if c.get("type") == type_), None)
