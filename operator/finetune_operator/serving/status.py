"""The status of an InferenceService (pure): problems with the spec first, then the rollout's
state. Phases are decided here and nowhere else."""

from __future__ import annotations

from typing import Optional

from finetune_api.models import InferenceService

from finetune_operator.conditions import FALSE, TRUE, ConditionUpdate, set_conditions
from finetune_operator.serving.adapters import Replica, Want, pending, served
from finetune_operator.serving.checks import Problem
from finetune_operator.serving.promotion import condition as promotion_condition
from finetune_operator.serving.promptcheck import PromptCheck
from finetune_operator.serving.common import ServingPhase, served_models, service_url
from finetune_operator.serving.rollout import Rollout, rollout

READY, PROGRESSING, DEGRADED, PROMOTED = "Ready", "Progressing", "Degraded", "Promoted"
PROMPT_FORMAT_MISMATCH = "PromptFormatMismatch"


def status_for(isvc: InferenceService, problems: list[Problem], deployment: Optional[dict],
               pods: list[dict], revision: Optional[str], existing_conditions: list[dict], now: str,
               replicas: Optional[list[Replica]] = None, want: Optional[dict[str, Want]] = None,
               promotions: Optional[dict] = None, prompts: Optional[PromptCheck] = None) -> dict:
    """The status to write (pure): problems with the spec first, then the rollout's state, then
    whether every ready replica serves the spec's adapters (`replicas`, from adapters.sync;
    None: not looked at, the spec's names are reported)."""
    generation = isvc.metadata.generation
    state = rollout(deployment, pods, revision or "")
    if replicas is not None and want is not None and not problems:
        state = _with_adapters(state, want, replicas)
    if prompts is not None and prompts.mismatches and not problems and state.phase == ServingPhase.READY:
        state = Rollout(ServingPhase.DEGRADED, "PromptFormatMismatch", "; ".join(prompts.mismatches),
                        state.replicas, state.ready_replicas)
    status: dict = {"observedGeneration": generation, "url": service_url(isvc),
                    "servedModels": served_models(isvc) if replicas is None else served(isvc, replicas),
                    "revision": revision,
                    "replicas": state.replicas, "readyReplicas": state.ready_replicas}
    if replicas is not None:
        status["replicaAdapters"] = [r.to_status() for r in replicas]
    if problems:
        waiting = all(p.waiting for p in problems)
        phase = ServingPhase.PENDING if waiting else ServingPhase.FAILED
        reason = problems[0].reason if len({p.reason for p in problems}) == 1 else (
            "WaitingForFineTuneJobs" if waiting else "InvalidSpec")
        message = "; ".join(p.message for p in problems)
        if deployment:
            message += f" (the Deployment is left as it was: {state.ready_replicas} ready replica(s) " \
                       "keep serving the previous configuration)"
        updates = [ConditionUpdate(READY, FALSE, reason, message),
                   ConditionUpdate(PROGRESSING, FALSE, reason, message),
                   ConditionUpdate(DEGRADED, FALSE if waiting else TRUE, reason, message)]
    else:
        phase = state.phase
        updates = [
            ConditionUpdate(READY, TRUE if phase == ServingPhase.READY else FALSE, state.reason, state.message),
            ConditionUpdate(PROGRESSING, TRUE if phase == ServingPhase.PROGRESSING else FALSE, state.reason,
                            state.message),
            ConditionUpdate(DEGRADED, TRUE if phase == ServingPhase.DEGRADED else FALSE, state.reason, state.message),
        ]
    if promotions and not problems:
        status["promotions"] = [r.to_status() for r in promotions.values()]
        promoted = promotion_condition(promotions)
        if promoted:
            updates.append(ConditionUpdate(PROMOTED, *promoted))
    if prompts is not None and not problems and (prompts.mismatches or prompts.checked):
        updates.append(ConditionUpdate(PROMPT_FORMAT_MISMATCH, TRUE, "PromptFormatMismatch",
                                       "; ".join(prompts.mismatches)) if prompts.mismatches else
                       ConditionUpdate(PROMPT_FORMAT_MISMATCH, FALSE, "SameAsTraining",
                                       "vLLM renders the prompts as training did: " + ", ".join(prompts.checked)))
    status["phase"] = phase
    status["conditions"] = set_conditions(existing_conditions, updates, generation=generation, now=now)
    return {k: v for k, v in status.items() if v is not None}


def _with_adapters(state: Rollout, want: dict[str, Want], replicas: list[Replica]) -> Rollout:
    """A finished rollout is Ready only once every ready replica serves exactly the spec's
    adapters: Progressing (LoadingAdapters) while they load, Degraded (AdapterLoadFailed) when
    a replica refused one (retried with backoff)."""
    if state.phase != ServingPhase.READY:
        return state
    todo = pending(want, replicas)
    if not todo:
        return state
    counts = {"replicas": state.replicas, "ready_replicas": state.ready_replicas}
    if any(r.error for r in replicas):
        return Rollout(ServingPhase.DEGRADED, "AdapterLoadFailed", "; ".join(todo) + " (retrying)", **counts)
    return Rollout(ServingPhase.PROGRESSING, "LoadingAdapters", "; ".join(todo), **counts)
