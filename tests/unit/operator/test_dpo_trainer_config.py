"""The DPO fields of a FineTuneJob reach the trainer's config (and SFT configs stay as they were)."""

from __future__ import annotations

from pathlib import Path

import yaml

from finetune_api.models import FineTuneJob
from finetune_operator.builders.trainer_config import build_trainer_config
from finetune_trainer.config import TrainerConfig

REPO = Path(__file__).resolve().parents[3]


def job(spec: dict) -> FineTuneJob:
    return FineTuneJob.from_resource({
        "apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob",
        "metadata": {"name": "prefs", "namespace": "ml", "uid": "u-1"}, "spec": spec})


def test_the_dpo_example_renders_its_objective_and_hyperparameters():
    spec = yaml.safe_load((REPO / "examples" / "dpo.yaml").read_text())["spec"]

    config = build_trainer_config(job(spec))

    assert config["method"]["objective"] == "dpo"
    assert config["method"]["dpo"] == {"beta": 0.1, "lossType": "sigmoid", "maxPromptLength": 512,
                                       "maxCompletionLength": 512}
    assert config["dataset"]["format"] == "preference"
    parsed = TrainerConfig.from_dict(config)
    assert parsed.method.dpo.max_prompt_length == 512 and parsed.method.objective == "dpo"


def test_a_dpo_job_without_a_dpo_block_gets_the_defaults():
    config = build_trainer_config(job({
        "model": {"source": "org/m"}, "method": {"type": "full", "objective": "dpo"},
        "dataset": {"source": "pvc://d/pairs.jsonl", "format": "preference"}}))
    assert config["method"] == {"type": "full", "objective": "dpo",
                                "dpo": {"beta": 0.1, "lossType": "sigmoid"}}


def test_sft_configs_carry_no_objective_field():
    config = build_trainer_config(job({"model": {"source": "org/m"},
                                       "dataset": {"source": "pvc://d/x.jsonl"}}))
    assert "objective" not in config["method"] and "dpo" not in config["method"]
    assert TrainerConfig.from_dict(config).method.objective == "sft"
