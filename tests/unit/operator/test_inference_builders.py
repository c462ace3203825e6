"""The InferenceService builders: golden manifests and the properties the pods rely on.

Update the golden files after an intended change with
`UPDATE_GOLDEN=1 python -m pytest tests -k golden` (or `make generate`; tests/fixtures/golden.py).
"""

from __future__ import annotations

import copy

import pytest
import yaml

from finetune_operator.serving import autoscaling, common, deployment, disruption, monitoring, service
from tests.fixtures.golden import GOLDEN as GOLDEN_DIR
from tests.fixtures.golden import assert_golden
from tests.fixtures.inference import finetunejob, inferenceservice, parse

GOLDEN = GOLDEN_DIR / "inference"


def two_adapters_case():
    isvc = inferenceservice(
        adapters=[{"name": "support-lora", "fineTuneJobRef": {"name": "support-lora"}},
                  {"name": "legal-lora", "fineTuneJobRef": {"name": "legal-lora"}},
                  {"name": "faq-v1", "path": "pvc://adapters/faq-v1"}],
        replicas=2,
        resources={"gpus": 1, "cpu": "4", "memory": "24Gi", "nodeSelector": {"pool": "gpu"}},
        vllm={"servedModelName": "qwen-base", "maxModelLen": 4096, "maxLoraRank": 16, "maxLoras": 2,
              "dtype": "bfloat16", "gpuMemoryUtilization": 0.85, "tensorParallelSize": 1,
              "extraArgs": ["--enable-prefix-caching"]})
    jobs = [finetunejob("support-lora", uid="uid-1"),
            finetunejob("legal-lora", uid="uid-2", existing_claim="legal-data")]
    return isvc, jobs


def merged_case():
    isvc = inferenceservice(
        "chat", model={"source": "hf://meta-llama/Llama-3.1-8B-Instruct",
                       "tokenSecretRef": {"name": "hf-token", "key": "token"}},
        mergedModel={"fineTuneJobRef": {"name": "chat-full"}},
        resources={"gpus": 2}, vllm={"tensorParallelSize": 2})
    return isvc, [finetunejob("chat-full", source="hf://meta-llama/Llama-3.1-8B-Instruct", method="full",
                              uid="uid-3")]


def cpu_autoscaling_case():
    isvc = inferenceservice(
        "tiny", model={"source": "pvc://models/tiny-llama"},
        resources={"gpus": 0, "memory": "8Gi"},
        vllm={"maxModelLen": 256},
        autoscaling={"minReplicas": 2, "maxReplicas": 6, "targetRequestsWaiting": 3})
    return isvc, []


CASES = {"two-adapters": two_adapters_case, "merged-model": merged_case, "cpu-autoscaling": cpu_autoscaling_case}


def render(case: str) -> list[dict]:
    isvc_body, job_bodies = CASES[case]()
    isvc, jobs = parse(isvc_body, *job_bodies)
    docs = [deployment.build_deployment(isvc, jobs), service.build_service(isvc)]
    if disruption.wants_pdb(isvc):
        docs.append(disruption.build_pdb(isvc))
    docs.append(monitoring.build_pod_monitor(isvc))
    if isvc.spec.autoscaling:
        docs += [autoscaling.build_hpa(isvc), autoscaling.build_scaled_object(isvc)]
    return docs


@pytest.mark.parametrize("case", sorted(CASES))
def test_rendered_children_match_golden_files(case):
    assert_golden(GOLDEN / f"{case}.yaml", yaml.safe_dump_all(render(case), sort_keys=True))


def render_deployment(isvc_body, *jobs):
    isvc, parsed = parse(isvc_body, *jobs)
    return deployment.build_deployment(isvc, parsed)


def test_command_is_the_openai_server_module_with_lora_enabled_and_no_adapter_in_it():
    isvc, jobs = parse(*_flatten(two_adapters_case()))
    cmd = deployment.vllm_command(isvc, jobs)
    assert cmd[:3] == ["python", "-m", "vllm.entrypoints.openai.api_server"]
    assert cmd[cmd.index("--model") + 1] == "Qwen/Qwen2.5-0.5B-Instruct"
    assert cmd[cmd.index("--served-model-name") + 1] == "qwen-base"
    assert cmd[cmd.index("--port") + 1] == "8000" and cmd[cmd.index("--host") + 1] == "0.0.0.0"
    # Adapters are loaded at run time (serving/adapters.py), never named in the command.
    assert "--enable-lora" in cmd and "--lora-modules" not in cmd
    assert cmd[cmd.index("--max-lora-rank") + 1] == "16"
    env = deployment.build_deployment(isvc, jobs)["spec"]["template"]["spec"]["containers"][0]["env"]
    assert {"name": "VLLM_ALLOW_RUNTIME_LORA_UPDATING", "value": "True"} in env
    # legal-lora's job trained on a shared storage.existingClaim: its outputs are in jobs/<name>/.
    assert deployment.adapter_paths(isvc, jobs) == [
        "/adapters/support-lora-workspace/artifacts/adapter",
        "/adapters/legal-data/jobs/legal-lora/artifacts/adapter",
        "/mnt/pvc/adapters/faq-v1"]
    assert cmd[-1] == "--enable-prefix-caching"
    # A server created without adapters can take one later: LoRA is on all the same.
    bare, _ = parse(inferenceservice())
    assert "--enable-lora" in deployment.vllm_command(bare, {})


def test_adapters_of_a_job_mount_its_claim_read_only():
    d = render_deployment(*_flatten(two_adapters_case()))
    pod = d["spec"]["template"]["spec"]
    claims = {v["persistentVolumeClaim"]["claimName"]: v["name"] for v in pod["volumes"]
              if "persistentVolumeClaim" in v}
    assert claims.keys() == {"support-lora-workspace", "legal-data", "adapters"}
    mounts = {m["name"]: m for m in pod["containers"][0]["volumeMounts"]}
    assert mounts[claims["support-lora-workspace"]]["mountPath"] == "/adapters/support-lora-workspace"
    assert mounts[claims["legal-data"]]["mountPath"] == "/adapters/legal-data"
    assert all(mounts[v]["readOnly"] for v in claims.values())


def test_adapters_on_a_mounted_claim_change_nothing_in_the_template():
    """Only what needs a restart is in the template: a second job on the shared claim, or a
    retrained adapter, is loaded at run time; a claim not mounted yet needs a new volume."""
    isvc_body, jobs = two_adapters_case()
    before = render_deployment(isvc_body, *jobs)["spec"]["template"]
    more = copy.deepcopy(isvc_body)
    more["spec"]["adapters"].append({"name": "hr", "fineTuneJobRef": {"name": "hr"}})
    hr = finetunejob("hr", uid="uid-3", existing_claim="legal-data")
    assert render_deployment(more, *jobs, hr)["spec"]["template"] == before  # and back: removing it
    own_claim = finetunejob("hr", uid="uid-3")
    assert render_deployment(more, *jobs, own_claim)["spec"]["template"] != before


def test_merged_model_of_a_full_job_is_the_served_model():
    isvc, jobs = parse(*_flatten(merged_case()))
    cmd = deployment.vllm_command(isvc, jobs)
    assert cmd[cmd.index("--model") + 1] == "/models/chat-full-workspace/artifacts/merged"
    assert "--enable-lora" not in cmd
    assert cmd[cmd.index("--tensor-parallel-size") + 1] == "2"


def test_rolling_update_never_drops_a_serving_replica():
    d = render_deployment(*_flatten(two_adapters_case()))
    assert d["spec"]["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
    c = d["spec"]["template"]["spec"]["containers"][0]
    assert c["startupProbe"]["httpGet"]["path"] == "/health"
    assert c["startupProbe"]["failureThreshold"] * c["startupProbe"]["periodSeconds"] >= 1200
    assert d["spec"]["progressDeadlineSeconds"] > 1200
    assert c["readinessProbe"]["httpGet"]["path"] == c["livenessProbe"]["httpGet"]["path"] == "/health"


def test_a_new_adapter_version_keeps_the_revision_and_a_new_merged_model_changes_it():
    isvc_body, jobs = two_adapters_case()
    before = render_deployment(isvc_body, *jobs)["spec"]["template"]["metadata"]["annotations"]
    retrained = [finetunejob("support-lora", uid="uid-1b", completion_time="2025-02-01T00:00:00Z"), jobs[1]]
    after = render_deployment(isvc_body, *retrained)["spec"]["template"]["metadata"]["annotations"]
    assert before[common.REVISION_ANNOTATION] == after[common.REVISION_ANNOTATION]
    isvc_body, jobs = merged_case()
    before = render_deployment(isvc_body, *jobs)["spec"]["template"]["metadata"]["annotations"]
    retrained = [dict(jobs[0], metadata=dict(jobs[0]["metadata"], uid="uid-new"))]
    after = render_deployment(isvc_body, *retrained)["spec"]["template"]["metadata"]["annotations"]
    assert before[common.REVISION_ANNOTATION] != after[common.REVISION_ANNOTATION]


def test_gpus_are_limits_and_gpu_taints_are_tolerated():
    d = render_deployment(*_flatten(two_adapters_case()))
    pod = d["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]


def test_cpu_serving_sizes_the_kv_cache_from_memory_and_asks_for_no_gpu():
    d = render_deployment(*_flatten(cpu_autoscaling_case()))
    c = d["spec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in c["resources"].get("limits", {})
    assert {"name": "VLLM_CPU_KVCACHE_SPACE", "value": "2"} in c["env"]
    assert "replicas" not in d["spec"], "the autoscaler owns replicas"


def test_pdb_only_when_more_than_one_replica():
    one, _ = parse(inferenceservice(replicas=1))
    two, _ = parse(inferenceservice(replicas=2))
    assert not disruption.wants_pdb(one) and disruption.wants_pdb(two)
    assert disruption.build_pdb(two)["spec"]["minAvailable"] == 1


def test_scrape_annotations_and_service_port():
    isvc, jobs = parse(inferenceservice())
    d = deployment.build_deployment(isvc, jobs)
    ann = d["spec"]["template"]["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true" and ann["prometheus.io/port"] == "8000"
    assert ann["prometheus.io/path"] == "/metrics"
    assert service.build_service(isvc)["spec"]["ports"] == [
        {"name": "http", "port": 8000, "targetPort": "http", "protocol": "TCP"}]
    assert common.service_url(isvc) == "http://support.ml.svc.cluster.local:8000/v1"


def test_restricted_security_context():
    d = render_deployment(inferenceservice())
    pod = d["spec"]["template"]["spec"]
    sc = pod["containers"][0]["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["runAsNonRoot"] is True and sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False


def _flatten(case):
    isvc, jobs = case
    return (isvc, *jobs)


def test_the_operators_vllm_image_is_used_unless_the_spec_names_one():
    plain, _ = parse(inferenceservice("plain"))
    own, _ = parse(inferenceservice("own", vllm={"image": "example/own:1"}))

    def image(isvc, *default):
        return deployment.build_deployment(isvc, {}, *default)["spec"]["template"]["spec"]["containers"][0]["image"]

    assert image(plain) == deployment.DEFAULT_IMAGE
    assert image(plain, "registry.example/vllm:2") == "registry.example/vllm:2"
    assert image(own, "registry.example/vllm:2") == "example/own:1"
