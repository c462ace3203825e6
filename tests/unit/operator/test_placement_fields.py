"""Placement and model fields that reach the pods (issue 17's field audit): trainer Job
tolerationSeconds, affinity and image; InferenceService model.revision, trustRemoteCode,
mergedModel.path, tolerations, affinity and priorityClassName."""

from __future__ import annotations

from finetune_api.models import FineTuneJob, InferenceService
from finetune_operator.builders import trainer_job
from finetune_operator.serving import deployment
from tests.fixtures.inference import inferenceservice

AFFINITY = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
    {"matchExpressions": [{"key": "pool", "operator": "In", "values": ["a100", "h200"]}]}]}}}
TOLERATION = {"key": "spot", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 120}


def test_trainer_pods_take_the_affinity_toleration_seconds_and_image_of_the_spec():
    job = FineTuneJob.from_resource({
        "metadata": {"name": "placed", "namespace": "ml", "uid": "u", "generation": 1},
        "spec": {"model": {"source": "/models/m"}, "dataset": {"source": "pvc://d/train.jsonl"},
                 "resources": {"gpusPerNode": 1, "affinity": AFFINITY, "tolerations": [TOLERATION],
                               "image": "registry.example.com/trainer:pinned"}}})
    pod = trainer_job.build_trainer_job(job, "default/trainer:latest")["spec"]["template"]["spec"]
    assert pod["affinity"] == AFFINITY
    assert TOLERATION in pod["tolerations"]
    assert {c["image"] for c in pod["containers"]} == {"registry.example.com/trainer:pinned"}


def test_vllm_pods_take_revision_trust_remote_code_and_the_placement_fields():
    body = inferenceservice("placed", model={"source": "org/base", "revision": "v2.1", "trustRemoteCode": True},
                            resources={"gpus": 1, "tolerations": [TOLERATION], "affinity": AFFINITY,
                                       "priorityClassName": "serving-high"})
    d = deployment.build_deployment(InferenceService.from_resource(body), {})
    pod = d["spec"]["template"]["spec"]
    cmd = pod["containers"][0]["command"]
    assert cmd[cmd.index("--revision") + 1] == "v2.1" and "--trust-remote-code" in cmd
    assert TOLERATION in pod["tolerations"] and pod["affinity"] == AFFINITY
    assert pod["priorityClassName"] == "serving-high"
    plain = deployment.build_deployment(InferenceService.from_resource(inferenceservice("plain")), {})
    plain_cmd = plain["spec"]["template"]["spec"]["containers"][0]["command"]
    assert "--revision" not in plain_cmd and "--trust-remote-code" not in plain_cmd
    assert "affinity" not in plain["spec"]["template"]["spec"]


def test_a_merged_model_path_on_a_claim_is_mounted_and_served():
    body = inferenceservice("merged", mergedModel={"path": "pvc://models/team/merged-v3"})
    d = deployment.build_deployment(InferenceService.from_resource(body), {})
    pod = d["spec"]["template"]["spec"]
    cmd = pod["containers"][0]["command"]
    assert cmd[cmd.index("--model") + 1] == "/mnt/pvc/models/team/merged-v3" and "--enable-lora" not in cmd
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
    mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    (volume,) = [v for v, claim in claims.items() if claim == "models"]
    assert mounts[volume] == "/mnt/pvc/models"
