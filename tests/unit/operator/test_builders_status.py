"""Status derivation from the trainer Job and its pods: a pure function (issue 5)."""

from __future__ import annotations

import datetime as dt
import json

import pytest

from finetune_operator.admission import ClusterFacts, capacity_note, check
from finetune_operator.conditions import ConditionUpdate, set_conditions
from finetune_operator.status import Phase, derive, status_patch, termination_summary
from tests.unit.operator.test_builders_manifests import make_job

NOW = dt.datetime(2025, 1, 1, 12, 0, 0, tzinfo=dt.timezone.utc)
ADMITTED = [{"type": "Admitted", "status": "True", "reason": "Admitted", "message": "",
             "lastTransitionTime": "2025-01-01T10:00:00Z"}]
SPEC = {"model": {"source": "org/m"}, "dataset": {"source": "pvc://x/d.jsonl"},
        "resources": {"gpusPerNode": 2}}


def job(spec=None, **status):
    status.setdefault("conditions", ADMITTED)
    status.setdefault("phase", "Pending")
    return make_job({**SPEC, **(spec or {})}, **status)


def k8s_job(*conditions, suspend=False):
    return {"metadata": {"name": "support-bot-trainer", "uid": "j"}, "spec": {"suspend": suspend},
            "status": {"conditions": [{"type": t, "status": "True", "reason": r, "message": m}
                                      for t, r, m in conditions]}}


def pod(name, phase="Running", *, created="2025-01-01T11:00:00Z", conditions=(), state=None, gpus=2):
    state = state if state is not None else (
        {"running": {"startedAt": "2025-01-01T11:00:00Z"}} if phase == "Running" else {})
    return {"metadata": {"name": name, "uid": f"uid-{name}", "creationTimestamp": created},
            "spec": {"containers": [{"name": "trainer", "resources": {"limits": {"nvidia.com/gpu": str(gpus)}}}]},
            "status": {"phase": phase, "conditions": list(conditions),
                       "containerStatuses": [{"name": "trainer", "image": "img", "state": state}] if state else []}}


def terminated(code, reason="Error", message="", start="2025-01-01T11:00:00Z", end="2025-01-01T11:30:00Z"):
    return {"terminated": {"exitCode": code, "reason": reason, "message": message,
                           "startedAt": start, "finishedAt": end}}


DISRUPTED = {"type": "DisruptionTarget", "status": "True", "reason": "PreemptionByScheduler",
             "message": "preempted by a higher-priority pod"}


def test_not_yet_admitted_job_is_pending_with_the_admission_reason():
    cond = [{"type": "Admitted", "status": "False", "reason": "SecretNotFound", "message": "create it",
             "lastTransitionTime": "2025-01-01T10:00:00Z"}]
    o = derive(job(conditions=cond), None, [], now=NOW)
    assert (o.phase, o.reason) == (Phase.PENDING, "SecretNotFound")


def test_admitted_without_job_is_pending_creating():
    assert derive(job(), None, [], now=NOW).reason == "Creating"


def test_unschedulable_pod_carries_the_schedulers_message():
    p = pod("p0", "Pending", state={}, conditions=[{
        "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
        "message": "0/5 nodes are available: 2 Insufficient nvidia.com/gpu."}])
    o = derive(job(), k8s_job(), [p], now=NOW)
    assert (o.phase, o.reason) == (Phase.PENDING, "Unschedulable")
    assert "2 Insufficient nvidia.com/gpu" in o.message


@pytest.mark.parametrize("reason", ["ImagePullBackOff", "ErrImagePull"])
def test_image_problems_are_reported(reason):
    p = pod("p0", "Pending", state={"waiting": {"reason": reason, "message": "not found"}})
    o = derive(job(), k8s_job(), [p], now=NOW)
    assert (o.phase, o.reason) == (Phase.PENDING, reason) and "not found" in o.message


def test_running_without_progress_is_validating_then_training_then_evaluating():
    running = [pod("p0")]
    assert derive(job(), k8s_job(), running, now=NOW).phase is Phase.VALIDATING
    # #14 item 3: training has begun once the trainer reports its total (at step 0, forced);
    # waiting for the first logged step skipped Training for runs shorter than a status write.
    begun = derive(job(progress={"step": 0, "totalSteps": 10}), k8s_job(), running, now=NOW)
    assert begun.phase is Phase.TRAINING
    training = job(progress={"step": 5, "totalSteps": 10})
    o = derive(training, k8s_job(), running, now=NOW)
    assert (o.phase, o.message) == (Phase.TRAINING, "step 5/10")
    assert derive(job(progress={"step": 10, "totalSteps": 10}), k8s_job(), running, now=NOW).phase \
        is Phase.EVALUATING


def test_completed_job_succeeds_or_deploys():
    done = k8s_job(("Complete", "CompletionsReached", ""))
    no_comparison = {"evaluation": {"comparison": {"enabled": False}}}
    assert derive(job(no_comparison), done, [], now=NOW).phase is Phase.SUCCEEDED
    assert derive(job({**no_comparison, "deploy": {"inferenceService": "bot"}}), done, [], now=NOW).phase \
        is Phase.DEPLOYING


def test_trainer_pod_succeeded_before_the_job_completes_is_not_pending_again():
    """Between the pod's exit 0 and the Job's Complete condition the job must not go back to
    Pending. One seen running stays as written (#14: a phase of its own for that moment cost a
    status patch and an Event per job); the Job's Complete event moves it on."""
    finished = [pod("p0", "Succeeded", state=terminated(0, "Completed"))]
    running = ADMITTED + [{"type": "Running", "status": "True", "reason": "Validating",
                           "message": "the trainer is validating the dataset and loading the model",
                           "observedGeneration": 1, "lastTransitionTime": "2025-01-01T11:00:00Z"}]
    seen = job(phase="Validating", conditions=running)
    o = derive(seen, k8s_job(), finished, now=NOW)
    assert (o.phase, o.reason, o.message) == (Phase.VALIDATING, "Validating",
                                              "the trainer is validating the dataset and loading the model")
    patch = status_patch(seen, o, now=NOW, gpu_hour_price=0, existing_conditions=running)
    assert [c for c in patch["conditions"] if c["type"] == "Running"] == running[1:]  # nothing to write
    # Never seen running (its whole run fell between two refreshes): the trainer finished.
    o = derive(job(progress={"step": 10, "totalSteps": 10}), k8s_job(), finished, now=NOW)
    assert (o.phase, o.reason) == (Phase.EVALUATING, "TrainerFinished")
    assert derive(seen, k8s_job(("Complete", "CompletionsReached", "")), finished, now=NOW).phase \
        is Phase.COMPARING


def test_exit_42_fails_with_the_trainers_reason_and_first_errors():
    message = json.dumps({"reason": "DataValidationFailed", "message": "3 of 10 records invalid",
                          "firstErrors": ["line 4: field \"output\" is missing"]})
    p = pod("p0", "Failed", state=terminated(42, message=message))
    o = derive(job(), k8s_job(("Failed", "PodFailurePolicy", "container trainer exited 42")), [p], now=NOW)
    assert (o.phase, o.reason) == (Phase.FAILED, "DataValidationFailed")
    assert "line 4" in o.message and "3 of 10" in o.message


def test_oom_killed_is_named_while_retrying_and_when_retries_run_out():
    oom = pod("p0", "Failed", state=terminated(137, reason="OOMKilled"))
    o = derive(job(), k8s_job(), [oom], now=NOW)
    assert (o.phase, o.reason) == (Phase.PENDING, "OOMKilled")
    o = derive(job(), k8s_job(("Failed", "BackoffLimitExceeded", "")), [oom], now=NOW)
    assert (o.phase, o.reason) == (Phase.FAILED, "OOMKilled")


def test_backoff_limit_exceeded_reports_the_last_failure():
    crashes = [pod(f"p{i}", "Failed", created=f"2025-01-01T11:0{i}:00Z",
                   state=terminated(43, message='{"reason": "CudaError", "message": "device lost"}'))
               for i in range(4)]
    o = derive(job(), k8s_job(("Failed", "BackoffLimitExceeded", "")), crashes, now=NOW)
    assert (o.phase, o.reason) == (Phase.FAILED, "BackoffLimitExceeded")
    assert "4 times" in o.message and "device lost" in o.message
    assert o.restarts == 4


def test_deadline_exceeded():
    o = derive(job(), k8s_job(("Failed", "DeadlineExceeded", "Job was active longer than specified")), [],
               now=NOW)
    assert (o.phase, o.reason) == (Phase.FAILED, "DeadlineExceeded")


def test_preempted_pod_is_reported_then_resumed_without_counting_a_restart():
    gone = pod("p0", "Failed", conditions=[DISRUPTED], state=terminated(143))
    o = derive(job(), k8s_job(), [gone], now=NOW)
    assert (o.phase, o.reason) == (Phase.PENDING, "Preempted")
    assert o.restarts == 0
    again = pod("p1", created="2025-01-01T11:40:00Z", state={"running": {"startedAt": "2025-01-01T11:41:00Z"}})
    o = derive(job(progress={"step": 3, "totalSteps": 10}), k8s_job(), [gone, again], now=NOW)
    assert (o.phase, o.reason) == (Phase.TRAINING, "Resumed")
    assert o.restarts == 0 and o.attempts == 2


def test_suspended_spec_and_queued_job():
    assert derive(job({"suspend": True}), k8s_job(suspend=True), [], now=NOW).phase is Phase.SUSPENDED
    assert derive(job({"suspend": True}), None, [], now=NOW).phase is Phase.SUSPENDED
    queued = job({"resources": {"gpusPerNode": 2, "queueName": "team-a"}})
    o = derive(queued, k8s_job(suspend=True), [], now=NOW)
    assert (o.phase, o.reason) == (Phase.PENDING, "Queued")


def test_terminal_phase_is_sticky():
    failed = job(phase="Failed", conditions=ADMITTED + [{
        "type": "Failed", "status": "True", "reason": "InsufficientGPUCapacity", "message": "too big",
        "lastTransitionTime": "2025-01-01T10:00:00Z"}])
    o = derive(failed, k8s_job(), [pod("p0")], now=NOW)
    assert (o.phase, o.reason) == (Phase.FAILED, "InsufficientGPUCapacity")


def test_gpu_hours_add_finished_and_running_pods_and_keep_gone_ones():
    finished = pod("p0", "Failed", conditions=[DISRUPTED], state=terminated(143))  # 30 min x 2 GPUs
    running = pod("p1", created="2025-01-01T11:40:00Z",
                  state={"running": {"startedAt": "2025-01-01T11:30:00Z"}})  # 30 min x 2 GPUs
    o = derive(job(), k8s_job(), [finished, running], now=NOW, recorded_gpu_seconds={"uid-gone": 3600})
    assert o.gpu_hours == pytest.approx(3.0)
    patch = status_patch(job(), o, now=NOW, gpu_hour_price=2.5, existing_conditions=ADMITTED)
    assert patch["gpuHours"] == pytest.approx(3.0) and patch["estimatedCost"] == "7.50"
    assert "progress" not in patch and "metrics" not in patch and "checkpoints" not in patch


def test_conditions_keep_transition_time_unless_status_changes():
    first = set_conditions([], [ConditionUpdate("Running", "True", "Training", "a")], generation=1,
                           now="2025-01-01T10:00:00Z")
    same = set_conditions(first, [ConditionUpdate("Running", "True", "Training", "b")], generation=2,
                          now="2025-01-01T11:00:00Z")
    assert same[0]["lastTransitionTime"] == "2025-01-01T10:00:00Z"
    assert same[0]["message"] == "b" and same[0]["observedGeneration"] == 2
    flipped = set_conditions(same, [ConditionUpdate("Running", "False", "Suspended", "c")], generation=2,
                             now="2025-01-01T12:00:00Z")
    assert flipped[0]["lastTransitionTime"] == "2025-01-01T12:00:00Z" and len(flipped) == 1


def test_termination_summary_reads_json_or_plain_text():
    assert termination_summary('{"reason": "X", "message": "m"}') == ("X", "m")
    assert termination_summary("Traceback ... boom") == (None, "Traceback ... boom")


def test_admission_problems():
    spec = {"model": {"source": "org/m", "tokenSecretRef": {"name": "hf"}},
            "dataset": {"source": "pvc://shared/d.jsonl"},
            "resources": {"gpusPerNode": 16, "priorityClassName": "high"}}
    j = make_job(spec)
    assert check(j, ClusterFacts()).reason == "SecretNotFound"
    assert check(j, ClusterFacts(secrets={"hf": {"other"}})).reason == "SecretKeyNotFound"
    facts = ClusterFacts(secrets={"hf": {"token"}})
    assert check(j, facts).reason == "ClaimNotFound" and check(j, facts).retryable
    facts.claims = {"shared"}
    facts.priority_classes = set()
    assert check(j, facts).reason == "PriorityClassNotFound"
    facts.priority_classes = {"high"}
    facts.node_gpus = [8, 8, 0]
    # By default a pool that can grow is assumed: no problem, a note for the event.
    assert check(j, facts) is None
    assert "largest current node has 8" in capacity_note(j, facts)
    problem = check(j, facts, capacity_policy="fail")
    assert problem.reason == "InsufficientGPUCapacity" and not problem.retryable
    assert "largest current node has 8" in problem.message and "--capacity-policy fail" in problem.message
    # A job whose trainer Job exists (suspend/resume re-runs admission) is never failed by it.
    assert check(j, facts, capacity_policy="fail", has_trainer=True) is None
    facts.node_gpus = [16]
    assert check(j, facts, capacity_policy="fail") is None and capacity_note(j, facts) is None


def test_waiting_for_the_same_thing_writes_nothing_new():
    from finetune_operator.admission import Problem
    from finetune_operator.status import admission_status

    problem = Problem("SecretNotFound", "spec.model.tokenSecretRef: Secret ns/hf does not exist", True)
    first = admission_status(job(conditions=[]), problem, [], now="2025-01-01T10:00:00Z")
    assert first["phase"] == "Pending"
    again = job(conditions=first["conditions"], phase="Pending")
    assert admission_status(again, problem, first["conditions"], now="2025-01-01T10:00:10Z") is None
    other = Problem("ClaimNotFound", "spec.storage.existingClaim: claim ns/c does not exist", True)
    assert admission_status(again, other, first["conditions"], now="2025-01-01T10:00:20Z") is not None
