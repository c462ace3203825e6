"""The real run: the local node executes the trainer command from the operator's Job (issue 5),
then the comparison Job's command, which serves the base model and the adapter through the
real vLLM CPU build and reports status.comparison (issue 22).

The FineTuneJob is created suspended so its volume exists before the dataset is copied
onto it (through the hostPath of the volume bound to the claim); resuming it lets the local
node run `python -m finetune_trainer train --config /etc/finetune/config.json` with the
per-job ServiceAccount token, and the trainer reports progress into status itself.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.fixtures.cluster import get_json, wait_for
from tests.fixtures.ml import learnable_instruction_records, write_jsonl
from tests.cluster.test_operator_lifecycle import apply, status, wait_phase

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


def volume_path(cluster, namespace: str, claim: str) -> Path:
    pvc = wait_for(lambda: (p := get_json(cluster, "pvc", claim, "-n", namespace))["status"].get("phase") == "Bound" and p,
                   timeout=60, what=f"claim {claim} to bind")
    pv = get_json(cluster, "pv", pvc["spec"]["volumeName"])
    return Path(pv["spec"]["hostPath"]["path"])


def test_the_local_node_trains_the_tiny_model_and_the_job_succeeds(cluster, namespace, operator, tiny_model):
    name = "real"
    apply(cluster, namespace, {
        "apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": name},
        "spec": {
            "suspend": True,
            "model": {"source": str(tiny_model)},
            "method": {"type": "lora", "lora": {"r": 8, "alpha": 16, "dropout": 0.0}},
            "dataset": {"source": f"pvc://{name}-workspace/data/train.jsonl", "format": "instruction",
                        "evalFraction": 0.1, "minExamples": 4, "dedup": {"exact": False, "nearThreshold": 0}},
            "training": {"epochs": 1, "maxSteps": 12, "perDeviceBatchSize": 4, "learningRate": 3e-3,
                         "lrScheduler": "constant", "maxSeqLength": 64, "precision": "fp32",
                         "loggingSteps": 2, "saveSteps": 6, "saveTotalLimit": 2, "seed": 0,
                         "gradientCheckpointing": False},
            "resources": {"gpusPerNode": 0, "cpu": "1", "memory": "4Gi",
                          "nodeSelector": {"finetune.dev/local-node": "true"},
                          "tolerations": [{"key": "finetune.dev/local-node", "operator": "Exists",
                                           "effect": "NoSchedule"}]},
            "storage": {"size": "1Gi"},
            # Issue 22: the comparison Job serves base and adapter through the real vLLM CPU build.
            "evaluation": {"maxNewTokens": 8, "metrics": ["exactMatch", "rouge"],
                           "prompts": [{"prompt": "Repeat the word red 2 times.", "reference": "red red"},
                                       {"prompt": "Repeat the word sun 1 times.", "reference": "/sun/"}],
                           "comparison": {"sampleSize": 3}},
        }})
    wait_phase(cluster, namespace, name, "Suspended")
    root = volume_path(cluster, namespace, f"{name}-workspace")
    write_jsonl(root / "data" / "train.jsonl", learnable_instruction_records())

    cluster.kubectl("patch", "ftj", name, "-n", namespace, "--type=merge", "-p", '{"spec":{"suspend":false}}')
    seen = set()

    def done():
        s = status(cluster, namespace, name)
        seen.add(s.get("phase"))
        if s.get("phase") == "Failed":
            raise AssertionError(f"the job failed: {json.dumps(s, indent=2)}")
        return s.get("phase") == "Succeeded" and s
    s = wait_for(done, timeout=900, what="the real training run and its comparison to succeed", interval=1)

    assert s["progress"]["step"] == 12 and s["progress"]["totalSteps"] == 12
    assert "trainLoss" in s["metrics"]
    # Throughput and the token count reach status (#14 item 8: tokensPerSecond stayed 0).
    assert s["metrics"]["tokensPerSecond"] > 0 and s["progress"]["tokensSeen"] > 0
    assert s["dataset"]["trainExamples"] > 0 and len(s["dataset"]["contentHash"]) == 64
    # The phases follow the trainer. (Training itself can pass between two reconciles here:
    # 12 tiny steps take about a second on an idle machine; tests/unit/operator covers when
    # the phase turns Training.)
    events = get_json(cluster, "events", "-n", namespace, "--field-selector",
                      f"involvedObject.kind=FineTuneJob,involvedObject.name={name}")["items"]
    phases = {e["reason"] for e in events}
    assert {"Validating", "Succeeded"} <= phases, sorted(phases)
    assert (root / "artifacts" / "adapter").is_dir()
    pod = get_json(cluster, "pods", "-n", namespace, "-l",
                   f"finetune.dev/finetunejob={name},app.kubernetes.io/component=trainer")["items"][0]
    assert pod["spec"]["nodeName"] == "local"
    assert pod["spec"]["serviceAccountName"] == f"{name}-trainer"

    # The comparison: both rows measured through one real vLLM server, the answers on the volume.
    assert "Comparing" in seen
    comparison = s["comparison"]
    assert comparison["state"] == "Measured", comparison
    assert (comparison["prompts"], comparison["samples"]) == (2, 3)
    base, tuned = comparison["rows"]
    assert (base["model"], tuned["model"]) == ("base", "fine-tuned")
    for row in (base, tuned):
        assert row["latencyP50Ms"] > 0 and row["latencyP95Ms"] >= row["latencyP50Ms"]
        assert row["outputTokensPerSecond"] > 0
        assert {"exactMatch", "rougeL", "patternMatch", "evalLoss"} <= set(row)
        assert "costPer1kOutputTokens" not in row  # no GPU-hour price given to this operator
    assert tuned["evalLoss"] < base["evalLoss"]  # the adapter learnt the echo rule
    report = json.loads((root / "artifacts" / "comparison.json").read_text())
    assert len(report["answers"]) == 5 and all("base" in a and "fineTuned" in a for a in report["answers"])
    compared = next(c for c in s["conditions"] if c["type"] == "Compared")
    assert (compared["status"], compared["reason"]) == ("True", "Measured")
    described = cluster.kubectl("describe", "ftj", name, "-n", namespace).stdout
    assert "Latency P 50 Ms" in described or "latencyP50Ms" in described
