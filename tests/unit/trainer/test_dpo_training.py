"""DPO in the trainer: the TRL config it builds, the metrics it reports, and real runs of
`finetune-trainer train` on the tiny model (LoRA: the reference is the base with the adapter
disabled; full: an explicit frozen copy)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from finetune_trainer.config import TrainerConfig
from finetune_trainer.model import Precision
from finetune_trainer.objectives import get_objective
from finetune_trainer.reporting import Metrics, Progress
from tests.fixtures.ml import trainer_command, trainer_env

REPO = Path(__file__).resolve().parents[3]
PAIRS = REPO / "examples" / "data" / "preference.jsonl"
HELD_OUT = ["the river", "a teapot", "the mountain", "a bicycle", "the garden", "a violin",
            "the castle", "a pillow"]


def held_out_pairs() -> list[dict]:
    return [{"prompt": [{"role": "user", "content": f"Tell me about {t}."}],
             "chosen": [{"role": "assistant", "content": f"Arr matey, {t} be grand!"}],
             "rejected": [{"role": "assistant", "content": f"{t[0].upper()}{t[1:]} is fine, I suppose."}]}
            for t in HELD_OUT]


def dpo_config(tmp_path: Path, tiny_model: Path, **method) -> dict:
    root = tmp_path / "workspace"
    (root / "data").mkdir(parents=True)
    (root / "data" / "held-out.jsonl").write_text("".join(json.dumps(p) + "\n" for p in held_out_pairs()))
    return {
        "apiVersion": "finetune.dev/v1alpha1", "kind": "TrainerConfig",
        "model": {"source": str(tiny_model)},
        "method": {"type": "lora", "lora": {"r": 8, "alpha": 16, "dropout": 0.0}, "objective": "dpo",
                   **method},
        "dataset": {"source": str(PAIRS), "format": "preference", "minExamples": 4,
                    "evalSource": "volume://data/held-out.jsonl"},
        "training": {"maxSteps": 16, "perDeviceBatchSize": 8, "learningRate": 5e-3,
                     "lrScheduler": "constant", "maxSeqLength": 128, "precision": "fp32",
                     "loggingSteps": 4, "saveSteps": 8, "seed": 0, "gradientCheckpointing": False,
                     # DPO's loss falls towards 0, where noise is many times the minimum.
                     "lossSpikeFactor": 0},
        "paths": {"root": str(root)},
        "reporting": {"statusPatch": False, "metricsPort": None},
    }


def test_dpo_hyperparameters_reach_trls_config(tiny_model, tmp_path):
    cfg = TrainerConfig.from_dict(dpo_config(tmp_path, tiny_model,
                                             dpo={"beta": 0.25, "lossType": "ipo"}))
    args = get_objective("dpo").build_args(cfg, Precision("fp32", "fp32"), has_eval=True,
                                           kind="preference", tokenizer=None, packing=False)
    assert type(args).__name__ == "DPOConfig"
    assert (args.beta, args.loss_type, args.max_length) == (0.25, ["ipo"], 128)
    assert args.eval_strategy == "steps" and args.save_steps == 8


def test_dpo_metrics_become_gauges_and_status_fields():
    metrics = Metrics(port=None)
    progress = Progress(objective_metrics={"rewardsChosen": 1.5, "rewardsRejected": -1.0,
                                           "rewardsAccuracy": 0.75, "rewardsMargin": 2.5},
                        evaluation={"preferenceAccuracy": {"base": 0.5, "finetuned": 0.9, "pairs": 8}},
                        eval_loss=0.2, lm_loss=False)
    metrics.update(progress)

    value = metrics.registry.get_sample_value
    assert value("finetune_trainer_rewards_margin") == 2.5
    assert value("finetune_trainer_rewards_accuracy") == 0.75
    assert value("finetune_trainer_preference_accuracy", {"model": "finetuned"}) == 0.9
    assert value("finetune_trainer_preference_accuracy", {"model": "base"}) == 0.5
    status = progress.status_patch()["status"]
    assert status["metrics"]["rewardsChosen"] == 1.5 and "perplexity" not in status["metrics"]
    assert status["evaluation"]["preferenceAccuracy"]["finetuned"] == 0.9


def run(config: dict, tmp_path: Path, **env) -> tuple[subprocess.CompletedProcess, Path]:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    result = subprocess.run(trainer_command(path), env=trainer_env(tmp_path, **env),
                            capture_output=True, text=True, timeout=900)
    return result, Path(config["paths"]["root"])


@pytest.mark.slow
def test_lora_dpo_learns_the_preference_and_reports_it(tiny_model, tmp_path, fake_kube_api):
    """Its status patches go to a recording stand-in for the API server (no cluster here;
    tests/e2e/test_dpo_end_to_end.py uses the real one)."""
    kubeconfig, patches = fake_kube_api
    config = dpo_config(tmp_path, tiny_model, dpo={"maxPromptLength": 48})
    config["job"] = {"name": "prefs", "namespace": "team-a"}
    config["reporting"] = {"statusPatch": True, "statusInterval": 0, "metricsPort": None}

    result, root = run(config, tmp_path, FINETUNE_KUBECONFIG=str(kubeconfig))

    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((root / "reports" / "eval.json").read_text())
    accuracy = report["preferenceAccuracy"]
    assert accuracy["pairs"] == len(HELD_OUT)
    assert accuracy["finetuned"] > accuracy["base"], accuracy
    assert report["perplexity"] is None  # a DPO loss is no language-model loss
    summary = json.loads((root / "reports" / "summary.json").read_text())
    assert summary["objective"] == "dpo" and summary["objectiveMetrics"]["rewardsMargin"] > 0

    adapter = root / "artifacts" / "adapter"
    assert (adapter / "adapter_config.json").is_file()
    assert not (adapter / "ref").exists()  # the reference is the base with the adapter off, no copy
    card = (root / "artifacts" / "README.md").read_text()
    assert "objective dpo" in card and "rewardsMargin" in card

    bodies = [body["status"] for _, _, body in patches]
    assert any("rewardsMargin" in b.get("metrics", {}) for b in bodies)
    final = bodies[-1]
    assert final["evaluation"]["preferenceAccuracy"] == {k: v for k, v in accuracy.items()}
    assert "perplexity" not in final["metrics"]
    # OpenAI's trained_tokens for a DPO job: the non-padding tokens of both answers of each pair.
    assert final["progress"]["tokensSeen"] > 0
    assert any(b.get("metrics", {}).get("tokensPerSecond", 0) > 0 for b in bodies)


@pytest.mark.slow
def test_full_dpo_uses_a_frozen_reference_copy(tiny_model, tmp_path):
    config = dpo_config(tmp_path, tiny_model)
    config["method"] = {"type": "full", "objective": "dpo", "dpo": {"beta": 0.1}}
    config["training"]["learningRate"] = 1e-4

    result, root = run(config, tmp_path)

    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((root / "reports" / "eval.json").read_text())
    assert report["preferenceAccuracy"]["finetuned"] > report["preferenceAccuracy"]["base"]
    # The rewards are log-ratios against the reference: with the reference frozen they move apart.
    assert report["objectiveMetrics"]["rewardsMargin"] > 0
    assert (root / "artifacts" / "merged" / "config.json").is_file()


@pytest.mark.slow
@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="QLoRA needs a CUDA device")
def test_qlora_dpo_trains_on_cuda(tiny_model, tmp_path):
    config = dpo_config(tmp_path, tiny_model)
    config["method"]["type"] = "qlora"
    config["method"]["quantization"] = {"quantType": "nf4"}
    config["training"]["precision"] = "bf16"

    result, root = run(config, tmp_path)

    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((root / "reports" / "eval.json").read_text())
    assert report["preferenceAccuracy"]["finetuned"] > report["preferenceAccuracy"]["base"]
    assert (root / "artifacts" / "adapter" / "adapter_model.safetensors").is_file()
