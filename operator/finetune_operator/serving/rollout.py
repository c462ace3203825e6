"""The state of an InferenceService's rollout, read from its Deployment and pods (pure)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from finetune_operator.serving.common import REVISION_ANNOTATION, ServingPhase

# Container restarts after which a pod that is not ready counts as crash-looping (the
# local node reports restarts but no CrashLoopBackOff reason).
CRASH_LOOP_RESTARTS = 2
STUCK_WAITING_REASONS = ("CrashLoopBackOff", "ImagePullBackOff", "ErrImagePull",
                         "CreateContainerConfigError", "CreateContainerError", "InvalidImageName")



@dataclass(frozen=True)
class Rollout:
    phase: ServingPhase
    reason: str
    message: str
    replicas: int = 0
    ready_replicas: int = 0


def rollout(deployment: Optional[dict], pods: list[dict], revision: str) -> Rollout:
    """The state of the Deployment's rollout to `revision` (the pod template annotation).

    A rollout that cannot finish (the Deployment's progress deadline passed, or pods of the
    new revision crash-loop) is Degraded: the old ReplicaSet keeps serving meanwhile, since
    maxUnavailable is 0.
    """
    if deployment is None:
        return Rollout(ServingPhase.PROGRESSING, "Creating", "creating the vLLM Deployment")
    spec, status = deployment.get("spec", {}), deployment.get("status", {})
    desired = spec.get("replicas", 1)
    ready = status.get("readyReplicas", 0) or 0
    counts = {"replicas": status.get("replicas", 0) or 0, "ready_replicas": ready}
    serving = f"{ready} ready replica(s) keep serving" if ready else "no replica is serving"
    for pod in pods:
        if pod.get("metadata", {}).get("annotations", {}).get(REVISION_ANNOTATION) != revision:
            continue
        crash = _crash_looping(pod)
        if crash:
            return Rollout(ServingPhase.DEGRADED, "CrashLoop", f"pod {pod['metadata']['name']} of revision "
                           f"{revision}: {crash}; {serving}", **counts)
    progressing = next((c for c in status.get("conditions", []) if c.get("type") == "Progressing"), None)
    if progressing and progressing.get("status") == "False" and progressing.get("reason") == "ProgressDeadlineExceeded":
        return Rollout(ServingPhase.DEGRADED, "ProgressDeadlineExceeded", f"{progressing.get('message', '')}; {serving}",
                       **counts)
    generation = deployment.get("metadata", {}).get("generation", 0)
    if status.get("observedGeneration", 0) < generation:
        return Rollout(ServingPhase.PROGRESSING, "RollingUpdate", "the Deployment controller has not seen the new spec yet",
                       **counts)
    updated = status.get("updatedReplicas", 0) or 0
    available = status.get("availableReplicas", 0) or 0
    total = status.get("replicas", 0) or 0
    # The Deployment's counters can lag its ReplicaSets for a moment after a template change:
    # count the ready pods of this revision too before calling it done.
    new_ready = sum(1 for p in pods
                    if p.get("metadata", {}).get("annotations", {}).get(REVISION_ANNOTATION) == revision
                    and not p.get("metadata", {}).get("deletionTimestamp")
                    and _pod_ready(p))
    if (updated >= desired and available >= desired and total == updated and ready >= desired
            and new_ready >= desired):
        if desired == 0:
            return Rollout(ServingPhase.READY, "ScaledToZero", "no replicas are requested", **counts)
        return Rollout(ServingPhase.READY, "RolloutComplete", f"{ready}/{desired} replicas ready on revision {revision}",
                       **counts)
    return Rollout(ServingPhase.PROGRESSING, "RollingUpdate", f"{updated}/{desired} replicas updated to revision "
                   f"{revision}, {available} available; {serving}", **counts)


def _pod_ready(pod: dict) -> bool:
    status = pod.get("status", {})
    conditions = status.get("conditions") or []
    if conditions:
        return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)
    containers = status.get("containerStatuses") or []
    return bool(containers) and all(c.get("ready") for c in containers)


def _crash_looping(pod: dict) -> Optional[str]:
    for cs in pod.get("status", {}).get("containerStatuses", []) or []:
        waiting = cs.get("state", {}).get("waiting") or {}
        if waiting.get("reason") in STUCK_WAITING_REASONS:
            return f"container {cs['name']} is in {waiting['reason']} ({waiting.get('message', '')})"
        restarts = cs.get("restartCount", 0) or 0
        if restarts >= CRASH_LOOP_RESTARTS and not cs.get("ready"):
            last = (cs.get("lastState", {}) or {}).get("terminated") or cs.get("state", {}).get("terminated") or {}
            detail = f" (last exit code {last['exitCode']})" if "exitCode" in last else ""
            return f"container {cs['name']} restarted {restarts} times{detail}"
    return None

