"""Object storage in and out, on the dev cluster (issue 17's "done when").

The model (a folder) and the dataset are on the dev cluster's MinIO; the FineTuneJob names
them as s3:// sources with one spec.objectStorage Secret. The trainer on the local node
downloads them onto the job volume, trains, evaluates, pushes the adapter and model card to
s3://, and reports status.sources (sha256), status.artifacts, status.checkpoints.best and
status.evaluation; the Pushed condition is True and the store holds the adapter. The secret
key appears nowhere: not in the status, the events, the pod's logs or its termination message.

With FINETUNE_NODE=kubelet the same test runs on the real node: the trainer in the trainer
image, the comparison in the vLLM image (tests/fixtures pass their references to the operator).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from finetune_trainer.objectstore import Credentials, S3Client
from tests.cluster.test_operator_lifecycle import apply, status
from tests.fixtures.cluster import get_json, wait_for
from tests.fixtures.ml import learnable_instruction_records

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


def store_client(cluster) -> S3Client:
    env = cluster.s3_env()
    return S3Client(env["AWS_ENDPOINT_URL"], env["AWS_REGION"],
                    Credentials(env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]))


def test_s3_dataset_and_model_train_on_the_local_node_and_the_adapter_is_pushed_back(
        cluster, namespace, operator, tiny_model: Path):
    env = cluster.s3_env()
    assert cluster.s3_env_file.read_text().count("S3_CLUSTER_ENDPOINT_URL=") == 1
    s3 = store_client(cluster)
    bucket = f"e2e-{namespace}"
    s3.create_bucket(bucket)
    data = "".join(json.dumps(r) + "\n" for r in learnable_instruction_records()).encode()
    s3.put_bytes(bucket, "datasets/pirate.jsonl", data)
    for f in sorted(tiny_model.rglob("*")):
        if f.is_file():
            s3.upload(bucket, f"models/tiny/{f.relative_to(tiny_model).as_posix()}", f)
    cluster.kubectl("create", "secret", "generic", "s3-credentials", "-n", namespace,
                    f"--from-literal=AWS_ACCESS_KEY_ID={env['AWS_ACCESS_KEY_ID']}",
                    f"--from-literal=AWS_SECRET_ACCESS_KEY={env['AWS_SECRET_ACCESS_KEY']}",
                    f"--from-literal=AWS_ENDPOINT_URL={env['S3_CLUSTER_ENDPOINT_URL']}",
                    f"--from-literal=AWS_REGION={env['AWS_REGION']}")

    name = "s3run"
    apply(cluster, namespace, {
        "apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": name},
        "spec": {
            "model": {"source": f"s3://{bucket}/models/tiny/"},
            "method": {"type": "lora", "lora": {"r": 8, "alpha": 16, "dropout": 0.0}},
            "dataset": {"source": f"s3://{bucket}/datasets/pirate.jsonl", "format": "instruction",
                        "evalFraction": 0.1, "minExamples": 4, "dedup": {"exact": False, "nearThreshold": 1}},
            "training": {"epochs": 1, "maxSteps": 8, "perDeviceBatchSize": 4, "learningRate": 3e-3,
                         "lrScheduler": "constant", "maxSeqLength": 64, "precision": "fp32",
                         "loggingSteps": 2, "evalSteps": 4, "saveSteps": 4, "saveTotalLimit": 2,
                         "seed": 0, "gradientCheckpointing": False},
            "resources": {"gpusPerNode": 0, "cpu": "1", "memory": "4Gi",
                          "nodeSelector": {"finetune.dev/local-node": "true"},
                          "tolerations": [{"key": "finetune.dev/local-node", "operator": "Exists",
                                           "effect": "NoSchedule"}]},
            "storage": {"size": "1Gi"},
            "evaluation": {"comparison": {"enabled": False}},  # measured in test_operator_realrun
            "output": {"push": {"uri": f"s3://{bucket}/published/{name}"}},
            "objectStorage": {"secretRef": {"name": "s3-credentials"}},
        }})

    def done():
        s = status(cluster, namespace, name)
        if s.get("phase") == "Failed":
            raise AssertionError(f"the job failed: {json.dumps(s, indent=2)}")
        pushed = [c for c in s.get("conditions", []) if c["type"] == "Pushed"]
        return s.get("phase") == "Succeeded" and pushed and s
    s = wait_for(done, timeout=900, what="the s3:// run to succeed and report its push", interval=2)

    conditions = {c["type"]: c for c in s["conditions"]}
    assert conditions["Pushed"]["status"] == "True", conditions["Pushed"]
    artifacts = s["artifacts"]
    assert artifacts["pushed"] == f"s3://{bucket}/published/{name}"
    assert artifacts["adapter"] == "/workspace/artifacts/adapter"
    assert artifacts["volume"] == f"{name}-workspace"
    assert s["checkpoints"]["best"].startswith("/workspace/checkpoints/checkpoint-")
    sources = {x["location"]: x for x in s["sources"]}
    assert sources[f"s3://{bucket}/datasets/pirate.jsonl"]["sha256"] == hashlib.sha256(data).hexdigest()
    assert sources[f"s3://{bucket}/models/tiny/"]["bytes"] == sum(
        f.stat().st_size for f in tiny_model.rglob("*") if f.is_file())
    assert s["evaluation"]["evalLoss"] > 0 and s["evaluation"]["perplexity"] > 1

    adapter_config = json.loads(s3.get_bytes(bucket, f"published/{name}/adapter/adapter_config.json"))
    assert adapter_config["r"] == 8
    assert s3.head(bucket, f"published/{name}/adapter/adapter_model.safetensors").size > 0
    card = s3.get_bytes(bucket, f"published/{name}/README.md").decode()
    assert hashlib.sha256(data).hexdigest() in card

    secret = env["AWS_SECRET_ACCESS_KEY"]
    events = cluster.kubectl("get", "events", "-n", namespace, "-o", "json").stdout
    pods = get_json(cluster, "pods", "-n", namespace, "-l", f"finetune.dev/finetunejob={name}")["items"]
    terminations = json.dumps([cs.get("state") for p in pods for cs in p["status"].get("containerStatuses", [])])
    if cluster.real_node is not None:  # FINETUNE_NODE=kubelet: the kubelet serves the pods' logs
        logs = [cluster.kubectl("logs", p["metadata"]["name"], "-n", namespace, "--all-containers").stdout
                for p in pods]
    else:  # the stand-in local node keeps them in files
        logs = [p.read_text(errors="replace") for p in (cluster.state_dir / "local-node").rglob("log-*.txt")]
    assert pods and logs
    for where, text in [("status", json.dumps(s)), ("events", events), ("termination message", terminations),
                        ("operator log", operator.tail(100000)), *[("pod log", t) for t in logs]]:
        assert secret not in text, f"the secret key is in the {where}"
