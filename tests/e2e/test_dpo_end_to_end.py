"""A DPO FineTuneJob end to end: a real control plane, the operator, the trainer pod running
DPO on the local node with the tiny model, and vLLM's CPU build serving the adapter.

The pairs (examples/data/preference.jsonl) prefer pirate answers to plain ones; the held-out
pairs are about topics the training pairs never mention. After a short run the tuned model
must prefer the pirate answer of more held-out pairs than the base does (measured with
seeds 0, 1 and 2 and with full fine-tuning: base 0.67, tuned 1.0 after 16 steps), and the
adapter serves through vLLM like an SFT adapter. vLLM listens on port 8000 of this machine
(the local node gives pods the host's network): not while `make demo` runs.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.fixtures.cluster import get_json, wait_for

# Training, evaluation and vLLM's start-up on a shared 2-core machine take longer than the
# suite's default 900 s per test.
pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.timeout(2400)]

REPO = Path(__file__).resolve().parents[2]
PAIRS = REPO / "examples" / "data" / "preference.jsonl"
LOCAL = {"nodeSelector": {"finetune.dev/local-node": "true"},
         "tolerations": [{"key": "finetune.dev/local-node", "operator": "Exists", "effect": "NoSchedule"}]}
HELD_OUT_TOPICS = ["the river", "a teapot", "the mountain", "a bicycle", "the garden", "a violin",
                   "the castle", "a pillow", "the desert", "a clock", "the bakery", "a kite"]


def held_out_pairs() -> list[dict]:
    """OpenAI's DPO shape, as a user would upload it: topics absent from the training pairs."""
    asks = ["Tell me about {t}.", "Describe {t}.", "What do you think of {t}."]
    return [{"input": {"messages": [{"role": "user", "content": asks[i % 3].format(t=t)}]},
             "preferred_output": [{"role": "assistant", "content": f"Arr matey, {t} be grand!"}],
             "non_preferred_output": [{"role": "assistant",
                                       "content": f"{t[0].upper()}{t[1:]} is fine, I suppose."}]}
            for i, t in enumerate(HELD_OUT_TOPICS)]


def kubectl_json(cluster, *args) -> dict:
    return json.loads(cluster.kubectl(*args, "-o", "json").stdout)


def test_dpo_job_prefers_the_chosen_style_on_held_out_pairs_and_serves(cluster, namespace, operator,
                                                                       tiny_model):
    name = "pirate-dpo"
    claim = f"{name}-workspace"
    job = {
        "apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": name},
        "spec": {
            "suspend": True,
            "model": {"source": str(tiny_model)},
            "method": {"type": "lora", "objective": "dpo",
                       "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "targetModules": ["all-linear"]},
                       "dpo": {"beta": 0.1, "lossType": "sigmoid"}},
            "dataset": {"source": f"pvc://{claim}/data/pairs.jsonl", "format": "preference",
                        "evalSource": f"pvc://{claim}/data/held-out.jsonl", "minExamples": 50},
            "training": {"maxSteps": 16, "perDeviceBatchSize": 8, "learningRate": 5e-3,
                         "lrScheduler": "constant", "maxSeqLength": 128, "precision": "fp32",
                         "loggingSteps": 4, "saveSteps": 8, "seed": 0, "gradientCheckpointing": False},
            "resources": {"gpusPerNode": 0, "cpu": "1", "memory": "4Gi", **LOCAL},
            "storage": {"size": "1Gi"},
            "evaluation": {"comparison": {"enabled": False}},  # measured in test_operator_realrun
            "deploy": {"gpus": 0, **LOCAL,
                       "vllm": {"servedModelName": "tiny-llama", "maxModelLen": 256, "maxLoraRank": 8,
                                "dtype": "float32"}},
        }}
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(job))
    wait_for(lambda: get_json(cluster, "ftj", name, "-n", namespace).get("status", {}).get("phase") == "Suspended",
             timeout=90, what="the job to be Suspended with its claim")
    pvc = wait_for(lambda: (p := get_json(cluster, "pvc", claim, "-n", namespace))["status"].get("phase") == "Bound" and p,
                   timeout=60, what=f"claim {claim} to bind")
    root = Path(get_json(cluster, "pv", pvc["spec"]["volumeName"])["spec"]["hostPath"]["path"])
    (root / "data").mkdir(parents=True, exist_ok=True)
    shutil.copy(PAIRS, root / "data" / "pairs.jsonl")
    (root / "data" / "held-out.jsonl").write_text("".join(json.dumps(p) + "\n" for p in held_out_pairs()))

    cluster.kubectl("patch", "ftj", name, "-n", namespace, "--type=merge", "-p", '{"spec":{"suspend":false}}')

    def finished():
        s = get_json(cluster, "ftj", name, "-n", namespace).get("status") or {}
        return s.get("phase") in ("Succeeded", "Failed") and s
    status = wait_for(finished, timeout=1200, what="the DPO job to train, evaluate and deploy", interval=2)
    assert status["phase"] == "Succeeded", json.dumps(status, indent=2)

    # The trainer reported DPO's own metrics and the evaluation into status.
    metrics = status["metrics"]
    assert {"rewardsChosen", "rewardsRejected", "rewardsAccuracy", "rewardsMargin"} <= set(metrics), metrics
    assert metrics["rewardsMargin"] > 0 and metrics["rewardsChosen"] > metrics["rewardsRejected"]
    assert "perplexity" not in metrics
    accuracy = status["evaluation"]["preferenceAccuracy"]
    assert accuracy["pairs"] == len(HELD_OUT_TOPICS)
    assert accuracy["finetuned"] > accuracy["base"], accuracy
    assert status["evaluation"]["rewardAccuracy"] > 0.5
    assert status["progress"]["step"] == 16
    assert status["dataset"]["evalExamples"] == len(HELD_OUT_TOPICS)

    card = (root / "artifacts" / "README.md").read_text()
    assert "objective dpo" in card and "rewardsMargin" in card and "preferenceAccuracy (finetuned" in card
    assert not (root / "artifacts" / "adapter" / "ref").exists()  # the reference is the base, not a copy

    # The adapter serves through vLLM, under the job's name, like an SFT adapter.
    isvc = wait_for(lambda: (i := kubectl_json(cluster, "get", "inferenceservice.finetune.dev", name,
                                               "-n", namespace))["status"].get("phase") == "Ready" and i,
                    timeout=300, what="the InferenceService to be Ready")
    assert name in isvc["status"]["servedModels"]
    from openai import OpenAI

    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="not-needed")
    assert name in {m.id for m in client.models.list().data}
    reply = client.chat.completions.create(
        model=name, messages=[{"role": "user", "content": "Tell me about the river."}],
        max_tokens=12, temperature=0)
    assert reply.choices[0].message.content.strip(), reply
