"""What an InferenceService may serve, and how its rollout reads: pure functions, no cluster."""

from __future__ import annotations

import pytest

from finetune_operator.serving import checks, common
from finetune_operator.serving import rollout as rollouts
from finetune_operator.serving import status as serving_status
from finetune_operator.serving import handlers as handler
from tests.fixtures.inference import finetunejob, inferenceservice, parse


def adapter(job: str = "support-lora") -> dict:
    return {"name": job, "fineTuneJobRef": {"name": job}}


def reasons(isvc_body, *jobs) -> list[str]:
    isvc, parsed = parse(isvc_body, *jobs)
    names = common.referenced_jobs(isvc)
    return [p.reason for p in checks.check(isvc, {n: parsed.get(n) for n in names})]


def test_a_matching_succeeded_lora_job_is_servable():
    assert reasons(inferenceservice(adapters=[adapter()]), finetunejob("support-lora")) == []


def test_rank_above_max_lora_rank_is_refused():
    isvc = inferenceservice(adapters=[adapter()], vllm={"maxLoraRank": 16})
    isvc_obj, jobs = parse(isvc, finetunejob("support-lora", r=64))
    [problem] = checks.check(isvc_obj, jobs)
    assert problem.reason == "LoraRankTooHigh" and not problem.waiting
    assert "raise spec.vllm.maxLoraRank to at least 64" in problem.message


def test_adapter_of_a_full_fine_tuning_job_is_refused():
    assert reasons(inferenceservice(adapters=[adapter()]),
                   finetunejob("support-lora", method="full")) == ["AdapterFromFullFineTuning"]


def test_adapter_of_another_base_model_is_refused():
    assert reasons(inferenceservice(adapters=[adapter()]),
                   finetunejob("support-lora", source="meta-llama/Llama-3.1-8B")) == ["BaseModelMismatch"]


def test_hub_prefix_does_not_make_a_different_model():
    assert reasons(inferenceservice(adapters=[adapter()]),
                   finetunejob("support-lora", source="hf://Qwen/Qwen2.5-0.5B-Instruct")) == []


@pytest.mark.parametrize("phase", [None, "Training", "Failed"])
def test_missing_or_unfinished_jobs_are_waited_for(phase):
    jobs = [finetunejob("support-lora", phase=phase)] if phase else []
    isvc, parsed = parse(inferenceservice(adapters=[adapter()]), *jobs)
    [problem] = checks.check(isvc, {"support-lora": parsed.get("support-lora")})
    assert problem.waiting
    assert problem.reason == ("FineTuneJobNotSucceeded" if phase else "FineTuneJobNotFound")


def test_merged_model_needs_a_merged_artifact():
    isvc = inferenceservice(mergedModel={"fineTuneJobRef": {"name": "j"}})
    assert reasons(isvc, finetunejob("j")) == ["NoMergedModel"]
    assert reasons(isvc, finetunejob("j", merge=True)) == []
    assert reasons(isvc, finetunejob("j", method="full")) == []


@pytest.mark.parametrize("arg", ["--port=9000", "--host", "--model", "--served_model_name", "--api-key",
                                 "--lora-modules", "--mod", "--max-lora-rank=64", "-tp", "@args.txt",
                                 "--chat-template\nrm -rf /"])
def test_extra_args_that_break_the_contract_are_refused(arg):
    assert checks.check_extra_args([arg]), arg


def test_harmless_extra_args_pass():
    assert checks.check_extra_args(["--enable-prefix-caching", "--max-num-seqs", "64",
                                     "--kv-cache-dtype=fp8"]) == []


def test_extra_args_problems_name_the_field_to_use():
    [message] = checks.check_extra_args(["--max-lora-rank=64"])
    assert "spec.vllm.maxLoraRank" in message and "extraArgs[0]" in message


def test_s3_sources_are_refused_with_a_way_out():
    isvc = inferenceservice(adapters=[{"name": "x", "path": "s3://bucket/adapter"}])
    assert reasons(isvc) == ["UnsupportedSource"]


def deployment(replicas=2, updated=2, ready=2, available=2, total=2, conditions=(), generation=1):
    return {"metadata": {"generation": generation}, "spec": {"replicas": replicas},
            "status": {"observedGeneration": generation, "replicas": total, "updatedReplicas": updated,
                       "readyReplicas": ready, "availableReplicas": available, "conditions": list(conditions)}}


def pod(revision="r2", restarts=0, ready=False, waiting=None):
    state = {"waiting": {"reason": waiting}} if waiting else {"running": {}}
    return {"metadata": {"name": "p", "annotations": {common.REVISION_ANNOTATION: revision}},
            "status": {"containerStatuses": [{"name": "vllm", "restartCount": restarts, "ready": ready,
                                              "state": state}]}}


def test_complete_rollout_is_ready():
    assert rollouts.rollout(deployment(), [pod(ready=True), pod(ready=True)], "r2").phase == common.ServingPhase.READY


def test_counters_that_lag_the_new_pods_are_not_ready_yet():
    """Right after a template change the Deployment may count the old ready pod as updated."""
    lagging = deployment(replicas=1, updated=1, ready=1, available=1, total=1)
    assert rollouts.rollout(lagging, [pod(revision="r1", ready=True), pod(revision="r2")], "r2").phase \
        == common.ServingPhase.PROGRESSING


def test_surge_pod_not_ready_yet_is_progressing_while_old_pods_serve():
    state = rollouts.rollout(deployment(updated=1, total=3), [pod()], "r2")
    assert state.phase == common.ServingPhase.PROGRESSING and state.ready_replicas == 2


def test_crash_looping_new_pods_are_degraded_while_old_pods_serve():
    state = rollouts.rollout(deployment(updated=1, total=3), [pod(restarts=3)], "r2")
    assert state.phase == common.ServingPhase.DEGRADED and state.reason == "CrashLoop"
    assert "2 ready replica(s) keep serving" in state.message
    assert rollouts.rollout(deployment(updated=1, total=3), [pod(waiting="CrashLoopBackOff")], "r2").phase \
        == common.ServingPhase.DEGRADED


def test_crash_loops_of_an_old_revision_do_not_degrade_the_new_one():
    pods = [pod(revision="r1", restarts=5), pod(ready=True), pod(ready=True)]
    assert rollouts.rollout(deployment(), pods, "r2").phase == common.ServingPhase.READY


def test_progress_deadline_exceeded_is_degraded():
    stuck = {"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded",
             "message": 'ReplicaSet "x" has timed out progressing.'}
    assert rollouts.rollout(deployment(updated=1, total=3, conditions=[stuck]), [], "r2").reason \
        == "ProgressDeadlineExceeded"


def test_status_reports_url_served_models_and_conditions_with_generation():
    isvc, _ = parse(inferenceservice(adapters=[adapter()], vllm={"servedModelName": "qwen"}))
    status = serving_status.status_for(isvc, [], deployment(), [pod(ready=True), pod(ready=True)], "r2", [],
                                "2025-01-01T00:00:00Z")
    assert status["phase"] == "Ready" and status["revision"] == "r2"
    assert status["url"] == "http://support.ml.svc.cluster.local:8000/v1"
    assert status["servedModels"] == ["qwen", "support-lora"]
    assert {c["type"]: c["status"] for c in status["conditions"]} == {
        "Ready": "True", "Progressing": "False", "Degraded": "False"}
    assert all(c["observedGeneration"] == 1 for c in status["conditions"])


def test_status_with_a_waiting_problem_is_pending():
    isvc, _ = parse(inferenceservice(adapters=[adapter()]))
    problem = checks.Problem("FineTuneJobNotFound", "FineTuneJob support-lora does not exist", True)
    status = serving_status.status_for(isvc, [problem], None, [], None, [], "2025-01-01T00:00:00Z")
    assert status["phase"] == "Pending"
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert ready["reason"] == "FineTuneJobNotFound"


def test_a_second_job_adds_its_adapter_and_a_rerun_replaces_its_entry():
    first = handler._new_isvc(parse(inferenceservice(), finetunejob("a", deploy={"inferenceService": "s"}))[1]["a"],
                              "s")
    assert first["spec"]["adapters"] == [adapter("a")]
    job_b = parse(inferenceservice(), finetunejob("b", deploy={"inferenceService": "s"}))[1]["b"]
    spec = handler._with_job(first["spec"], job_b, "s")
    assert spec["adapters"] == [adapter("a"), adapter("b")]
    assert handler._with_job(spec, job_b, "s") == spec


def test_a_full_fine_tuning_job_cannot_join_an_adapter_server():
    job = parse(inferenceservice(), finetunejob("f", method="full", deploy={}))[1]["f"]
    with pytest.raises(handler.DeployConflict, match="full fine-tuning"):
        handler._with_job({"model": {"source": "x"}, "adapters": [adapter("a")]}, job, "s")


def test_a_job_deployed_to_a_server_of_its_own_name_serves_the_base_as_name_base():
    isvc, _ = parse(inferenceservice("support-lora", adapters=[adapter()]))
    assert common.served_model_name(isvc) == "support-lora-base"
    explicit, _ = parse(inferenceservice("support-lora", adapters=[adapter()],
                                         vllm={"servedModelName": "support-lora"}))
    assert [p.reason for p in checks.check(explicit, {"support-lora": None})][0] == "AdapterNameConflict"
