"""The comparison step and the approval gate in the pure status derivation, and the
comparison Job's manifest (issue 22)."""

from __future__ import annotations

from finetune_operator.builders.comparison_job import build_comparison_job
from finetune_operator.conditions import APPROVED, COMPARED
from finetune_operator.status import Phase, derive, status_patch
from tests.unit.operator.test_builders_manifests import SINGLE, assert_json_golden, make_job
from tests.unit.operator.test_builders_status import ADMITTED, NOW, SPEC, k8s_job

DONE = k8s_job(("Complete", "CompletionsReached", ""))
MEASURED = {"state": "Measured", "message": "2 prompts and 8 eval records asked",
            "report": "/workspace/artifacts/comparison.json",
            "rows": [{"model": "base", "latencyP50Ms": 40.0}, {"model": "fine-tuned", "latencyP50Ms": 42.0}]}
GATED = {"deploy": {"inferenceService": "bot", "requireApproval": True}}


def job(spec=None, annotations=None, **status):
    status.setdefault("conditions", ADMITTED)
    status.setdefault("phase", "Evaluating")
    j = make_job({**SPEC, **(spec or {})}, **status)
    j.metadata.annotations.update(annotations or {})
    return j


def conditions(o):
    return {c.type: c for c in o.extra_conditions}


def test_a_trained_job_compares_before_it_succeeds():
    o = derive(job(), DONE, [], now=NOW)
    assert (o.phase, o.reason) == (Phase.COMPARING, "StartingComparison")
    running = {"metadata": {"name": "support-bot-compare"}, "status": {}}
    assert derive(job(), DONE, [], now=NOW, comparison_job=running).reason == "Comparing"


def test_a_measured_comparison_lets_the_job_succeed_with_compared_true():
    o = derive(job(comparison=MEASURED), DONE, [], now=NOW)
    assert o.phase is Phase.SUCCEEDED
    assert conditions(o)[COMPARED].status == "True"


def test_vllm_unavailable_is_a_condition_not_a_failed_training():
    o = derive(job(comparison={"state": "Unavailable", "message": "vLLM exited with code 1: out of memory"}),
               DONE, [], now=NOW)
    assert o.phase is Phase.SUCCEEDED
    c = conditions(o)[COMPARED]
    assert (c.status, c.reason) == ("False", "ComparisonUnavailable") and "out of memory" in c.message


def test_a_failed_comparison_job_does_not_fail_the_job():
    failed = k8s_job(("Failed", "BackoffLimitExceeded", "Job has reached the specified backoff limit"))
    o = derive(job({"deploy": {"inferenceService": "bot"}}), DONE, [], now=NOW, comparison_job=failed)
    assert o.phase is Phase.DEPLOYING
    assert conditions(o)[COMPARED].reason == "ComparisonFailed"


def test_disabled_comparison_goes_straight_on():
    o = derive(job({"evaluation": {"comparison": {"enabled": False}}}), DONE, [], now=NOW)
    assert o.phase is Phase.SUCCEEDED and COMPARED not in conditions(o)


def test_require_approval_waits_with_a_condition_that_says_where_the_report_is():
    o = derive(job(GATED, comparison=MEASURED), DONE, [], now=NOW)
    assert (o.phase, o.reason) == (Phase.AWAITING_APPROVAL, "AwaitingApproval")
    c = conditions(o)[APPROVED]
    assert c.status == "False"
    assert "/jobs/ml/support-bot/report" in c.message
    assert "/workspace/artifacts/comparison.json" in c.message
    assert "finetune.dev/approved=true" in c.message
    assert not o.phase.running and not o.phase.terminal


def test_approved_annotation_deploys():
    o = derive(job(GATED, {"finetune.dev/approved": "true"}, comparison=MEASURED), DONE, [], now=NOW)
    assert o.phase is Phase.DEPLOYING
    assert conditions(o)[APPROVED].status == "True"


def test_rejected_annotation_ends_succeeded_not_deployed_with_the_reason():
    o = derive(job(GATED, {"finetune.dev/approved": "false",
                           "finetune.dev/approval-reason": "answers are rude"}, comparison=MEASURED),
               DONE, [], now=NOW)
    assert (o.phase, o.reason) == (Phase.SUCCEEDED, "Rejected")
    assert "answers are rude" in o.message and "not deployed" in o.message
    c = conditions(o)[APPROVED]
    assert (c.status, c.reason) == ("False", "Rejected")


def test_approval_conditions_are_written_into_status():
    o = derive(job(GATED, comparison=MEASURED), DONE, [], now=NOW)
    patch = status_patch(job(GATED, comparison=MEASURED), o, now=NOW, gpu_hour_price=0,
                         existing_conditions=ADMITTED)
    types = {c["type"]: c for c in patch["conditions"]}
    assert patch["phase"] == "AwaitingApproval"
    assert types["Approved"]["reason"] == "AwaitingApproval" and types["Compared"]["status"] == "True"
    assert types["Running"]["status"] == "False"


def test_comparison_job_runs_the_compare_command_from_the_vllm_image_with_one_gpu():
    manifest = build_comparison_job(make_job(SINGLE), "vllm/vllm-openai:v0.32.0", 2.5)
    assert_json_golden("comparison-job", manifest)
    container = manifest["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["python", "-m", "finetune_trainer", "compare", "--config",
                                    "/etc/finetune/config.json", "--gpu-hour-price", "2.5", "--gpus", "1"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert manifest["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"] == "comparison"
    assert manifest["metadata"]["ownerReferences"][0]["uid"] == "1234-uid"
    assert {e["name"] for e in container["env"]} == {"HF_HOME", "POD_NAME", "HF_TOKEN", "FINETUNE_IMAGE"}


def test_comparison_job_prefers_the_deploy_sections_vllm_image():
    spec = {**SINGLE, "deploy": {"vllm": {"image": "registry.local/vllm:cpu"}}}
    manifest = build_comparison_job(make_job(spec), "vllm/vllm-openai:v0.32.0", 0.0)
    assert manifest["spec"]["template"]["spec"]["containers"][0]["image"] == "registry.local/vllm:cpu"


def test_a_comparing_or_waiting_job_is_never_trained_again_when_its_trainer_job_is_gone():
    o = derive(job(phase="Comparing"), None, [], now=NOW)
    assert o.phase is Phase.COMPARING
    o = derive(job(GATED, phase="AwaitingApproval", comparison=MEASURED), None, [], now=NOW)
    assert o.phase is Phase.AWAITING_APPROVAL


def test_a_rejected_job_is_not_deployed_by_a_late_deploy_change():
    rejected = job({"deploy": {"inferenceService": "other", "requireApproval": True}},
                   {"finetune.dev/approved": "false"}, phase="Succeeded", comparison=MEASURED)
    assert derive(rejected, DONE, [], now=NOW).phase is Phase.SUCCEEDED
    approved = job({"deploy": {"inferenceService": "other", "requireApproval": True}},
                   {"finetune.dev/approved": "true"}, phase="Succeeded", comparison=MEASURED)
    assert derive(approved, DONE, [], now=NOW).phase is Phase.DEPLOYING


def test_a_cpu_comparison_job_still_gets_a_memory_backed_dev_shm_for_vllm():
    """vLLM's engine allocates a 160 MiB shared-memory ring buffer on CPU too; a container's
    /dev/shm is 64 MiB on a real node (containerd), and vLLM exits without more."""
    spec = {**SINGLE, "resources": {**SINGLE["resources"], "gpusPerNode": 0}}
    pod = build_comparison_job(make_job(spec), "vllm/vllm-openai:v0.32.0", 0.0)["spec"]["template"]["spec"]
    assert {"name": "dshm", "emptyDir": {"medium": "Memory"}} in pod["volumes"]
    assert {"name": "dshm", "mountPath": "/dev/shm"} in pod["containers"][0]["volumeMounts"]
    assert [v["name"] for v in pod["volumes"]].count("dshm") == 1
