"""#16 item 3: a job that asked for GPUs trained on CPU without a word when CUDA was unusable
(for example a driver too old for the CUDA 13 wheels). This machine has no GPU: the trainer
is given one GPU by the operator's environment variable, as on a GPU node whose driver cannot
serve it, and must fail at once, permanently, with the versions in its message."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from finetune_api import exitcodes
from finetune_trainer.cli import classify
from finetune_trainer.model import GPUUnavailable, check_gpus_usable
from tests.fixtures.ml import trainer_command, trainer_env


def test_no_gpus_asked_is_fine(monkeypatch):
    monkeypatch.delenv("FINETUNE_GPUS_PER_NODE", raising=False)
    check_gpus_usable()
    monkeypatch.setenv("FINETUNE_GPUS_PER_NODE", "0")
    check_gpus_usable()


def test_gpus_asked_without_cuda_fail_with_the_versions(monkeypatch):
    import torch

    monkeypatch.setenv("FINETUNE_GPUS_PER_NODE", "2")
    try:
        check_gpus_usable()
    except GPUUnavailable as exc:
        message = str(exc)
    else:
        raise AssertionError("no error although CUDA sees no GPU here")
    assert "asks for 2 GPU(s) but CUDA sees 0" in message and "driver:" in message
    assert f"torch {torch.__version__} built for CUDA" in message
    assert classify(GPUUnavailable(message)) == (exitcodes.PERMANENT, "GPUUnavailable")


def test_the_trainer_exits_permanently_before_loading_anything(trainer_config, tmp_path):
    config = trainer_config()
    env = trainer_env(tmp_path, FINETUNE_GPUS_PER_NODE="1")
    done = subprocess.run(trainer_command(config), env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == exitcodes.PERMANENT, done.stderr[-2000:]
    message = (tmp_path / "termination-log").read_text()
    assert "GPUUnavailable" in message and "CUDA sees 0" in message
    root = Path(json.loads(config.read_text())["paths"]["root"])
    assert not (root / "checkpoints").exists() and not (root / "data-cache").exists()
