"""The trainer under faults: SIGKILLed again and again during one run, and a job volume that fills up.

Both run `python -m finetune_trainer train --config ...` as a subprocess on the tiny model,
as the pod would, with small step counts so the whole file stays around two minutes.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from finetune_trainer.checkpoints import COMPLETE_MARKER, find_resumable, verify
from tests.fixtures.ml import trainer_command, trainer_env

pytestmark = [pytest.mark.reliability, pytest.mark.slow]

REPO_ROOT = Path(__file__).resolve().parents[2]
RESULTS = REPO_ROOT / "bench" / "results" / "reliability_trainer_kills.json"
RETRYABLE = 43
KILLS = 10
SAVE_STEPS = 2
MAX_STEPS = 26  # room for 10 kills that each move the run on by at most one save interval
SEED = 20240610
RESUMING = re.compile(r"resuming from \S+ \(step (\d+)\)")


def reported_step(patches: list) -> int:
    """The newest training step the trainer reported through its status patches."""
    steps = [body["status"]["progress"].get("step") or 0 for _, _, body in patches
             if "progress" in body.get("status", {})]
    return max(steps, default=0)


def wait_until(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the trainer exited ({proc.returncode}) before {what}")
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def test_trainer_sigkilled_ten_times_resumes_and_finishes_at_the_planned_step(
        trainer_config, tmp_path, fake_kube_api):
    """Given a 26-step LoRA run saving every 2 steps, when it is SIGKILLed 10 times at seeded
    random moments (each a little after it passed its resume point), then every restart resumes
    from the newest complete checkpoint, at most one save interval of steps is lost per kill,
    and the last run finishes at step 26. The numbers go to the test's folder, and with
    UPDATE_RESULTS=1 to bench/results/reliability_trainer_kills.json."""
    kubeconfig, patches = fake_kube_api
    config = trainer_config(
        training={"maxSteps": MAX_STEPS, "saveSteps": SAVE_STEPS, "saveTotalLimit": 2, "loggingSteps": 1},
        dataset={"evalFraction": 0.0},
        job={"name": "kills", "namespace": "rel"},
        reporting={"statusPatch": True, "statusInterval": 0, "metricsPort": None})
    root = Path(json.loads(config.read_text())["paths"]["root"])
    env = trainer_env(tmp_path, FINETUNE_KUBECONFIG=str(kubeconfig), FINETUNE_TEST_STEP_DELAY="0.15")
    rng = random.Random(SEED)
    kills: list[dict] = []
    resume_step = 0
    started = time.monotonic()

    for attempt in range(KILLS + 1):
        log = tmp_path / f"attempt-{attempt}.log"
        patches.clear()
        with open(log, "w") as out:
            proc = subprocess.Popen(trainer_command(config), env=env, stdout=out, stderr=subprocess.STDOUT)
        if attempt == KILLS:
            assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]
            break
        # Kill one to three steps past the resume point, plus a random fraction of a step, so
        # kills land before the next save, during it and after it.
        target = resume_step + rng.choice([1, 2, 3])
        try:
            wait_until(lambda: reported_step(patches) >= target, 240, f"step {target}", proc)
            time.sleep(rng.uniform(0.0, 0.3))
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        reached = reported_step(patches)
        newest = find_resumable(root / "checkpoints", quarantine_bad=False)
        kills.append({"attempt": attempt, "resumedFrom": resume_step, "killedAtStep": reached,
                      "newestCompleteCheckpoint": newest.step if newest else 0})
        resume_step = newest.step if newest else 0

    logs = [(tmp_path / f"attempt-{i}.log").read_text() for i in range(KILLS + 1)]
    resumed = [int(m.group(1)) if (m := RESUMING.search(text)) else 0 for text in logs]
    for kill, next_resume in zip(kills, resumed[1:]):
        kill["nextRunResumedFrom"] = next_resume
        kill["stepsLost"] = kill["killedAtStep"] - next_resume
    summary = json.loads((root / "reports" / "summary.json").read_text())
    record = {"kills": len(kills), "maxSteps": MAX_STEPS, "saveSteps": SAVE_STEPS, "seed": SEED,
              "finalStep": summary["step"], "resumedFrom": summary["resumedFrom"],
              "maxStepsLost": max(k["stepsLost"] for k in kills),
              "totalStepsLost": sum(k["stepsLost"] for k in kills),
              "wallSeconds": round(time.monotonic() - started, 1), "perKill": kills}
    # The tracked results file is rewritten only on request (UPDATE_RESULTS=1), so that a test
    # run leaves the checkout clean; the record is always in the test's own folder.
    (tmp_path / RESULTS.name).write_text(json.dumps(record, indent=1) + "\n")
    if os.environ.get("UPDATE_RESULTS"):
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps({k: v for k, v in record.items() if k != "perKill"}))

    assert len(kills) == KILLS
    assert resumed[0] == 0 and resumed[-1] > 0
    assert [k["nextRunResumedFrom"] for k in kills] == [k["newestCompleteCheckpoint"] for k in kills]
    assert all(0 <= k["stepsLost"] <= SAVE_STEPS for k in kills), kills
    assert summary["step"] == MAX_STEPS
    state = json.loads((root / "checkpoints" / f"checkpoint-{MAX_STEPS}" / "trainer_state.json").read_text())
    assert state["global_step"] == MAX_STEPS
    assert (root / "artifacts" / "adapter" / "adapter_config.json").is_file()


@pytest.fixture
def small_volume(tmp_path):
    """A tmpfs of a given size mounted on a temp folder (needs root and mount permission)."""
    mounted: list[Path] = []

    def mount(path: Path, size: str) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        out = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                             capture_output=True, text=True)
        if out.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs to fill ({out.stderr.strip() or out.returncode}); "
                        "this test needs root with CAP_SYS_ADMIN")
        mounted.append(path)
        return path

    def resize(path: Path, size: str) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(path)], check=True)

    mount.resize = resize
    yield mount
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_full_checkpoint_volume_fails_clearly_and_keeps_the_previous_checkpoint(
        trainer_config, tmp_path, small_volume):
    """Given a checkpoint folder on a filesystem with room for one checkpoint only, when the
    trainer writes its second one, then it exits with the retryable code and a termination
    message that says there is no space left; the first checkpoint is still complete, and
    once space is freed a new run resumes from it and finishes."""
    # Measure one checkpoint with a short run on the same workspace, then start over with the
    # checkpoint folder on a tmpfs sized for about one and a half checkpoints.
    probe = trainer_config(training={"maxSteps": 2, "saveSteps": 2}, dataset={"evalFraction": 0.0},
                           name="probe.json")
    done = subprocess.run(trainer_command(probe), env=trainer_env(tmp_path), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    root = Path(json.loads(probe.read_text())["paths"]["root"])
    size = sum(p.stat().st_size for p in (root / "checkpoints" / "checkpoint-2").rglob("*") if p.is_file())
    for folder in ("checkpoints", "artifacts", "reports"):
        shutil.rmtree(root / folder)
    config = trainer_config(training={"maxSteps": 6, "saveSteps": 2, "saveTotalLimit": 3},
                            dataset={"evalFraction": 0.0})
    volume = small_volume(root / "checkpoints", f"{int(size * 1.5) // 4096 * 4096 + 4096}")

    result = subprocess.run(trainer_command(config), env=trainer_env(tmp_path), capture_output=True,
                            text=True, timeout=300)

    end = json.loads((tmp_path / "termination-log").read_text())
    print(f"checkpoint {size} bytes; exit {result.returncode}; termination {end}")
    assert result.returncode == RETRYABLE, result.stderr[-3000:]
    assert "no space left" in end["message"].lower(), end
    assert end["reason"] == "NoSpaceLeft", end
    first = volume / "checkpoint-2"
    assert (first / COMPLETE_MARKER).is_file() and verify(first) is None
    assert end["step"] == 2
    assert not (volume / "checkpoint-4" / COMPLETE_MARKER).exists()

    small_volume.resize(volume, str(size * 6))
    again = subprocess.run(trainer_command(config), env=trainer_env(tmp_path), capture_output=True,
                           text=True, timeout=300)

    assert again.returncode == 0, again.stderr[-3000:]
    summary = json.loads((root / "reports" / "summary.json").read_text())
    assert summary["resumedFrom"] == "checkpoint-2" and summary["step"] == 6
