"""Resume cost: steps lost and seconds to the first new step after the trainer is SIGKILLed.

    PYTHONPATH=api:operator:trainer_image:hack:. .venv/bin/python bench/bench_resume.py [--save-steps 5 20]

The tiny model, LoRA, one step logged per step. For each save interval the trainer runs
until `--kill-at` steps are logged, is SIGKILLed (no checkpoint on the way out, as when a
node dies), and is started again on the same volume: steps lost = steps done before the
kill - the step of the checkpoint it resumed from; restart cost = seconds from the new
process's start to its first logged step (process start, imports, data, model and
checkpoint load, one step). A fresh start's time to its first step is measured alongside.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for sub in ("api", "trainer_image", "hack", "operator", "."):
    sys.path.insert(0, str(REPO / sub))

from tests.fixtures.ml import learnable_instruction_records, trainer_env, write_jsonl  # noqa: E402

STEP_LINE = re.compile(r"'loss'")


def config(root: Path, model: Path, save_steps: int, max_steps: int) -> Path:
    write_jsonl(root / "data" / "train.jsonl", learnable_instruction_records(96))
    cfg = {"apiVersion": "finetune.dev/v1alpha1", "kind": "TrainerConfig",
           "model": {"source": str(model)},
           "method": {"type": "lora", "lora": {"r": 8, "alpha": 16, "dropout": 0.0}},
           "dataset": {"source": "volume://data/train.jsonl", "format": "instruction", "evalFraction": 0.1,
                       "minExamples": 4, "dedup": {"exact": False, "nearThreshold": 0}},
           "training": {"epochs": 100, "maxSteps": max_steps, "perDeviceBatchSize": 4, "learningRate": 3e-3,
                        "lrScheduler": "constant", "maxSeqLength": 64, "precision": "fp32", "loggingSteps": 1,
                        "saveSteps": save_steps, "saveTotalLimit": 2, "seed": 0},
           "paths": {"root": str(root)}, "reporting": {"statusPatch": False, "metricsPort": None}}
    path = root.parent / f"config-{save_steps}.json"
    path.write_text(json.dumps(cfg))
    return path


def run_until(cfg: Path, tmp: Path, steps: int | None) -> tuple[subprocess.Popen, float, int, list[float]]:
    """Start the trainer; return after `steps` logged steps (SIGKILL) or at its exit."""
    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "finetune_trainer", "train", "--config", str(cfg)],
                            env=trainer_env(tmp), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen, times = 0, []
    for line in proc.stdout:
        if STEP_LINE.search(line):
            seen += 1
            times.append(time.monotonic() - start)
            if steps is not None and seen >= steps:
                proc.kill()
                break
    proc.wait()
    return proc, start, seen, times


def one(save_steps: int, kill_at: int, max_steps: int, model: Path, workdir: Path) -> dict:
    root = workdir / f"save-{save_steps}" / "workspace"
    cfg = config(root, model, save_steps, max_steps)
    _, _, done, first_times = run_until(cfg, workdir, kill_at)
    complete = sorted(int(p.parent.name.split("-")[1]) for p in (root / "checkpoints").glob("checkpoint-*/COMPLETE"))
    proc, _, more, times = run_until(cfg, workdir, 1)
    # The second process was stopped at its first step: what it resumed from is in its checkpoints.
    resumed = complete[-1] if complete else 0
    return {"save_steps": save_steps, "killed_after_steps": done, "resumed_from_step": resumed,
            "steps_lost": done - resumed,
            "fresh_start_to_first_step_s": round(first_times[0], 2),
            "restart_to_first_new_step_s": round(times[0], 2) if times else None,
            "seconds_per_step": round((first_times[-1] - first_times[0]) / max(1, len(first_times) - 1), 3)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--save-steps", type=int, nargs="+", default=[5, 20])
    parser.add_argument("--kill-at", type=int, default=38)
    parser.add_argument("--max-steps", type=int, default=60)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "resume.json"))
    args = parser.parse_args(argv)
    from finetune_devcluster.tiny_model import build_tiny_model, default_cache_dir

    model = build_tiny_model(default_cache_dir())
    with tempfile.TemporaryDirectory(prefix="bench-resume-") as tmp:
        results = [one(s, args.kill_at, args.max_steps, model, Path(tmp)) for s in args.save_steps]
    for r in results:
        print(f"saveSteps {r['save_steps']:>3}: killed after {r['killed_after_steps']} steps, resumed from "
              f"{r['resumed_from_step']}: {r['steps_lost']} steps lost; restart -> first new step "
              f"{r['restart_to_first_new_step_s']} s (fresh start {r['fresh_start_to_first_step_s']} s, "
              f"{r['seconds_per_step']} s/step)", file=sys.stderr)
    out = Path(args.out)
    out.write_text(json.dumps({"benchmark": "resume after SIGKILL of the trainer, tiny model, LoRA",
                               "kill_at": args.kill_at, "cpus": os.cpu_count(),
                               "loadAverage1m": round(os.getloadavg()[0], 2), "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
