"""The pure builders render what the golden files say (issue 5).

Update the golden files after an intended change with:
    UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests -k golden   (tests/fixtures/golden.py)
"""

from __future__ import annotations

import json

import pytest

from finetune_api.models import FineTuneJob

from finetune_operator import admission, names
from finetune_operator.builders import comparison_job, identity, storage, trainer_config, trainer_job
from tests.fixtures.golden import GOLDEN, assert_golden

IMAGE = "ghcr.io/finetune-dev/finetune-trainer:test"


def assert_json_golden(name: str, obj: object) -> None:
    assert_golden(GOLDEN / f"{name}.json", json.dumps(obj, indent=2, sort_keys=True) + "\n", parse=json.loads)


def make_job(spec: dict, name: str = "support-bot", **status) -> FineTuneJob:
    return FineTuneJob.from_resource({
        "apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob",
        "metadata": {"name": name, "namespace": "ml", "uid": "1234-uid", "generation": 1},
        "spec": spec, "status": status})


SINGLE = {
    "model": {"source": "hf://meta-llama/Llama-3.1-8B-Instruct",
              "tokenSecretRef": {"name": "hf-token", "key": "token"}},
    "method": {"type": "qlora", "lora": {"r": 16, "alpha": 32, "targetModules": ["q_proj", "v_proj"]}},
    "dataset": {"source": "pvc://support-bot-workspace/data/support.jsonl", "format": "chat",
                "mix": {"source": "pvc://shared-data/general.jsonl", "ratio": 0.1}},
    "training": {"epochs": 3, "earlyStopping": {"patience": 3}},
    "resources": {"gpusPerNode": 1, "cpu": "8", "memory": "64Gi",
                  "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H200"},
                  "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ml",
                                   "effect": "NoSchedule"}],
                  "priorityClassName": "training", "activeDeadlineSeconds": 86400},
    "storage": {"size": "100Gi", "storageClassName": "fast", "reclaimPolicy": "Delete"},
    "output": {"merge": True, "push": {"uri": "s3://models/support-bot/"}},
    "objectStorage": {"secretRef": {"name": "s3-credentials"}},
}

MULTI = {
    "model": {"source": "/models/llama"},
    "method": {"type": "full"},
    "dataset": {"source": "pvc://corpus/train.jsonl", "format": "text"},
    "resources": {"gpusPerNode": 8, "nodes": 2, "queueName": "team-a"},
}


def test_workspace_claim_is_owned_only_with_reclaim_policy_delete():
    assert_json_golden("workspace-claim-delete", storage.build_workspace_claim(make_job(SINGLE)))
    retained = make_job({**SINGLE, "storage": {"size": "10Gi"}})
    claim = storage.build_workspace_claim(retained)
    assert "ownerReferences" not in claim["metadata"]
    assert_json_golden("workspace-claim-retain", claim)


def test_existing_claim_is_neither_created_nor_owned():
    job = make_job({**SINGLE, "storage": {"existingClaim": "mine", "reclaimPolicy": "Delete"}})
    assert storage.build_workspace_claim(job) is None
    assert storage.claim_name(job) == "mine"
    assert storage.desired_owner_references(job, []) == []


def test_multi_node_claim_is_read_write_many():
    claim = storage.build_workspace_claim(make_job(MULTI))
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]


def test_identity_grants_only_its_own_job_status():
    job = make_job(SINGLE)
    objs = [identity.build_service_account(job), identity.build_role(job), identity.build_role_binding(job)]
    assert_json_golden("identity", objs)
    role = objs[1]
    assert [rule["resourceNames"] for rule in role["rules"]] == [["support-bot"], ["support-bot"],
                                                                  ["support-bot-review"]]
    verbs = {v for rule in role["rules"] for v in rule["verbs"]}
    assert verbs == {"get", "patch"}


def test_trainer_config_renders_the_spec_without_secrets():
    job = make_job(SINGLE)
    text = trainer_config.render_config(job)
    assert_json_golden("trainer-config", json.loads(text))
    config = json.loads(text)
    assert config["model"]["tokenEnv"] == "HF_TOKEN"
    assert config["dataset"]["source"] == "/workspace/data/support.jsonl"
    assert config["dataset"]["mix"]["source"] == "/mnt/claims/shared-data/general.jsonl"
    assert config["job"] == {"name": "support-bot", "namespace": "ml", "uid": "1234-uid"}
    assert config["reporting"]["statusPatch"] is True
    assert "hf-token" not in text


def test_trainer_config_is_accepted_by_the_trainer():
    from finetune_trainer.config import TrainerConfig

    for spec in (SINGLE, MULTI):
        parsed = TrainerConfig.from_dict(trainer_config.build_trainer_config(make_job(spec)))
        assert parsed.paths.root == "/workspace"


def test_the_trainer_job_records_the_digest_of_the_sections_it_was_built_from():
    """The digest changes with every section CEL freezes once training started, and not with
    the fields that stay editable (suspend, deploy, ttlSecondsAfterFinished)."""
    base = trainer_job.spec_digest(make_job(SINGLE))
    manifest = trainer_job.build_trainer_job(make_job(SINGLE), IMAGE)
    assert manifest["metadata"]["annotations"][trainer_job.SPEC_DIGEST_ANNOTATION] == base
    for editable in ({"suspend": True}, {"deploy": {"gpus": 1}}, {"ttlSecondsAfterFinished": 60}):
        assert trainer_job.spec_digest(make_job({**SINGLE, **editable})) == base, editable
    for frozen in ({"training": {"epochs": 4}}, {"resources": {**SINGLE["resources"], "image": "x:1"}},
                   {"evaluation": {"prompts": [{"prompt": "hi"}]}}, {"storage": {"size": "20Gi"}}):
        assert trainer_job.spec_digest(make_job({**SINGLE, **frozen})) != base, frozen


def test_single_node_trainer_job():
    job = make_job(SINGLE)
    manifest = trainer_job.build_trainer_job(job, IMAGE)
    assert_json_golden("trainer-job-single", manifest)
    pod = manifest["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["command"] == ["python", "-m", "finetune_trainer", "train", "--config",
                                    "/etc/finetune/config.json"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf-token", "key": "token"}}} \
        in container["env"]
    rules = manifest["spec"]["podFailurePolicy"]["rules"]
    assert rules[0]["action"] == "FailJob" and rules[0]["onExitCodes"]["values"] == [42]
    assert rules[1] == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]}
    assert manifest["spec"]["suspend"] is False
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert trainer_job.build_headless_service(job) is None


def test_cpu_only_job_asks_for_no_gpu_and_no_gpu_toleration():
    job = make_job({**SINGLE, "method": {"type": "lora"}, "training": {"precision": "fp32"},
                    "resources": {"gpusPerNode": 0}})
    pod = trainer_job.build_trainer_job(job, IMAGE)["spec"]["template"]["spec"]
    assert "nvidia.com/gpu" not in json.dumps(pod["containers"][0]["resources"])
    assert "tolerations" not in pod


def test_multi_node_trainer_job_is_indexed_through_the_launcher_and_queued_for_kueue():
    job = make_job(MULTI, name="big")
    manifest = trainer_job.build_trainer_job(job, IMAGE)
    service = trainer_job.build_headless_service(job)
    assert_json_golden("trainer-job-multi-kueue", [manifest, service])
    spec = manifest["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"] == 2
    assert spec["suspend"] is True
    assert manifest["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    pod = spec["template"]["spec"]
    command = pod["containers"][0]["command"]
    assert command[:4] == ["python", "-m", "finetune_trainer", "launch"], "not torchrun directly"
    flags = dict(zip(command[4::2], command[5::2]))
    assert flags["--nnodes"] == "2" and flags["--nproc-per-node"] == "8"
    assert flags["--node-rank"] == "$(JOB_COMPLETION_INDEX)"
    assert flags["--rdzv-endpoint"] == "big-trainer-0.big-trainer:29500"
    assert flags["--rdzv-id"] == "1234-uid", "one rendezvous per FineTuneJob"
    assert int(flags["--max-restarts"]) > 0, "a replacement pod can rejoin"
    assert int(flags["--grace-seconds"]) < pod["terminationGracePeriodSeconds"]
    assert pod["subdomain"] == service["metadata"]["name"] == "big-trainer"
    assert service["spec"]["clusterIP"] == "None"


def test_one_node_with_several_gpus_goes_through_the_launcher_and_one_gpu_does_not():
    eight = trainer_job.trainer_command(make_job({**MULTI, "resources": {"gpusPerNode": 8}}))
    assert eight[:4] == ["python", "-m", "finetune_trainer", "launch"]
    assert "--nnodes" not in eight and "--rdzv-endpoint" not in eight
    one = trainer_job.trainer_command(make_job({**MULTI, "resources": {"gpusPerNode": 1}}))
    assert one == ["python", "-m", "finetune_trainer", "train", "--config", "/etc/finetune/config.json"]


def test_names_are_deterministic_and_short_enough():
    long = "x" * 200
    assert names.trainer_job(long) == names.trainer_job(long)
    assert len(names.trainer_job(long)) <= 52
    assert len(names.workspace_claim(long)) <= 63
    assert names.trainer_job("a") == "a-trainer"


def test_a_results_file_on_another_claim_is_the_only_writable_folder_of_that_claim():
    spec = {**MULTI, "output": {"resultsFile": "pvc://openai-files/results/ftjob-1/results.csv"},
            "dataset": {"source": "pvc://openai-files/files/train.jsonl", "format": "chat"}}
    job = make_job(spec)
    pod = trainer_job.build_trainer_job(job, IMAGE)["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m for m in pod["containers"][0]["volumeMounts"]}
    assert volumes["results"]["persistentVolumeClaim"] == {"claimName": "openai-files"}
    assert mounts["results"] == {"name": "results", "mountPath": "/mnt/results", "subPath": "results/ftjob-1"}
    data = next(m for m in mounts.values() if m["mountPath"] == "/mnt/claims/openai-files")
    assert data["readOnly"] is True, "the rest of the claim stays read-only"
    assert trainer_config.build_trainer_config(job)["output"]["resultsFile"] == "/mnt/results/results.csv"


def test_a_results_file_on_the_job_claim_needs_no_other_mount():
    own = names.workspace_claim("support-bot")
    job = make_job({**MULTI, "output": {"resultsFile": f"pvc://{own}/exports/results.csv"}})
    pod = trainer_job.build_trainer_job(job, IMAGE)["spec"]["template"]["spec"]
    assert "results" not in {v["name"] for v in pod["volumes"]}
    assert trainer_config.build_trainer_config(job)["output"]["resultsFile"] == "/workspace/exports/results.csv"


def test_an_s3_results_file_is_uploaded_by_the_trainer_and_mounts_nothing():
    job = make_job({**MULTI, "output": {"resultsFile": "s3://uploads/openai/team/results/ftjob-1/results.csv"},
                    "objectStorage": {"secretRef": {"name": "finetune-object-storage"}}})
    pod = trainer_job.build_trainer_job(job, IMAGE)["spec"]["template"]["spec"]
    assert "results" not in {v["name"] for v in pod["volumes"]}
    assert trainer_config.build_trainer_config(job)["output"]["resultsFile"] == \
        "s3://uploads/openai/team/results/ftjob-1/results.csv"


def test_two_jobs_on_one_existing_claim_never_share_checkpoints_or_artifacts():
    """#14 item 2: the second job on a shared claim resumed from the first job's checkpoint."""
    from finetune_api.trainer_config import TrainerConfig

    def config(name: str, claim: str | None) -> TrainerConfig:
        spec = {"model": {"source": "org/tiny"},
                "dataset": {"source": "pvc://team-share/data/train.jsonl"},
                "storage": {"existingClaim": claim} if claim else {}}
        return TrainerConfig.from_dict(trainer_config.build_trainer_config(make_job(spec, name=name)))

    a, b = config("alpha", "team-share"), config("beta", "team-share")
    for folder in ("checkpoints", "artifacts", "reports", "data_cache", "tracking"):
        assert getattr(a.paths, folder) != getattr(b.paths, folder), folder
    assert str(a.paths.checkpoints) == "/workspace/jobs/alpha/checkpoints"
    assert str(b.paths.artifacts) == "/workspace/jobs/beta/artifacts"
    # Data named on the shared claim is read where it is, by both.
    assert a.dataset.source == b.dataset.source == "/workspace/data/train.jsonl"
    assert a.paths.resolve("volume://data/x.jsonl") == "/workspace/data/x.jsonl"
    # A claim of the job's own keeps the volume's top, as before.
    own = config("gamma", None)
    assert str(own.paths.checkpoints) == "/workspace/checkpoints"


def _prompts(count: int, size: int) -> dict:
    return {"evaluation": {"prompts": [{"prompt": f"{i} " + "p" * size} for i in range(count)]}}


def test_the_config_travels_in_the_pod_template_and_becomes_the_config_file():
    """#14: the config was a ConfigMap of its own per job (one object and one request more, and
    an edit of it reached a running trainer's file). Now the pod template's annotation, made the
    file the trainer reads by a downward API volume; the comparison pod reads the same one."""
    job = make_job(SINGLE)
    for manifest in (trainer_job.build_trainer_job(job, IMAGE),
                     comparison_job.build_comparison_job(job, IMAGE, 0.0)):
        template = manifest["spec"]["template"]
        text = template["metadata"]["annotations"][trainer_config.CONFIG_ANNOTATION]
        assert json.loads(text) == trainer_config.build_trainer_config(job)
        (volume,) = [v for v in template["spec"]["volumes"] if v["name"] == "config"]
        assert volume == {"name": "config", "downwardAPI": {"items": [{
            "path": "config.json", "fieldRef": {"fieldPath": "metadata.annotations['finetune.dev/trainer-config']"}}]}}
        (mount,) = [m for m in template["spec"]["containers"][0]["volumeMounts"] if m["name"] == "config"]
        assert f"{mount['mountPath']}/config.json" == trainer_config.CONFIG_PATH
    assert trainer_config.build_config_map(job) is None


def test_a_config_too_large_for_an_annotation_goes_into_a_config_map():
    """Up to 200 prompts of 16 KiB each pass the schema: more than a pod's annotations may
    hold (256 KiB), so such a config keeps the ConfigMap it had before."""
    job = make_job({**SINGLE, **_prompts(40, 6000)})
    template = trainer_job.build_trainer_job(job, IMAGE)["spec"]["template"]
    assert trainer_config.CONFIG_ANNOTATION not in template["metadata"]["annotations"]
    (volume,) = [v for v in template["spec"]["volumes"] if v["name"] == "config"]
    assert volume["configMap"] == {"name": "support-bot-trainer-config"}
    cm = trainer_config.build_config_map(job)
    assert cm["metadata"]["name"] == "support-bot-trainer-config"
    assert cm["metadata"]["ownerReferences"][0]["uid"] == "1234-uid"
    assert json.loads(cm["data"]["config.json"]) == trainer_config.build_trainer_config(job)
    assert admission.check(job, admission.ClusterFacts(
        secrets={"hf-token": {"token"}, "s3-credentials": {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}},
        claims={"shared-data"})) is None


def test_a_config_larger_than_a_config_map_is_refused_at_admission_naming_the_section():
    big = {**SINGLE, **_prompts(200, 6000)}
    facts = admission.ClusterFacts(
        secrets={"hf-token": {"token"}, "s3-credentials": {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}},
        claims={"shared-data"})
    problem = admission.check(make_job(big), facts)
    assert problem is not None and problem.reason == "TrainerConfigTooLarge" and not problem.retryable
    assert "spec.evaluation" in problem.message and "1000 KiB" in problem.message
    # A job that already has its trainer Job is never failed by admission.
    assert admission.check(make_job(big, trainerJob="support-bot-trainer"), facts) is None
