"""What a FineTuneJob's status should say, derived from its trainer Job and pods.

`derive` is a pure function: the FineTuneJob (with what the trainer reported), the Job and
its pods as dicts, the clock and the price in; an `Observation` out. Handlers only fetch
the inputs and write the result (see `status_patch`): they never decide a phase themselves.

Phases: Pending -> Validating -> Training -> Evaluating -> Comparing -> [AwaitingApproval]
-> Deploying -> Succeeded, or Failed; Suspended while spec.suspend is true.
Validating/Training/Evaluating follow the trainer's own progress report: running with no
step yet is Validating (the trainer validates the data before its first step), steps below
the total are Training, the last step reached while the pod still runs is Evaluating.
Comparing lasts while the comparison Job (spec.evaluation.comparison) runs; a comparison
that could not be measured is a condition (Compared False), never a failed job.
AwaitingApproval (spec.deploy.requireApproval) lasts until the annotation
finetune.dev/approved is true (deploy) or false (Succeeded, not deployed).
"""

from __future__ import annotations

import datetime as dt
import enum
import hashlib
import json
import re
from dataclasses import dataclass, field

from finetune_api.exitcodes import PERMANENT
from finetune_api.models import FineTuneJob, to_dict

from finetune_operator.builders.placement import GPU_RESOURCE
from finetune_operator.builders.storage import claim_name
from finetune_operator.conditions import (
    ADMITTED, APPROVED, COMPARED, FAILED, FALSE, PUSHED, RUNNING, SUCCEEDED, SUSPENDED, TRACKING_AVAILABLE,
    TRUE,
    ConditionUpdate, find, now_iso, set_conditions,
)

IMAGE_PROBLEMS = ("ImagePullBackOff", "ErrImagePull", "InvalidImageName", "ErrImageNeverPull",
                  "CreateContainerConfigError", "CreateContainerError")
GPU_SECONDS_ANNOTATION = "finetune.dev/gpu-seconds"
# spec.deploy.requireApproval: "true" deploys, "false" ends the job Succeeded, not deployed.
APPROVED_ANNOTATION = "finetune.dev/approved"
# Optional: why it was approved or rejected (shown in the Approved condition).
APPROVAL_REASON_ANNOTATION = "finetune.dev/approval-reason"
# A digest of the spec.deploy values last applied to the InferenceService (written by the
# operator once they were): a deployed job whose spec.deploy changed deploys again.
DEPLOYED_SETTINGS_ANNOTATION = "finetune.dev/deployed-settings"
# Where the operator serves a job's review page (on its metrics port).
REPORT_PATH = "/jobs/{namespace}/{name}/report"


class Phase(str, enum.Enum):
    PENDING = "Pending"
    VALIDATING = "Validating"
    TRAINING = "Training"
    EVALUATING = "Evaluating"
    COMPARING = "Comparing"
    AWAITING_APPROVAL = "AwaitingApproval"
    DEPLOYING = "Deploying"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    SUSPENDED = "Suspended"

    @property
    def terminal(self) -> bool:
        return self in (Phase.SUCCEEDED, Phase.FAILED)

    @property
    def running(self) -> bool:
        return self in (Phase.VALIDATING, Phase.TRAINING, Phase.EVALUATING, Phase.COMPARING)


PHASES = tuple(p.value for p in Phase)


@dataclass
class Observation:
    phase: Phase
    reason: str
    message: str
    # pod uid -> GPU seconds consumed so far (merged with what was recorded before)
    gpu_seconds: dict[str, float] = field(default_factory=dict)
    attempts: int = 0
    restarts: int = 0
    first_running_at: str | None = None
    # {"name", "url"} of the InferenceService serving the result, once deployed.
    endpoint: dict | None = None
    # Conditions beside Running/Succeeded/Failed/Suspended (Compared, Approved).
    extra_conditions: list[ConditionUpdate] = field(default_factory=list)

    @property
    def gpu_hours(self) -> float:
        return round(sum(self.gpu_seconds.values()) / 3600.0, 6)


# --- reading Kubernetes objects ---------------------------------------------------------------


def parse_time(value: str | None) -> dt.datetime | None:
    if not value:
        return None
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00"))


def _conditions(obj: dict | None) -> dict[str, dict]:
    return {c.get("type"): c for c in ((obj or {}).get("status") or {}).get("conditions") or []}


def _true(obj: dict | None, type_: str) -> dict | None:
    c = _conditions(obj).get(type_)
    return c if c and c.get("status") == "True" else None


def _container_statuses(pod: dict) -> list[dict]:
    return (pod.get("status") or {}).get("containerStatuses") or []


def _terminated(pod: dict) -> dict | None:
    for cs in _container_statuses(pod):
        term = (cs.get("state") or {}).get("terminated")
        if term:
            return term
    return None


def _pod_gpus(pod: dict) -> int:
    total = 0
    for c in (pod.get("spec") or {}).get("containers") or []:
        limits = ((c.get("resources") or {}).get("limits") or {})
        total += int(str(limits.get(GPU_RESOURCE, 0)) or 0)
    return total


def _created(pod: dict) -> str:
    return (pod.get("metadata") or {}).get("creationTimestamp") or ""


def _disrupted(pod: dict) -> dict | None:
    return _true(pod, "DisruptionTarget")


def pod_gpu_seconds(pod: dict, now: dt.datetime) -> float:
    """GPU seconds a pod's containers have run: (finish or now) - start, times its GPUs."""
    gpus = _pod_gpus(pod)
    if not gpus:
        return 0.0
    longest = 0.0
    for cs in _container_statuses(pod):
        state = cs.get("state") or {}
        if "running" in state:
            start, end = parse_time(state["running"].get("startedAt")), now
        elif "terminated" in state:
            start = parse_time(state["terminated"].get("startedAt"))
            end = parse_time(state["terminated"].get("finishedAt")) or now
        else:
            continue
        if start:
            longest = max(longest, (end - start).total_seconds())
    return max(longest, 0.0) * gpus


def termination_summary(message: str | None) -> tuple[str | None, str]:
    """The trainer's JSON termination message as (reason, readable message)."""
    if not message:
        return None, ""
    try:
        data = json.loads(message)
    except ValueError:
        return None, message.strip()[-1024:]
    if not isinstance(data, dict):
        return None, message.strip()[-1024:]
    reason = data.get("reason")
    text = str(data.get("message") or "")
    errors = data.get("firstErrors") or []
    if errors:
        text = f"{text}; first errors: " + "; ".join(str(e) for e in errors[:5])
    return (reason if isinstance(reason, str) else None), text


def _valid_reason(reason: str | None, fallback: str) -> str:
    if reason and re.fullmatch(r"[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?", reason):
        return reason
    return fallback


def _failure_of(pod: dict) -> tuple[str, str]:
    """Why one failed pod failed, as (reason, message)."""
    term = _terminated(pod) or {}
    name = pod["metadata"]["name"]
    code = term.get("exitCode")
    if term.get("reason") == "OOMKilled":
        return "OOMKilled", f"pod {name} ran out of memory (OOMKilled); raise spec.resources.memory"
    if code == PERMANENT:
        reason, text = termination_summary(term.get("message"))
        return (_valid_reason(reason, "PermanentError"),
                f"trainer exited with code {PERMANENT} (not retried): {text or 'no message'}")
    reason, text = termination_summary(term.get("message"))
    if code is not None:
        return "TrainerError", f"pod {name} exited with code {code}: {text or term.get('reason', '')}"
    status = pod.get("status") or {}
    return _valid_reason(status.get("reason"), "PodFailed"), status.get("message") or f"pod {name} failed"


# --- the derivation -----------------------------------------------------------------------------


def derive(job: FineTuneJob, trainer_job: dict | None, pods: list[dict], *, now: dt.datetime,
           recorded_gpu_seconds: dict[str, float] | None = None,
           comparison_job: dict | None = None) -> Observation:
    """`comparison_job`: the comparison Job once it exists (read only after training)."""
    pods = sorted(pods, key=_created)
    gpu_seconds = dict(recorded_gpu_seconds or {})
    for pod in pods:
        uid = pod["metadata"]["uid"]
        gpu_seconds[uid] = max(gpu_seconds.get(uid, 0.0), round(pod_gpu_seconds(pod, now), 1))
    nodes = max(job.spec.resources.nodes, 1)
    attempts = max(job.status.attempts or 0, -(-len(pods) // nodes))
    restarts = sum(1 for p in pods if (p.get("status") or {}).get("phase") == "Failed"
                   and not _disrupted(p))
    running_starts = [parse_time(_running_start(p)) for p in pods if _running_start(p)]
    first_running = min(running_starts).strftime("%Y-%m-%dT%H:%M:%SZ") if running_starts else None

    def obs(phase: Phase, reason: str, message: str) -> Observation:
        return Observation(phase, reason, message, gpu_seconds, attempts, restarts, first_running)

    current = Phase(job.status.phase) if job.status.phase in PHASES else Phase.PENDING
    if late_deploy(job):
        return obs(Phase.DEPLOYING, "DeployRequested", "spec.deploy was set or changed after training: "
                   "deploying the model")
    if current is Phase.DEPLOYING:
        # Training is over; only the deployment's observation moves the job on (never back to
        # training, even when the finished trainer Job is gone).
        return obs(Phase.DEPLOYING, "TrainingCompleted", "training completed; deploying the model")
    if current in (Phase.COMPARING, Phase.AWAITING_APPROVAL):
        return _after_training(job, comparison_job, obs)  # the same: never back to training
    if current.terminal:
        c = find([_cond_dict(c) for c in job.status.conditions], FAILED if current is Phase.FAILED else SUCCEEDED)
        return obs(current, (c or {}).get("reason", current.value), (c or {}).get("message", ""))
    admitted = find([_cond_dict(c) for c in job.status.conditions], ADMITTED)
    if admitted is None or admitted.get("status") != TRUE:
        return obs(Phase.PENDING, (admitted or {}).get("reason", "Admitting"),
                   (admitted or {}).get("message", "checking the spec against the cluster"))

    if trainer_job is None:
        if job.spec.suspend:
            return obs(Phase.SUSPENDED, "Suspended", "spec.suspend is true: no trainer is running; "
                       "the volume and its checkpoints are kept")
        return obs(Phase.PENDING, "Creating", "creating the trainer Job")

    failed = _true(trainer_job, "Failed") or _true(trainer_job, "FailureTarget")
    if failed:
        return obs(Phase.FAILED, *_job_failure(failed, pods))
    if trainer_completed(trainer_job):
        return _after_training(job, comparison_job, obs)

    job_suspended = bool((trainer_job.get("spec") or {}).get("suspend"))
    live = [p for p in pods if (p.get("status") or {}).get("phase") in (None, "Pending", "Running")
            and not (p.get("metadata") or {}).get("deletionTimestamp")]
    if job.spec.suspend:
        if live:
            return obs(Phase.SUSPENDED, "Suspending", "stopping the trainer (it checkpoints on SIGTERM)")
        return obs(Phase.SUSPENDED, "Suspended", "spec.suspend is true: no trainer is running; "
                   "the volume and its checkpoints are kept")
    if job_suspended:
        if job.spec.resources.queue_name:
            return obs(Phase.PENDING, "Queued",
                       f"waiting for Kueue to admit the Job in queue {job.spec.resources.queue_name}")
        return obs(Phase.PENDING, "Resuming", "resuming the trainer Job")

    for pod in live:
        scheduled = _conditions(pod).get("PodScheduled")
        if scheduled and scheduled.get("status") == "False" and scheduled.get("reason") == "Unschedulable":
            return obs(Phase.PENDING, "Unschedulable", scheduled.get("message") or "no node fits the pod")
        for cs in _container_statuses(pod):
            waiting = (cs.get("state") or {}).get("waiting") or {}
            if waiting.get("reason") in IMAGE_PROBLEMS:
                return obs(Phase.PENDING, waiting["reason"],
                           f"{cs.get('image', '')}: {waiting.get('message') or waiting['reason']}")

    disrupted = [p for p in pods if (p.get("status") or {}).get("phase") == "Failed" and _disrupted(p)]
    crashed = [p for p in pods if (p.get("status") or {}).get("phase") == "Failed" and not _disrupted(p)]
    running = [p for p in live if (p.get("status") or {}).get("phase") == "Running"]
    if running:
        phase = _running_phase(job)
        reason, message = phase.value, _progress_message(job, phase)
        if disrupted and _created(disrupted[-1]) < _created(running[-1]):
            reason, message = "Resumed", (f"resumed after pod {disrupted[-1]['metadata']['name']} was "
                                          f"disrupted ({_disrupted(disrupted[-1]).get('reason', '')}); "
                                          "continuing from the latest checkpoint")
        elif crashed and _created(crashed[-1]) < _created(running[-1]):
            reason = "Retrying"
            message = f"attempt {attempts}: previous pod failed: {_failure_of(crashed[-1])[1]}"
        return obs(phase, reason, message)
    if disrupted and (not crashed or _created(crashed[-1]) < _created(disrupted[-1])):
        target = _disrupted(disrupted[-1])
        return obs(Phase.PENDING, "Preempted",
                   f"pod {disrupted[-1]['metadata']['name']} was disrupted ({target.get('reason', '')}: "
                   f"{target.get('message', '')}); it will resume from the latest checkpoint")
    if crashed:
        reason, message = _failure_of(crashed[-1])
        return obs(Phase.PENDING, reason, f"{message}; retrying (attempt {attempts + 1})")
    finished = [p for p in pods if (p.get("status") or {}).get("phase") == "Succeeded"]
    if finished and not live:
        # The trainer exited 0; the Job controller marks the Job Complete a moment later, and
        # that event refreshes the job. A job seen running stays as written until then: a phase
        # of its own for that moment cost a status patch and an Event per job (#14).
        running_condition = find([_cond_dict(c) for c in job.status.conditions], RUNNING)
        if current.running and running_condition and running_condition.get("status") == TRUE:
            return obs(current, running_condition.get("reason") or current.value,
                       running_condition.get("message") or "")
        return obs(Phase.EVALUATING, "TrainerFinished",
                   "the trainer finished; waiting for its Job to complete")
    return obs(Phase.PENDING, "Starting", "waiting for the trainer pod to start")


def trainer_completed(trainer_job: dict | None) -> bool:
    return bool(_true(trainer_job, "Complete") or _true(trainer_job, "SuccessCriteriaMet"))


def report_url_path(job: FineTuneJob) -> str:
    return REPORT_PATH.format(namespace=job.metadata.namespace, name=job.metadata.name)


def _after_training(job: FineTuneJob, comparison_job: dict | None, obs) -> Observation:
    """Comparing, then AwaitingApproval, then Deploying or Succeeded."""
    extra: list[ConditionUpdate] = []
    if job.spec.evaluation.comparison.enabled:
        compared = comparison_condition(job, comparison_job)
        if compared is None:
            started = comparison_job is not None
            return obs(Phase.COMPARING, "Comparing" if started else "StartingComparison",
                       "training completed; asking the base model and the result the evaluation "
                       "prompts through one vLLM server (comparison Job)")
        extra.append(compared)
    deploy = job.spec.deploy
    if deploy and deploy.require_approval:
        verdict = (job.metadata.annotations.get(APPROVED_ANNOTATION) or "").strip().lower()
        why = job.metadata.annotations.get(APPROVAL_REASON_ANNOTATION) or ""
        why = f": {why}" if why else ""
        if verdict == "false":
            extra.append(ConditionUpdate(APPROVED, FALSE, "Rejected",
                                         f"rejected ({APPROVED_ANNOTATION}=false){why}; not deployed"))
            o = obs(Phase.SUCCEEDED, "Rejected", f"{_completion_message(job)}; not deployed: rejected "
                    f"with {APPROVED_ANNOTATION}=false{why}")
            o.extra_conditions = extra
            return o
        if verdict != "true":
            where = (f"the review page at {report_url_path(job)} on the operator's HTTP port, "
                     f"status.comparison (kubectl describe ftj {job.metadata.name})")
            if job.status.comparison and job.status.comparison.report:
                where += f", {job.status.comparison.report} on the job volume"
            message = (f"waiting for a person to review {where}; then kubectl annotate ftj "
                       f"{job.metadata.name} {APPROVED_ANNOTATION}=true to deploy (or =false)")
            extra.append(ConditionUpdate(APPROVED, FALSE, "AwaitingApproval", message))
            o = obs(Phase.AWAITING_APPROVAL, "AwaitingApproval", message)
            o.extra_conditions = extra
            return o
        extra.append(ConditionUpdate(APPROVED, TRUE, "Approved", f"approved ({APPROVED_ANNOTATION}=true){why}"))
    if deploy:
        o = obs(Phase.DEPLOYING, "TrainingCompleted", "training completed; deploying the model")
    else:
        o = obs(Phase.SUCCEEDED, "TrainingCompleted", _completion_message(job))
    o.extra_conditions = extra
    return o


def comparison_condition(job: FineTuneJob, comparison_job: dict | None) -> ConditionUpdate | None:
    """Compared, once the comparison is over: True when measured, False (with why) when vLLM
    could not serve or the Job failed; None while it runs."""
    reported = job.status.comparison
    if reported is not None and reported.state == "Measured":
        return ConditionUpdate(COMPARED, TRUE, "Measured", reported.message or "measured")
    if reported is not None and reported.state == "Unavailable":
        return ConditionUpdate(COMPARED, FALSE, "ComparisonUnavailable", reported.message or "unavailable")
    failed = _true(comparison_job, "Failed") or _true(comparison_job, "FailureTarget")
    if failed:
        return ConditionUpdate(COMPARED, FALSE, "ComparisonFailed",
                               f"the comparison Job failed ({failed.get('reason', '')}: "
                               f"{failed.get('message', '')}); the training result is unaffected")
    if trainer_completed(comparison_job):
        return ConditionUpdate(COMPARED, FALSE, "NotReported",
                               "the comparison Job completed without reporting status.comparison")
    return None


def late_deploy(job: FineTuneJob) -> bool:
    """A Succeeded job whose spec.deploy was added (or changed to another server, or changed
    its values since they were applied) after it finished: it deploys now."""
    if job.status.phase != Phase.SUCCEEDED.value or not job.spec.deploy:
        return False
    if job.spec.deploy.require_approval and \
            (job.metadata.annotations.get(APPROVED_ANNOTATION) or "").strip().lower() != "true":
        return False  # rejected (or never approved): adding deploy does not bypass the gate
    served_by = job.status.inference_service.name if job.status.inference_service else None
    wanted = job.spec.deploy.inference_service or job.metadata.name
    if served_by != wanted:
        return True
    applied = job.metadata.annotations.get(DEPLOYED_SETTINGS_ANNOTATION)
    return applied is not None and applied != deploy_digest(job)


def deploy_digest(job: FineTuneJob) -> str:
    """What spec.deploy asks of its InferenceService (replicas, gpus, placement, vllm), hashed."""
    settings = {k: v for k, v in to_dict(job.spec.deploy).items()
                if k not in ("inferenceService", "requireApproval")}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def _cond_dict(c) -> dict:
    return {"type": c.type, "status": c.status, "reason": c.reason, "message": c.message,
            "lastTransitionTime": c.last_transition_time}


def _running_start(pod: dict) -> str | None:
    for cs in _container_statuses(pod):
        state = cs.get("state") or {}
        started = (state.get("running") or state.get("terminated") or {}).get("startedAt")
        if started:
            return started
    return None


def _running_phase(job: FineTuneJob) -> Phase:
    # The trainer reports totalSteps (forced, not throttled) when training begins, after the
    # data is validated and the model loaded: Training from then on, not from the first
    # logged step (a run whose steps all fell between two status writes showed Validating,
    # then Evaluating).
    p = job.status.progress
    if p is None or not (p.step or p.total_steps):
        return Phase.VALIDATING
    if p.total_steps and p.step >= p.total_steps:
        return Phase.EVALUATING
    return Phase.TRAINING


def _progress_message(job: FineTuneJob, phase: Phase) -> str:
    p = job.status.progress
    if phase is Phase.VALIDATING:
        return "the trainer is validating the dataset and loading the model"
    if phase is Phase.EVALUATING:
        return "training steps done; evaluating and writing artifacts"
    return f"step {p.step}/{p.total_steps or '?'}"


def _completion_message(job: FineTuneJob) -> str:
    artifacts = job.status.artifacts
    where = artifacts and (artifacts.adapter or artifacts.merged)
    return f"training completed; artifacts at {where}" if where else "training completed"


def _job_failure(condition: dict, pods: list[dict]) -> tuple[str, str]:
    job_reason = condition.get("reason") or "JobFailed"
    failed = [p for p in pods if (p.get("status") or {}).get("phase") == "Failed" and not _disrupted(p)]
    if job_reason == "PodFailurePolicy":
        permanent = [p for p in failed if (_terminated(p) or {}).get("exitCode") == PERMANENT]
        if permanent:
            return _failure_of(permanent[-1])
        return "PermanentError", condition.get("message") or "the pod failure policy failed the Job"
    if job_reason == "DeadlineExceeded":
        return "DeadlineExceeded", ("the trainer ran longer than spec.resources.activeDeadlineSeconds: "
                                    + (condition.get("message") or ""))
    if job_reason == "BackoffLimitExceeded" and failed:
        reason, message = _failure_of(failed[-1])
        if reason == "OOMKilled":
            return reason, f"{message} (retries exhausted)"
        return "BackoffLimitExceeded", f"the trainer failed {len(failed)} times; last: {message}"
    return _valid_reason(job_reason, "JobFailed"), condition.get("message") or job_reason


# --- writing it -----------------------------------------------------------------------------------


def condition_updates(o: Observation) -> list[ConditionUpdate]:
    """The operator's conditions for an observation (Admitted is written by admission)."""
    running = o.phase.running
    updates = [
        ConditionUpdate(RUNNING, TRUE if running else FALSE, o.reason, o.message),
        ConditionUpdate(SUSPENDED, TRUE if o.phase is Phase.SUSPENDED else FALSE,
                        o.reason if o.phase is Phase.SUSPENDED else "NotSuspended",
                        o.message if o.phase is Phase.SUSPENDED else "spec.suspend is false"),
    ]
    if o.phase is Phase.SUCCEEDED:
        updates.append(ConditionUpdate(SUCCEEDED, TRUE, o.reason, o.message))
    if o.phase is Phase.FAILED:
        updates.append(ConditionUpdate(FAILED, TRUE, o.reason, o.message))
    return updates + list(o.extra_conditions)


def tracking_condition(job: FineTuneJob) -> ConditionUpdate | None:
    """TrackingAvailable from the trackers' states the trainer reports in status.tracking;
    None until the trainer reported (or when spec.tracking is not set)."""
    reported = job.status.tracking
    if job.spec.tracking is None or reported is None:
        return None
    trackers = {name: getattr(reported, name) for name in ("mlflow", "tensorboard", "wandb")
                if getattr(reported, name) is not None}
    down = {name: t for name, t in trackers.items() if t.state == "Unavailable"}
    if down:
        detail = "; ".join(f"{name}: {t.message or 'unavailable'}" for name, t in down.items())
        return ConditionUpdate(TRACKING_AVAILABLE, FALSE, "TrackerUnavailable",
                               f"{detail}. Training goes on without it; its metrics are in "
                               f"status.metrics and the trainer's Prometheus metrics.")
    if not trackers:
        return None
    return ConditionUpdate(TRACKING_AVAILABLE, TRUE, "Logging",
                           f"logging to {', '.join(sorted(trackers))}")


def push_condition(job: FineTuneJob) -> ConditionUpdate | None:
    """Pushed from what the trainer reports in status.artifacts (pushed, or pushError once its
    retries are spent); None until then or without spec.output.push."""
    artifacts = job.status.artifacts
    if job.spec.output.push is None or artifacts is None:
        return None
    if artifacts.pushed:
        return ConditionUpdate(PUSHED, TRUE, "Pushed", f"published to {artifacts.pushed}")
    if artifacts.push_error:
        return ConditionUpdate(PUSHED, FALSE, "PushFailed",
                               f"{artifacts.push_error}. The job succeeded; the artifacts are on "
                               f"the job volume.")
    return None


def status_patch(job: FineTuneJob, o: Observation, *, now: dt.datetime, gpu_hour_price: float,
                 existing_conditions: list[dict]) -> dict:
    """The status fields the operator owns (never progress/metrics/checkpoints: the trainer's)."""
    stamp = now_iso(now)
    status: dict = {
        "phase": o.phase.value,
        "observedGeneration": job.metadata.generation,
        "conditions": set_conditions(existing_conditions,
                                     condition_updates(o) + [c for c in (tracking_condition(job),
                                                                         push_condition(job)) if c],
                                     generation=job.metadata.generation, now=stamp),
        "attempts": o.attempts,
        "restarts": o.restarts,
        "gpuHours": o.gpu_hours,
    }
    if o.gpu_seconds:
        # Per pod, so that a pod deleted later keeps counting (written with gpuHours).
        status["gpuSecondsByPod"] = {uid: round(seconds, 1) for uid, seconds in sorted(o.gpu_seconds.items())}
    if o.endpoint:
        status["inferenceService"] = o.endpoint
    if gpu_hour_price:
        status["estimatedCost"] = f"{o.gpu_hours * gpu_hour_price:.2f}"
    if o.phase is Phase.SUCCEEDED:
        status["artifacts"] = {"volume": claim_name(job)}
    if o.phase.terminal and not job.status.completion_time:
        status["completionTime"] = stamp
    return status


# --- admission and deployment: the phases the handler would otherwise decide ------------------


def admission_status(job: FineTuneJob, problem, existing_conditions: list[dict], *,
                     now: str) -> dict | None:
    """The status patch of the admission check (`problem` from admission.check, None when the
    spec's references exist); None when nothing changes. A problem that may go away (a missing
    Secret or claim) keeps the job Pending; any other fails it."""
    generation = job.metadata.generation
    if problem is None:
        admitted = find(existing_conditions, ADMITTED) or {}
        if admitted.get("status") == TRUE:
            return None
        update = ConditionUpdate(ADMITTED, TRUE, "Admitted",
                                 "the Secrets, claims and node capacity the spec needs exist")
        return {"conditions": set_conditions(existing_conditions, [update], generation=generation,
                                             now=now),
                "observedGeneration": generation, "phase": job.status.phase or Phase.PENDING.value}
    updates = [ConditionUpdate(ADMITTED, FALSE, problem.reason, problem.message)]
    phase = Phase.PENDING
    admitted = find(existing_conditions, ADMITTED) or {}
    if problem.retryable and job.status.phase == phase.value and (
            admitted.get("status"), admitted.get("reason"), admitted.get("message")) == (
            FALSE, problem.reason, problem.message):
        return None  # still waiting for the same thing: nothing to write, nothing to announce
    if not problem.retryable:
        updates.append(ConditionUpdate(FAILED, TRUE, problem.reason, problem.message))
        phase = Phase.FAILED
    return {"conditions": set_conditions(existing_conditions, updates, generation=generation, now=now),
            "observedGeneration": generation, "phase": phase.value,
            **({"completionTime": now} if phase is Phase.FAILED else {})}


def deployment_observation(job: FineTuneJob, obs: Observation, endpoint: dict | None,
                           isvc: dict | None) -> Observation:
    """Where a trained job with spec.deploy stands: Succeeded once its InferenceService (`isvc`,
    the object; `endpoint` its {name, url}) serves it and is Ready, Deploying until then.
    `endpoint` None: this operator runs no InferenceService controller."""
    carry = dict(gpu_seconds=obs.gpu_seconds, attempts=obs.attempts, restarts=obs.restarts,
                 first_running_at=obs.first_running_at, extra_conditions=obs.extra_conditions)
    if endpoint is None:
        return Observation(Phase.SUCCEEDED, "TrainingCompleted",
                           "training completed; spec.deploy was not acted on: this operator has no "
                           "InferenceService controller", **carry)
    st = (isvc or {}).get("status") or {}
    name = (job.spec.deploy.adapter_name if job.spec.deploy else None) or job.metadata.name
    served = name in (st.get("servedModels") or [])
    current = st.get("observedGeneration") == (isvc or {}).get("metadata", {}).get("generation")
    # A gated adapter (spec.adapters[].promotion): this job serves only once promoted.
    gate = next((p for p in st.get("promotions") or [] if p.get("name") == name), None)
    if gate and gate.get("fineTuneJob") != job.metadata.name:
        served = False
        if gate.get("candidate") == job.metadata.name and gate.get("result") == "Refused" and current:
            return Observation(Phase.SUCCEEDED, "NotPromoted", f"training completed; InferenceService "
                               f"{endpoint['name']} did not promote it: {gate.get('message', '')}",
                               endpoint=endpoint, **carry)
    if st.get("phase") == "Ready" and served and current:
        return Observation(Phase.SUCCEEDED, "Deployed", f"training completed; served by InferenceService "
                           f"{endpoint['name']} as model {name!r} at {endpoint['url']}",
                           endpoint=endpoint, **carry)
    ready = next((c for c in st.get("conditions") or [] if c.get("type") == "Ready"), {})
    return Observation(Phase.DEPLOYING, "WaitingForInferenceService",
                       f"training completed; InferenceService {endpoint['name']} is "
                       f"{st.get('phase') or 'starting'}: {ready.get('message') or 'rolling out'}",
                       endpoint=endpoint, **carry)


def deployment_failed(obs: Observation, error: Exception) -> Observation:
    """Adding the result to its InferenceService failed: stay Deploying, try again later. The
    error's `reason` (DeployConflict: spec.deploy disagrees with another job's) is the reason."""
    return Observation(Phase.DEPLOYING, getattr(error, "reason", "DeployFailed"), f"adding the adapter to the "
                       f"InferenceService failed: {error}; retrying", obs.gpu_seconds, obs.attempts,
                       obs.restarts, obs.first_running_at, extra_conditions=obs.extra_conditions)
