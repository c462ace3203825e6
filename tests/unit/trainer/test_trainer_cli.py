"""The CLI's contract with the Job: exit codes and the termination message."""

from __future__ import annotations

import json
import subprocess

from finetune_trainer.cli import build_parser, classify
from finetune_trainer.config import ConfigError
from tests.fixtures.ml import trainer_command, trainer_env

PERMANENT, RETRYABLE = 42, 43


def test_errors_map_to_exit_codes():
    from finetune_trainer.data import DataValidationError
    from finetune_trainer.train import TerminationRequested, TrainingDiverged

    assert classify(ConfigError("x")) == (PERMANENT, "InvalidConfig")
    assert classify(DataValidationError.__new__(DataValidationError)) == (PERMANENT, "DataValidationFailed")
    assert classify(TrainingDiverged("nan")) == (PERMANENT, "TrainingDiverged")
    assert classify(TerminationRequested("sigterm")) == (RETRYABLE, "Terminated")
    assert classify(OSError("disk")) == (RETRYABLE, "Error")


def test_train_and_evaluate_take_a_config():
    parser = build_parser()
    assert parser.parse_args(["train", "--config", "c.json"]).config == "c.json"
    assert parser.parse_args(["evaluate", "--config", "c.json"]).command == "evaluate"


def test_missing_config_is_permanent(tmp_path):
    result = subprocess.run(trainer_command(tmp_path / "nope.json"), env=trainer_env(tmp_path),
                            capture_output=True, text=True, timeout=120)

    assert result.returncode == PERMANENT
    end = json.loads((tmp_path / "termination-log").read_text())
    assert end["reason"] == "InvalidConfig" and "does not exist" in end["message"]


def test_unknown_config_field_is_permanent(tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model": {"source": "x"}, "dataset": {"source": "y"},
                                  "training": {"learningRat": 1}}))

    result = subprocess.run(trainer_command(config), env=trainer_env(tmp_path),
                            capture_output=True, text=True, timeout=120)

    assert result.returncode == PERMANENT
    assert "training.learningRat: unknown field" in json.loads((tmp_path / "termination-log").read_text())["message"]


def test_unusable_data_is_permanent_before_training(trainer_config, tmp_path):
    config = trainer_config(records=[{"instruction": "only one"}], dataset={"minExamples": 10})

    result = subprocess.run(trainer_command(config), env=trainer_env(tmp_path),
                            capture_output=True, text=True, timeout=240)

    assert result.returncode == PERMANENT, result.stderr[-2000:]
    assert json.loads((tmp_path / "termination-log").read_text())["reason"] == "DataValidationFailed"
    root = json.loads(config.read_text())["paths"]["root"]
    assert not (tmp_path / root / "checkpoints").exists()


def test_validate_data_is_delegated_to_the_data_package(tmp_path):
    result = subprocess.run([*trainer_command(tmp_path / "x")[:3], "validate-data", "--help"],
                            env=trainer_env(tmp_path), capture_output=True, text=True, timeout=120)

    assert result.returncode == 0
    assert "usage" in result.stdout.lower()
