"""training.sharding fsdp: full fine-tuning of the tiny model under FSDP2 (torch's fully_shard
through accelerate) in two gloo processes on CPU, through the launcher, as one trainer pod
with two GPUs runs it. Killed with SIGKILL after a sharded checkpoint, then resumed from it.
"""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.fixtures.ml import trainer_env

pytestmark = pytest.mark.slow


def launch(config: Path) -> list[str]:
    return [sys.executable, "-m", "finetune_trainer", "launch", "--config", str(config), "--nproc-per-node", "2"]


def test_fsdp_full_fine_tuning_resumes_from_its_sharded_checkpoint_after_sigkill(trainer_config, tmp_path):
    config = trainer_config(method={"type": "full", "lora": None},
                            training={"sharding": "fsdp", "maxSteps": 4, "saveSteps": 2, "loggingSteps": 1,
                                      "perDeviceBatchSize": 2, "learningRate": 1e-3},
                            dataset={"evalFraction": 0})
    root = Path(json.loads(config.read_text())["paths"]["root"])
    checkpoint = root / "checkpoints" / "checkpoint-2"

    # Given a sharded run killed (SIGKILL, every process) once its first checkpoint is complete.
    first = subprocess.Popen(launch(config), env=trainer_env(tmp_path, FINETUNE_TEST_STEP_DELAY="1"),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not (checkpoint / "COMPLETE").is_file():  # steps take 1 s: checkpoint-4 is far
            assert first.poll() is None, first.stdout.read()[-4000:]
            assert time.monotonic() < deadline, "no complete checkpoint in time"
            time.sleep(0.2)
    finally:
        # Every process of the "pod" (torchrun starts its workers in sessions of their own).
        for process in [psutil.Process(first.pid), *psutil.Process(first.pid).children(recursive=True)]:
            process.send_signal(signal.SIGKILL)
        first.wait()
    shards = sorted(p.name for p in checkpoint.rglob("*.distcp"))
    assert len(shards) >= 2 and any(n.startswith("__1_") for n in shards), \
        f"each rank writes its own shard: {shards}"
    assert not (root / "artifacts" / "merged").exists()

    # When the run starts again.
    result = subprocess.run(launch(config), env=trainer_env(tmp_path), capture_output=True, text=True,
                            timeout=300)

    # Then it resumes from the sharded checkpoint, continues to step 4 with a finite loss, and
    # writes one whole model.
    assert result.returncode == 0, result.stderr[-4000:]
    assert "resuming from" in result.stderr and "checkpoint-2 (step 2)" in result.stderr
    assert "sharding fsdp (asked fsdp)" in result.stderr
    summary = json.loads((root / "reports" / "summary.json").read_text())
    assert summary["step"] == 4 and summary["resumedFrom"] == "checkpoint-2"
    assert math.isfinite(summary["trainLoss"])
    from safetensors import safe_open

    merged = root / "artifacts" / "merged"
    with safe_open(str(merged / "model.safetensors"), "pt") as f:
        names = list(f.keys())
        assert "model.embed_tokens.weight" in names
        assert all(not n.startswith("_fsdp") and "_orig_mod" not in n for n in names)
        weight = f.get_tensor("model.embed_tokens.weight")
    config_json = json.loads((merged / "config.json").read_text())
    assert str(weight.dtype).endswith(config_json["dtype"]), "saved in the model's own dtype"
