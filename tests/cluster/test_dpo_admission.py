"""DPO's fields as the real API server enforces them: defaults, refusals naming the field,
and the trainer's DPO status (rewards, status.evaluation) kept, not pruned."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

from finetune_trainer.reporting import Progress

pytestmark = [pytest.mark.cluster]

REPO = Path(__file__).resolve().parents[2]
CRD_NAMES = ["finetunejobs.finetune.dev", "inferenceservices.finetune.dev"]

DPO_JOB = {
    "apiVersion": "finetune.dev/v1alpha1",
    "kind": "FineTuneJob",
    "metadata": {"name": "prefs"},
    "spec": {
        "model": {"source": "org/tiny-llama"},
        "method": {"objective": "dpo"},
        "dataset": {"source": "pvc://datasets/pairs.jsonl", "format": "preference"},
    },
}


@pytest.fixture(scope="module")
def crds(cluster):
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(REPO / "crds"))
    cluster.wait_established(*CRD_NAMES)
    return cluster


def with_spec(**sections) -> dict:
    job = copy.deepcopy(DPO_JOB)
    for key, value in sections.items():
        if value is None:
            job["spec"].pop(key, None)
        elif isinstance(value, dict) and isinstance(job["spec"].get(key), dict):
            job["spec"][key] = {**job["spec"][key], **value}
        else:
            job["spec"][key] = value
    return job


def create(cluster, namespace: str, manifest: dict):
    return cluster.kubectl("create", "-n", namespace, "-f", "-", input=yaml.safe_dump(manifest),
                           check=False)


def get(cluster, namespace: str, name: str) -> dict:
    return json.loads(cluster.kubectl("get", "-n", namespace, "ftj", name, "-o", "json").stdout)


def test_a_dpo_job_reads_back_with_dpo_defaults_and_sft_stays_the_default(crds, namespace):
    assert create(crds, namespace, DPO_JOB).returncode == 0
    sft = with_spec(method=None, dataset={"format": "instruction"})
    sft["metadata"]["name"] = "plain"
    assert create(crds, namespace, sft).returncode == 0

    method = get(crds, namespace, "prefs")["spec"]["method"]
    assert method["objective"] == "dpo"
    assert "dpo" not in method  # an optional block: the trainer fills beta 0.1, lossType sigmoid
    assert get(crds, namespace, "plain")["spec"]["method"]["objective"] == "sft"

    tuned = with_spec(method={"objective": "dpo", "dpo": {"beta": 0.5, "maxPromptLength": 64}})
    tuned["metadata"]["name"] = "tuned"
    assert create(crds, namespace, tuned).returncode == 0
    assert get(crds, namespace, "tuned")["spec"]["method"]["dpo"] == {
        "beta": 0.5, "lossType": "sigmoid", "maxPromptLength": 64}


INVALID = [
    ("dpo-on-instruction-data", {"dataset": {"format": "instruction"}},
     "spec.method.objective dpo needs spec.dataset.format preference"),
    ("dpo-on-chat-data", {"dataset": {"format": "chat"}},
     "spec.method.objective dpo needs spec.dataset.format preference"),
    ("preference-data-with-sft", {"method": {"objective": "sft"}},
     "spec.dataset.format preference is only for spec.method.objective dpo"),
    ("preference-data-default-objective", {"method": None},
     "spec.dataset.format preference is only for spec.method.objective dpo"),
    ("dpo-section-with-sft", {"method": {"objective": "sft", "dpo": {"beta": 0.2}},
                              "dataset": {"format": "instruction"}},
     "spec.method.dpo is only allowed when spec.method.objective is dpo"),
    ("unknown-objective", {"method": {"objective": "ppo"}}, 'spec.method.objective: Unsupported value: "ppo"'),
    ("beta-zero", {"method": {"objective": "dpo", "dpo": {"beta": 0}}}, "spec.method.dpo.beta"),
    ("loss-type", {"method": {"objective": "dpo", "dpo": {"lossType": "kto"}}},
     'spec.method.dpo.lossType: Unsupported value: "kto"'),
    ("prompt-length-zero", {"method": {"objective": "dpo", "dpo": {"maxPromptLength": 0}}},
     "spec.method.dpo.maxPromptLength"),
    ("completion-length-zero", {"method": {"objective": "dpo", "dpo": {"maxCompletionLength": 0}}},
     "spec.method.dpo.maxCompletionLength"),
    ("packing-with-dpo", {"training": {"packing": "on"}},
     "spec.training.packing on is not allowed with spec.method.objective dpo"),
    ("single-examples-mixed-into-pairs",
     {"dataset": {"mix": {"source": "org/general", "ratio": 0.1, "format": "chat"}}},
     "spec.dataset.mix.format must be preference exactly when spec.dataset.format is preference"),
]


@pytest.mark.parametrize("case, sections, message", INVALID, ids=[c[0] for c in INVALID])
def test_combinations_that_cannot_train_are_refused_naming_the_field(crds, namespace, case,
                                                                     sections, message):
    result = create(crds, namespace, with_spec(**sections))
    assert result.returncode != 0, f"{case} was accepted"
    assert message in result.stderr, result.stderr


def test_the_trainers_dpo_status_is_kept(crds, namespace):
    """What the DPO trainer patches (rewards, evaluation) passes the schema and is not pruned."""
    assert create(crds, namespace, DPO_JOB).returncode == 0
    progress = Progress(step=16, total_steps=16, train_loss=0.05, eval_loss=0.01,
                        objective_metrics={"rewardsChosen": 2.06, "rewardsRejected": -2.36,
                                           "rewardsAccuracy": 1.0, "rewardsMargin": 4.42},
                        evaluation={"evalLoss": 0.01, "preferenceAccuracy": {
                            "base": 0.6667, "finetuned": 1.0, "pairs": 12}, "rewardAccuracy": 1.0},
                        lm_loss=False)
    body = progress.status_patch()
    result = crds.kubectl("patch", "-n", namespace, "ftj", "prefs", "--type=merge",
                          "--subresource=status", "-p", json.dumps(body), check=False)
    assert result.returncode == 0, result.stderr

    status = get(crds, namespace, "prefs")["status"]
    assert status["metrics"]["rewardsMargin"] == 4.42
    assert status["metrics"]["rewardsAccuracy"] == 1.0
    assert "perplexity" not in status["metrics"]  # a DPO loss is no language-model loss
    assert status["evaluation"] == {"evalLoss": 0.01, "rewardAccuracy": 1.0, "preferenceAccuracy": {
        "base": 0.6667, "finetuned": 1.0, "pairs": 12}}
