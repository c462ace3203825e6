"""results.csv: the per-step training history in OpenAI's result-file columns."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from types import SimpleNamespace

from finetune_trainer.results import results_csv, write_results


HISTORY = [
    {"step": 2, "loss": 2.5, "mean_token_accuracy": 0.25, "learning_rate": 0.003, "epoch": 0.1},
    {"step": 4, "loss": 2.0, "mean_token_accuracy": 0.5},
    {"step": 4, "eval_loss": 2.25, "eval_mean_token_accuracy": 0.375},
    {"step": 6, "loss": float("nan")},
    {"train_runtime": 10.0, "train_loss": 2.1, "step": 6},
]


def test_one_row_per_logged_step_with_training_and_evaluation_values_side_by_side():
    rows = list(csv.DictReader(io.StringIO(results_csv(HISTORY))))
    assert list(rows[0]) == ["step", "train_loss", "train_accuracy", "valid_loss", "valid_mean_token_accuracy"]
    assert rows[0] == {"step": "2", "train_loss": "2.5", "train_accuracy": "0.25", "valid_loss": "",
                       "valid_mean_token_accuracy": ""}
    assert rows[1] == {"step": "4", "train_loss": "2", "train_accuracy": "0.5", "valid_loss": "2.25",
                       "valid_mean_token_accuracy": "0.375"}
    assert len(rows) == 2, "a step with only a non-finite loss, or the run summary, adds no row"


def test_results_go_to_the_job_volume_and_to_the_results_file(tmp_path):
    target = tmp_path / "claim" / "results.csv"
    cfg = SimpleNamespace(paths=SimpleNamespace(reports=tmp_path / "reports"),
                          output=SimpleNamespace(results_file=str(target)))
    write_results(cfg, HISTORY)
    assert (tmp_path / "reports" / "results.csv").read_text() == target.read_text() == results_csv(HISTORY)
    assert not list(Path(target.parent).glob(".*.tmp"))
