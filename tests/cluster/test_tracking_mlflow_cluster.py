"""spec.tracking.mlflow on the local cluster: the operator renders the tracker into the
trainer's config and its Secret into the pod's environment, the trainer really runs on the
local node, and the run, its parameters and the loss of every logging step land in the dev
cluster's MLflow tracking server (the one `make cluster` runs; its address comes from the
mlflow.env it writes next to the kubeconfig).
"""

from __future__ import annotations

import json

import pytest

from tests.fixtures.cluster import get_json, wait_for
from tests.fixtures.ml import learnable_instruction_records, write_jsonl
from tests.cluster.test_operator_lifecycle import apply, status, wait_phase
from tests.e2e.test_operator_realrun import volume_path

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

STEPS, LOGGING_STEPS = 8, 2
# The trainer logs the first step too (logging_first_step), then every LOGGING_STEPS.
LOGGED_STEPS = [1, *range(LOGGING_STEPS, STEPS + 1, LOGGING_STEPS)]
TOKEN = "mlflow-token-that-must-stay-secret"


def mlflow_env(cluster) -> dict[str, str]:
    lines = cluster.mlflow_env_file.read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))


def test_a_finetunejob_with_mlflow_tracking_logs_its_run_to_the_dev_clusters_mlflow(
        cluster, namespace, operator, tiny_model):
    cluster.wait_mlflow()
    env = mlflow_env(cluster)
    assert env["MLFLOW_TRACKING_URI"] == cluster.mlflow_url
    name = "tracked"
    cluster.kubectl("create", "secret", "generic", "mlflow-creds", "-n", namespace,
                    f"--from-literal=MLFLOW_TRACKING_TOKEN={TOKEN}")
    apply(cluster, namespace, {
        "apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": name},
        "spec": {
            "suspend": True,
            "model": {"source": str(tiny_model)},
            "method": {"type": "lora", "lora": {"r": 8, "alpha": 16, "dropout": 0.0}},
            "dataset": {"source": f"pvc://{name}-workspace/data/train.jsonl", "format": "instruction",
                        "evalFraction": 0.1, "minExamples": 4, "dedup": {"exact": False, "nearThreshold": 0}},
            "training": {"epochs": 1, "maxSteps": STEPS, "perDeviceBatchSize": 4, "learningRate": 3e-3,
                         "lrScheduler": "constant", "maxSeqLength": 64, "precision": "fp32",
                         "loggingSteps": LOGGING_STEPS, "saveSteps": 4, "saveTotalLimit": 2, "seed": 0},
            "resources": {"gpusPerNode": 0, "cpu": "1", "memory": "4Gi",
                          "nodeSelector": {"finetune.dev/local-node": "true"},
                          "tolerations": [{"key": "finetune.dev/local-node", "operator": "Exists",
                                           "effect": "NoSchedule"}]},
            "storage": {"size": "1Gi"},
            "evaluation": {"comparison": {"enabled": False}},  # measured in test_operator_realrun
            "tracking": {"mlflow": {"trackingUri": env["MLFLOW_CLUSTER_TRACKING_URI"],
                                    "experiment": f"{namespace}-experiment",
                                    "secretRef": {"name": "mlflow-creds"}}},
        }})
    wait_phase(cluster, namespace, name, "Suspended")
    root = volume_path(cluster, namespace, f"{name}-workspace")
    write_jsonl(root / "data" / "train.jsonl", learnable_instruction_records())

    cluster.kubectl("patch", "ftj", name, "-n", namespace, "--type=merge", "-p", '{"spec":{"suspend":false}}')

    def done():
        s = status(cluster, namespace, name)
        if s.get("phase") == "Failed":
            raise AssertionError(f"the job failed: {json.dumps(s, indent=2)}")
        return s.get("phase") == "Succeeded" and s
    s = wait_for(done, timeout=600, what="the tracked training run to succeed", interval=1)

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name(f"{namespace}-experiment")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["training.maxSteps"] == str(STEPS)
    summary = json.loads((root / "reports" / "summary.json").read_text())
    assert run.data.params["dataset.hash"] == summary["datasetHash"]
    assert run.data.tags["finetune.dev/namespace"] == namespace
    loss = client.get_metric_history(run.info.run_id, "loss")
    assert sorted(m.step for m in loss) == LOGGED_STEPS
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"README.md", "loss.png"} <= artifacts
    assert "adapter" not in artifacts  # logAdapter is false by default

    assert s["tracking"]["mlflow"]["state"] == "Logging"
    assert s["tracking"]["mlflow"]["runUrl"] == (
        f"{env['MLFLOW_CLUSTER_TRACKING_URI']}/#/experiments/{experiment.experiment_id}/runs/{run.info.run_id}")
    wait_for(lambda: any(c["type"] == "TrackingAvailable" and c["status"] == "True"
                         for c in status(cluster, namespace, name).get("conditions", [])),
             timeout=60, what="the TrackingAvailable condition")

    # The token reached the trainer only through the pod's environment (a Secret reference).
    config_map = json.dumps(get_json(cluster, "configmap", "-n", namespace, "-l", f"finetune.dev/finetunejob={name}"))
    events = cluster.kubectl("get", "events", "-n", namespace, "-o", "json").stdout
    assert TOKEN not in config_map and TOKEN not in json.dumps(s) and TOKEN not in events
    pod = get_json(cluster, "pods", "-n", namespace, "-l", f"finetune.dev/finetunejob={name}")["items"][0]
    env_refs = {e["name"]: e.get("valueFrom", {}) for e in pod["spec"]["containers"][0]["env"]}
    assert env_refs["MLFLOW_TRACKING_TOKEN"]["secretKeyRef"]["name"] == "mlflow-creds"
    assert TOKEN not in json.dumps(pod)
