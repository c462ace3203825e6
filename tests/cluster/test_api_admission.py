"""The CRDs as the real API server enforces them: defaults, rejections, immutability, columns."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

from finetune_api import schema
from tests.unit.api.test_api_schema import EXAMPLES, apply_defaults

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[2]
CRD_NAMES = ["finetunejobs.finetune.dev", "inferenceservices.finetune.dev"]
DELETE = object()  # in a patch: remove the key

BASE_JOB = {
    "apiVersion": "finetune.dev/v1alpha1",
    "kind": "FineTuneJob",
    "metadata": {"name": "base"},
    "spec": {
        "model": {"source": "org/tiny-llama"},
        "dataset": {"source": "pvc://datasets/train.jsonl"},
    },
}

BASE_SERVICE = {
    "apiVersion": "finetune.dev/v1alpha1",
    "kind": "InferenceService",
    "metadata": {"name": "base"},
    "spec": {"model": {"source": "org/tiny-llama"}},
}


@pytest.fixture(scope="module")
def crds(cluster):
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(REPO / "crds"))
    cluster.wait_established(*CRD_NAMES)
    return cluster


def merged(base: dict, patch: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in patch.items():
        if value is DELETE:
            out.pop(key, None)
        elif isinstance(value, dict):
            out[key] = merged(out.get(key) if isinstance(out.get(key), dict) else {}, value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def create(cluster, namespace: str, manifest: dict, check: bool = False):
    return cluster.kubectl("create", "-n", namespace, "-f", "-", input=yaml.safe_dump(manifest),
                           check=check)


def get(cluster, namespace: str, kind: str, name: str) -> dict:
    return json.loads(cluster.kubectl("get", "-n", namespace, kind, name, "-o", "json").stdout)


def patch(cluster, namespace: str, name: str, body: dict, *, subresource: str | None = None):
    args = ["patch", "-n", namespace, "finetunejob", name, "--type=merge", "-p", json.dumps(body)]
    if subresource:
        args.append(f"--subresource={subresource}")
    return cluster.kubectl(*args, check=False)


# --- every example is accepted and reads back with the defaults --------------------------------


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_is_accepted_and_reads_back_with_defaults(crds, namespace, path):
    for doc in yaml.safe_load_all(path.read_text()):
        result = create(crds, namespace, doc)
        assert result.returncode == 0, result.stderr

        stored = get(crds, namespace, doc["kind"], doc["metadata"]["name"])

        root = schema.FINETUNEJOB_SCHEMA if doc["kind"] == "FineTuneJob" else schema.INFERENCESERVICE_SCHEMA
        expected = apply_defaults(root["properties"]["spec"], copy.deepcopy(doc["spec"]))
        assert stored["spec"] == json.loads(json.dumps(expected))


def test_minimal_job_reads_back_with_every_documented_default(crds, namespace):
    create(crds, namespace, BASE_JOB, check=True)

    spec = get(crds, namespace, "ftj", "base")["spec"]

    assert spec["method"] == {"type": "lora", "objective": "sft",
                              "lora": {"r": 16, "alpha": 32, "dropout": 0.05,
                                       "targetModules": ["all-linear"], "bias": "none"}}
    training = spec["training"]
    assert {k: training[k] for k in ("epochs", "perDeviceBatchSize", "learningRate", "maxSeqLength",
                                     "packing", "precision", "saveSteps", "saveTotalLimit", "seed",
                                     "maxGradNorm")} == {
        "epochs": 1, "perDeviceBatchSize": 4, "learningRate": 2e-4, "maxSeqLength": 1024,
        "packing": "auto", "precision": "bf16", "saveSteps": 100, "saveTotalLimit": 3, "seed": 42,
        "maxGradNorm": 1}
    dataset = spec["dataset"]
    assert (dataset["format"], dataset["evalFraction"], dataset["dedup"], dataset["minExamples"],
            dataset["lengthPolicy"]) == ("instruction", 0.05, {"exact": True, "nearThreshold": 0.9},
                                         10, "truncate")
    assert (spec["resources"]["gpusPerNode"], spec["resources"]["nodes"]) == (1, 1)
    assert spec["storage"] == {"size": "20Gi", "reclaimPolicy": "Retain"}
    assert spec["suspend"] is False


# --- invalid manifests: each rejected with a message naming the field -------------------------

INVALID_JOBS = [
    ("model-source-missing", {"model": {"source": DELETE}}, "spec.model.source: Required value"),
    ("dataset-missing", {"dataset": DELETE}, "spec.dataset: Required value"),
    ("dataset-source-missing", {"dataset": {"source": DELETE}}, "spec.dataset.source: Required value"),
    ("model-source-scheme", {"model": {"source": "ftp://host/model"}},
     "spec.model.source: Invalid value: \"ftp://host/model\": must be a Hugging Face id"),
    ("model-revision-with-pvc", {"model": {"source": "pvc://models/x", "revision": "main"}},
     "spec.model.revision is only allowed with a Hugging Face source"),
    ("model-token-secret-name", {"model": {"tokenSecretRef": {"name": "Bad_Name"}}},
     "spec.model.tokenSecretRef.name"),
    ("method-type", {"method": {"type": "dora"}}, 'spec.method.type: Unsupported value: "dora"'),
    ("lora-with-full", {"method": {"type": "full", "lora": {"r": 8}}},
     "spec.method.lora is only allowed when spec.method.type is lora or qlora"),
    ("quantization-with-lora", {"method": {"type": "lora", "quantization": {"quantType": "nf4"}}},
     "spec.method.quantization is only allowed when spec.method.type is qlora"),
    ("lora-rank-zero", {"method": {"lora": {"r": 0}}}, "spec.method.lora.r"),
    ("lora-dropout-high", {"method": {"lora": {"dropout": 0.95}}}, "spec.method.lora.dropout"),
    ("metric-for-best-model-rouge", {"training": {"metricForBestModel": "rouge"}},
     "spec.training.metricForBestModel: only eval_loss or perplexity"),
    ("lora-bias", {"method": {"lora": {"bias": "some"}}}, "spec.method.lora.bias"),
    ("lora-all-linear-combined", {"method": {"lora": {"targetModules": ["all-linear", "q_proj"]}}},
     "spec.method.lora.targetModules: all-linear cannot be combined"),
    ("quant-type", {"method": {"type": "qlora", "lora": DELETE, "quantization": {"quantType": "int8"}}},
     "spec.method.quantization.quantType"),
    ("qlora-on-cpu", {"method": {"type": "qlora"}, "resources": {"gpusPerNode": 0}},
     "spec.method.type qlora requires spec.resources.gpusPerNode >= 1"),
    ("dataset-format", {"dataset": {"format": "sharegpt"}}, "spec.dataset.format"),
    ("eval-fraction-high", {"dataset": {"evalFraction": 0.9}}, "spec.dataset.evalFraction"),
    ("near-threshold-low", {"dataset": {"dedup": {"nearThreshold": 0.1}}},
     "spec.dataset.dedup.nearThreshold"),
    ("min-examples-zero", {"dataset": {"minExamples": 0}}, "spec.dataset.minExamples"),
    ("length-policy", {"dataset": {"lengthPolicy": "wrap"}}, "spec.dataset.lengthPolicy"),
    ("chat-template-name", {"dataset": {"chatTemplate": {"name": "vicuna"}}},
     "spec.dataset.chatTemplate.name"),
    ("chat-template-name-and-file",
     {"dataset": {"chatTemplate": {"name": "chatml", "file": "pvc://data/t.jinja"}}},
     "spec.dataset.chatTemplate: set name or file, not both"),
    ("chat-template-file-not-on-a-claim",
     {"dataset": {"chatTemplate": {"file": "https://example.com/t.jinja"}}},
     "spec.dataset.chatTemplate.file"),
    ("mix-ratio-missing", {"dataset": {"mix": {"source": "org/general"}}},
     "spec.dataset.mix.ratio: Required value"),
    ("mix-ratio-zero", {"dataset": {"mix": {"source": "org/general", "ratio": 0}}},
     "spec.dataset.mix.ratio"),
    ("epochs-zero", {"training": {"epochs": 0}}, "spec.training.epochs"),
    ("learning-rate-negative", {"training": {"learningRate": -0.001}}, "spec.training.learningRate"),
    ("batch-size-zero", {"training": {"perDeviceBatchSize": 0}}, "spec.training.perDeviceBatchSize"),
    ("max-seq-length-tiny", {"training": {"maxSeqLength": 8}}, "spec.training.maxSeqLength"),
    ("precision", {"training": {"precision": "int8"}}, "spec.training.precision"),
    ("packing-bool", {"training": {"packing": True}}, "spec.training.packing"),
    ("optimizer", {"training": {"optimizer": "lion"}}, "spec.training.optimizer"),
    ("save-not-multiple-of-eval", {"training": {"evalSteps": 30, "saveSteps": 100}},
     "spec.training.saveSteps must be a multiple of spec.training.evalSteps"),
    ("early-stopping-without-eval", {"dataset": {"evalFraction": 0}, "training": {"earlyStopping": {"patience": 2}}},
     "spec.training.earlyStopping needs evaluation data"),
    ("fp16-on-cpu", {"training": {"precision": "fp16"}, "resources": {"gpusPerNode": 0}},
     "spec.training.precision fp16 requires spec.resources.gpusPerNode >= 1"),
    ("eval-metric", {"evaluation": {"metrics": ["accuracy"]}}, "spec.evaluation.metrics[0]"),
    ("nodes-without-gpus", {"resources": {"nodes": 2, "gpusPerNode": 0}},
     "spec.resources.nodes > 1 requires spec.resources.gpusPerNode >= 1"),
    ("gpus-per-node-high", {"resources": {"gpusPerNode": 17}}, "spec.resources.gpusPerNode"),
    ("memory-quantity", {"resources": {"memory": "lots"}}, "spec.resources.memory"),
    ("priority-class-name", {"resources": {"priorityClassName": "High"}},
     "spec.resources.priorityClassName: Invalid value: \"High\": must be a DNS-1123 subdomain"),
    ("queue-name", {"resources": {"queueName": "team_a"}}, "spec.resources.queueName"),
    ("toleration-operator", {"resources": {"tolerations": [{"key": "gpu", "operator": "Maybe"}]}},
     "spec.resources.tolerations[0].operator"),
    ("storage-class-with-existing-claim", {"storage": {"existingClaim": "data", "storageClassName": "fast"}},
     "spec.storage.storageClassName and spec.storage.accessModes are not allowed with spec.storage.existingClaim"),
    ("storage-size", {"storage": {"size": "big"}}, "spec.storage.size"),
    ("reclaim-policy", {"storage": {"reclaimPolicy": "Recycle"}}, "spec.storage.reclaimPolicy"),
    ("access-mode", {"storage": {"accessModes": ["ReadWriteSometimes"]}}, "spec.storage.accessModes[0]"),
    ("merge-with-full", {"method": {"type": "full", "lora": DELETE}, "output": {"merge": True}},
     "spec.output.merge is only allowed with spec.method.type lora or qlora"),
    ("push-hub-without-token", {"output": {"push": {"uri": "hf://org/repo"}}},
     "spec.output.push.tokenSecretRef is required"),
    ("push-s3-with-token", {"output": {"push": {"uri": "s3://bucket/x", "tokenSecretRef": {"name": "t"}}}},
     "s3:// credentials come from spec.objectStorage.secretRef"),
    ("metric-for-best-model-rouge", {"training": {"metricForBestModel": "rouge"}},
     "spec.training.metricForBestModel: only eval_loss or perplexity"),
    ("lora-bias", {"method": {"lora": {"bias": "all"}}}, "spec.method.lora.bias: only none is supported"),
    ("mix-preference-with-chat", {"dataset": {"mix": {"source": "org/general", "ratio": 0.1, "format": "preference"}}},
     "spec.dataset.mix.format must be preference exactly when"),
    ("object-storage-without-secret", {"objectStorage": {}}, "spec.objectStorage.secretRef: Required value"),
    ("push-uri-scheme", {"output": {"push": {"uri": "gs://bucket/x"}}}, "spec.output.push.uri"),
    ("results-file-not-on-a-claim-or-s3", {"output": {"resultsFile": "https://host/results.csv"}}, "spec.output.resultsFile"),
    ("results-file-s3-not-csv", {"output": {"resultsFile": "s3://bucket/results.json"}}, "spec.output.resultsFile"),
    ("results-file-up-the-claim", {"output": {"resultsFile": "pvc://files/../results.csv"}}, "spec.output.resultsFile"),
    ("results-file-at-the-claim-root", {"output": {"resultsFile": "pvc://files/results.csv"}}, "spec.output.resultsFile"),
    ("deploy-rank-above-max", {"method": {"lora": {"r": 64}}, "deploy": {"vllm": {"maxLoraRank": 16}}},
     "spec.deploy.vllm.maxLoraRank must be at least spec.method.lora.r"),
    ("deploy-service-name", {"deploy": {"inferenceService": "My_Service"}}, "spec.deploy.inferenceService"),
    ("ttl-negative", {"ttlSecondsAfterFinished": -1}, "spec.ttlSecondsAfterFinished"),
    ("suspend-not-bool", {"suspend": "yes"}, "spec.suspend"),
    ("tracking-mlflow-uri-missing", {"tracking": {"mlflow": {"experiment": "x"}}},
     "spec.tracking.mlflow.trackingUri: Required value"),
    ("tracking-mlflow-uri-scheme", {"tracking": {"mlflow": {"trackingUri": "ftp://mlflow"}}},
     "spec.tracking.mlflow.trackingUri"),
    ("tracking-wandb-mode", {"tracking": {"wandb": {"project": "p", "mode": "sometimes"}}},
     'spec.tracking.wandb.mode: Unsupported value: "sometimes"'),
    ("tracking-wandb-project-missing", {"tracking": {"wandb": {"mode": "offline"}}},
     "spec.tracking.wandb.project: Required value"),
]

INVALID_SERVICES = [
    ("adapter-ref-and-path", {"adapters": [{"name": "a", "path": "/adapters/a", "fineTuneJobRef": {"name": "j"}}]},
     "set exactly one of fineTuneJobRef or path"),
    ("adapter-duplicate-name", {"adapters": [{"name": "a", "path": "/x"}, {"name": "a", "path": "/y"}]},
     "spec.adapters[1]: Duplicate value"),
    ("merged-with-adapters", {"mergedModel": {"path": "/merged"}, "adapters": [{"name": "a", "path": "/x"}]},
     "spec.adapters are not allowed with spec.mergedModel"),
    ("autoscaling-min-above-max", {"autoscaling": {"minReplicas": 5, "maxReplicas": 2}},
     "spec.autoscaling.minReplicas must not exceed spec.autoscaling.maxReplicas"),
    ("tensor-parallel-above-gpus", {"resources": {"gpus": 1}, "vllm": {"tensorParallelSize": 2}},
     "spec.vllm.tensorParallelSize must not exceed spec.resources.gpus"),
    ("replicas-negative", {"replicas": -1}, "spec.replicas"),
    ("vllm-dtype", {"vllm": {"dtype": "int4"}}, "spec.vllm.dtype"),
]


@pytest.mark.parametrize("patch_, expected", [(p, e) for _, p, e in INVALID_JOBS],
                         ids=[case[0] for case in INVALID_JOBS])
def test_invalid_finetunejob_is_rejected_naming_the_field(crds, namespace, patch_, expected):
    manifest = merged(BASE_JOB, {"spec": patch_})

    result = create(crds, namespace, manifest)

    assert result.returncode != 0, f"accepted: {manifest['spec']}"
    assert expected in result.stderr


@pytest.mark.parametrize("patch_, expected", [(p, e) for _, p, e in INVALID_SERVICES],
                         ids=[case[0] for case in INVALID_SERVICES])
def test_invalid_inferenceservice_is_rejected_naming_the_field(crds, namespace, patch_, expected):
    manifest = merged(BASE_SERVICE, {"spec": patch_})

    result = create(crds, namespace, manifest)

    assert result.returncode != 0, f"accepted: {manifest['spec']}"
    assert expected in result.stderr


def test_base_manifests_are_valid(crds, namespace):
    assert create(crds, namespace, BASE_JOB).returncode == 0
    assert create(crds, namespace, BASE_SERVICE).returncode == 0


# --- immutability once training started ------------------------------------------------------


def start_training(cluster, namespace: str, name: str) -> None:
    result = patch(cluster, namespace, name, {"status": {"phase": "Training",
                                                         "startTime": "2025-01-01T00:00:00Z"}},
                   subresource="status")
    assert result.returncode == 0, result.stderr


def test_spec_can_be_corrected_before_training_started(crds, namespace):
    create(crds, namespace, BASE_JOB, check=True)

    result = patch(crds, namespace, "base", {"spec": {"training": {"learningRate": 1e-4}}})

    assert result.returncode == 0, result.stderr
    assert get(crds, namespace, "ftj", "base")["spec"]["training"]["learningRate"] == 1e-4


@pytest.mark.parametrize("section, change", [
    ("training", {"learningRate": 1e-4}),
    ("model", {"source": "org/other-model"}),
    ("method", {"lora": {"r": 8}}),
    ("dataset", {"evalFraction": 0.1}),
    ("evaluation", {"metrics": ["bleu"]}),
    ("resources", {"nodes": 2}),
    ("storage", {"size": "40Gi"}),
    ("output", {"merge": True}),
])
def test_spec_section_is_immutable_once_training_started(crds, namespace, section, change):
    create(crds, namespace, BASE_JOB, check=True)
    start_training(crds, namespace, "base")

    result = patch(crds, namespace, "base", {"spec": {section: change}})

    assert result.returncode != 0
    assert f"spec.{section} is immutable once training started" in result.stderr


def test_suspend_deploy_and_ttl_may_change_once_training_started(crds, namespace):
    create(crds, namespace, BASE_JOB, check=True)
    start_training(crds, namespace, "base")

    for change in ({"suspend": True}, {"suspend": False}, {"ttlSecondsAfterFinished": 3600},
                   {"deploy": {"inferenceService": "served", "replicas": 2}}):
        result = patch(crds, namespace, "base", {"spec": change})
        assert result.returncode == 0, f"{change}: {result.stderr}"

    spec = get(crds, namespace, "ftj", "base")["spec"]
    assert (spec["suspend"], spec["ttlSecondsAfterFinished"], spec["deploy"]["replicas"]) == (False, 3600, 2)


def test_status_updates_pass_the_immutability_rules(crds, namespace):
    create(crds, namespace, BASE_JOB, check=True)
    start_training(crds, namespace, "base")

    result = patch(crds, namespace, "base", {"status": {"progress": {"step": 5, "totalSteps": 10}}},
                   subresource="status")

    assert result.returncode == 0, result.stderr


def test_undeclared_status_fields_are_dropped(crds, namespace):
    create(crds, namespace, BASE_JOB, check=True)

    patch(crds, namespace, "base", {"status": {"phase": "Pending", "madeUp": 1}}, subresource="status")

    status = get(crds, namespace, "ftj", "base")["status"]
    assert status == {"phase": "Pending"}


# --- printer columns ----------------------------------------------------------------------------


def test_kubectl_get_ftj_shows_the_printer_columns(crds, namespace):
    create(crds, namespace, BASE_JOB, check=True)
    patch(crds, namespace, "base", {"status": {
        "phase": "Training", "progress": {"step": 40, "totalSteps": 100, "epoch": 0.4, "percent": 40,
                                           "etaSeconds": 90},
        "metrics": {"trainLoss": 1.25},
        "conditions": [{"type": "Admitted", "status": "True", "reason": "Admitted",
                        "message": "references exist", "lastTransitionTime": "2025-01-01T00:00:00Z",
                        "observedGeneration": 1},
                       {"type": "Running", "status": "True", "reason": "TrainerRunning",
                        "message": "step 40/100", "lastTransitionTime": "2025-01-01T00:00:00Z",
                        "observedGeneration": 1}]}}, subresource="status")

    table = crds.kubectl("get", "ftj", "-n", namespace).stdout.splitlines()
    wide = crds.kubectl("get", "ftj", "-n", namespace, "-o", "wide").stdout.splitlines()

    assert table[0].split() == ["NAME", "PHASE", "MODEL", "METHOD", "PROGRESS", "LOSS", "AGE"]
    assert table[1].split()[:6] == ["base", "Training", "org/tiny-llama", "lora", "40", "1.25"]
    assert wide[0].split() == ["NAME", "PHASE", "MODEL", "METHOD", "PROGRESS", "LOSS", "AGE",
                               "EPOCH", "GPUS", "NODES", "ETA", "REASON"]
    assert wide[1].split()[-5:] == ["0.4", "1", "1", "90", "TrainerRunning"]


def test_both_kinds_are_listed_by_short_name_and_category(crds, namespace):
    create(crds, namespace, BASE_JOB, check=True)
    create(crds, namespace, BASE_SERVICE, check=True)

    listed = crds.kubectl("get", "finetune", "-n", namespace, "-o", "name").stdout.split()
    services = crds.kubectl("get", "ftisvc", "-n", namespace).stdout.splitlines()

    assert sorted(listed) == ["finetunejob.finetune.dev/base", "inferenceservice.finetune.dev/base"]
    assert services[0].split() == ["NAME", "PHASE", "READY", "URL", "AGE"]
