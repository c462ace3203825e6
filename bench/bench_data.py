"""Records per second of `validate-data` with exact and near-duplicate removal.

    python bench/bench_data.py [--sizes 10000 100000 1000000] [--out bench/results/data.json]

Generates instruction-format JSONL (about 45 words a record, 5% exact and 5% near-duplicates
planted), runs validate_cli on it end to end (read, validate, dedup, length, split, report),
and writes the timings as JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "trainer_image"))
sys.path.insert(0, str(ROOT / "api"))

from finetune_trainer.data import validate_cli  # noqa: E402

VOCAB = np.array([f"w{i}" for i in range(30_000)], dtype=object)


def generate(path: Path, n: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    words = VOCAB[rng.integers(0, len(VOCAB), size=(n, 45))]
    with path.open("w") as f:
        for i in range(n):
            row = words[i]
            kind = i % 20
            if kind == 0 and i:  # an exact copy of an earlier record
                row = words[i - 1]
            elif kind == 1 and i > 1:  # an earlier record with its last word changed
                row = words[i - 2].copy()
                row[-1] = "changed"
            instruction = " ".join(row[:15])
            output = " ".join(row[15:])
            f.write(json.dumps({"instruction": instruction, "input": "", "output": output}))
            f.write("\n")


def run_one(n: int, workdir: Path) -> dict:
    path = workdir / f"data-{n}.jsonl"
    generate(path, n)
    out = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(out):
        code = validate_cli(["--format", "instruction", "--json", "--near-threshold", "0.9",
                             str(path)])
    seconds = time.perf_counter() - start
    report = json.loads(out.getvalue())
    path.unlink()
    return {
        "records": n,
        "seconds": round(seconds, 3),
        "recordsPerSecond": round(n / seconds),
        "exitCode": code,
        "duplicatesRemoved": report["duplicatesRemoved"],
        "nearDuplicatesRemoved": report["nearDuplicatesRemoved"],
        "trainExamples": report["trainExamples"],
        "evalExamples": report["evalExamples"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "data.json"))
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            result = run_one(n, Path(tmp))
            print(f"{n:>9} records  {result['seconds']:8.2f} s  "
                  f"{result['recordsPerSecond']:>8} records/s", file=sys.stderr)
            results.append(result)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "benchmark": "validate-data, instruction format, exact + near dedup (threshold 0.9)",
        "python": platform.python_version(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        # A busy machine slows every number here; this says how busy it was at the end.
        "loadAverage1m": round(os.getloadavg()[0], 2),
        "results": results,
    }, indent=2) + "\n")


if __name__ == "__main__":
    main()
