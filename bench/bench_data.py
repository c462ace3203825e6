"""Records per second and peak memory of `validate-data` with exact and near-duplicate removal,
against rensa's MinHash LSH alone on the same records in the same run.

    python bench/bench_data.py [--sizes 10000 200000 1000000] [--out bench/results/data.json]

Generates instruction-format JSONL (about 45 words a record, 5% exact and 5% near-duplicates
planted). For each size, three child processes run one after the other, each timed inside
itself (imports and reading the texts for the anchors are outside the timing) and each
measured for peak RSS by the parent (`os.wait4`); `--rounds` rounds of the three (3 up to
200,000 records, `--rounds-large` above), the medians reported with each round's ratios:

- validate-data end to end (read, validate, dedup, length, split, report);
- the anchor: rensa's MinHash LSH alone, used record by record as its README shows
  (RMinHash(128) over the record's words, LSH insert, then a query per record);
- rensa's bulk API alone (one digest matrix per 4,096 records, insert and query flags), the
  fastest that library goes, for reference.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "trainer_image"))
sys.path.insert(0, str(ROOT / "api"))

THRESHOLD = 0.9
NUM_PERM = 128
BANDS = 16  # finetune_trainer.data.dedup.lsh_rows_per_band(0.9) == 8 rows per band


def generate(path: Path, n: int, seed: int = 0) -> None:
    import numpy as np

    vocab = np.array([f"w{i}" for i in range(30_000)], dtype=object)
    rng = np.random.default_rng(seed)
    with path.open("w") as f:
        for start in range(0, n, 100_000):
            words = vocab[rng.integers(0, len(vocab), size=(min(100_000, n - start), 45))]
            for j, row in enumerate(words):
                i = start + j
                kind = i % 20
                if kind == 0 and j:  # an exact copy of an earlier record
                    row = words[j - 1]
                elif kind == 1 and j > 1:  # an earlier record with its last word changed
                    row = words[j - 2].copy()
                    row[-1] = "changed"
                f.write(json.dumps({"instruction": " ".join(row[:15]), "input": "",
                                    "output": " ".join(row[15:])}))
                f.write("\n")


def _texts(path: str) -> list[str]:
    texts = []
    with open(path, "rb") as f:
        for line in f:
            record = json.loads(line)
            texts.append(f"{record['instruction']}\n{record['input']}\n{record['output']}")
    return texts


def child(kind: str, path: str) -> dict:
    """Runs in the child process: one measurement, printed as JSON."""
    import rensa

    if kind == "validate":
        import contextlib
        import io

        from finetune_trainer.data import validate_cli

        out = io.StringIO()
        wall, cpu = time.perf_counter(), time.process_time()
        with contextlib.redirect_stdout(out):
            code = validate_cli(["--format", "instruction", "--json", "--near-threshold",
                                 str(THRESHOLD), path])
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        report = json.loads(out.getvalue())
        return {"seconds": wall, "cpuSeconds": cpu, "exitCode": code,
                "duplicatesRemoved": report["duplicatesRemoved"],
                "nearDuplicatesRemoved": report["nearDuplicatesRemoved"],
                "trainExamples": report["trainExamples"], "evalExamples": report["evalExamples"]}
    texts = _texts(path)
    wall, cpu = time.perf_counter(), time.process_time()
    lsh = rensa.RMinHashLSH(THRESHOLD, NUM_PERM, BANDS)
    if kind == "anchor":
        minhashes = []
        for i, text in enumerate(texts):
            minhash = rensa.RMinHash(NUM_PERM, 42)
            minhash.update(text.split())
            lsh.insert(i, minhash)
            minhashes.append(minhash)
        flagged = sum(len(lsh.query(m)) > 1 for m in minhashes)
    else:
        flagged = 0
        for start in range(0, len(texts), 4096):
            matrix = rensa.RMinHash.digest_matrix_from_token_sets(
                [t.split() for t in texts[start:start + 4096]], NUM_PERM, 42)
            flagged += sum(lsh.insert_matrix_and_query_duplicate_flags(matrix, start))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {"seconds": wall, "cpuSeconds": cpu, "flagged": flagged}


def measure(kind: str, path: Path) -> dict:
    proc = subprocess.Popen([sys.executable, __file__, "--child", kind, str(path)],
                            stdout=subprocess.PIPE, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"{kind} child failed with exit code {proc.returncode}")
    result = json.loads(out.strip().splitlines()[-1])
    result["peakRssMiB"] = round(usage.ru_maxrss / 1024, 1)
    return result


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def run_one(n: int, workdir: Path, rounds: int = 1) -> dict:
    """`rounds` rounds of the three children, one after the other in each round (so each
    pair of validate-data and anchor ran at the same time of a shared machine); the figures
    are the medians over the rounds, the per-round ratios are kept."""
    path = workdir / f"data-{n}.jsonl"
    generate(path, n)
    os.sync()  # the file on disk before any timing: no write-back of it inside a measurement
    load_before = os.getloadavg()[0]
    runs: dict[str, list[dict]] = {"validate": [], "anchor": [], "bulk": []}
    for _ in range(rounds):
        for kind in runs:
            runs[kind].append(measure(kind, path))
    path.unlink()
    validate, anchor, bulk = ({key: _median([r[key] for r in runs[kind]]) for key in ("seconds", "cpuSeconds")}
                              for kind in ("validate", "anchor", "bulk"))
    last = runs["validate"][-1]
    if any(r[k] != last[k] for r in runs["validate"] for k in ("duplicatesRemoved", "nearDuplicatesRemoved",
                                                               "trainExamples", "evalExamples")):
        raise SystemExit("validate-data gave different reports in different rounds")
    seconds = validate["seconds"]
    return {
        "records": n,
        "rounds": rounds,
        "seconds": round(seconds, 3),
        "cpuSeconds": round(validate["cpuSeconds"], 3),
        "recordsPerSecond": round(n / seconds),
        "recordsPerCpuSecond": round(n / validate["cpuSeconds"]),
        "peakRssMiB": max(r["peakRssMiB"] for r in runs["validate"]),
        "anchorSeconds": round(anchor["seconds"], 3),
        "anchorCpuSeconds": round(anchor["cpuSeconds"], 3),
        "anchorRecordsPerSecond": round(n / anchor["seconds"]),
        "anchorPeakRssMiB": max(r["peakRssMiB"] for r in runs["anchor"]),
        "ratioToAnchor": round(seconds / anchor["seconds"], 2),
        "cpuRatioToAnchor": round(validate["cpuSeconds"] / anchor["cpuSeconds"], 2),
        "roundRatios": [round(v["seconds"] / a["seconds"], 2)
                        for v, a in zip(runs["validate"], runs["anchor"])],
        "roundCpuRatios": [round(v["cpuSeconds"] / a["cpuSeconds"], 2)
                           for v, a in zip(runs["validate"], runs["anchor"])],
        # Each round's pair ran back to back: the median of their ratios cancels load drift.
        "medianRoundRatio": round(_median([v["seconds"] / a["seconds"]
                                           for v, a in zip(runs["validate"], runs["anchor"])]), 2),
        "medianRoundCpuRatio": round(_median([v["cpuSeconds"] / a["cpuSeconds"]
                                              for v, a in zip(runs["validate"], runs["anchor"])]), 2),
        "rensaBulkSeconds": round(bulk["seconds"], 3),
        "rensaBulkCpuSeconds": round(bulk["cpuSeconds"], 3),
        "ratioToRensaBulk": round(seconds / bulk["seconds"], 2),
        "exitCode": last["exitCode"],
        "duplicatesRemoved": last["duplicatesRemoved"],
        "nearDuplicatesRemoved": last["nearDuplicatesRemoved"],
        "trainExamples": last["trainExamples"],
        "evalExamples": last["evalExamples"],
        "loadAverage1mBefore": round(load_before, 2),
        "loadAverage1mAfter": round(os.getloadavg()[0], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 200_000, 1_000_000])
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "data.json"))
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds of the three children per size up to 200,000 records (medians)")
    parser.add_argument("--rounds-large", type=int, default=1,
                        help="rounds per size over 200,000 records")
    parser.add_argument("--note", action="append", default=[],
                        help="a sentence for docs/benchmarks.md (what else ran, what was missed)")
    parser.add_argument("--child", nargs=2, metavar=("KIND", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            result = run_one(n, Path(tmp), args.rounds if n <= 200_000 else args.rounds_large)
            if results:
                previous = results[-1]
                result["timeGrowth"] = round(result["seconds"] / previous["seconds"], 2)
                result["cpuTimeGrowth"] = round(result["cpuSeconds"] / previous["cpuSeconds"], 2)
                result["anchorCpuTimeGrowth"] = round(result["anchorCpuSeconds"] / previous["anchorCpuSeconds"], 2)
                result["recordsGrowth"] = round(n / previous["records"], 2)
            print(f"{n:>9} records  {result['seconds']:8.2f} s ({result['cpuSeconds']:.2f} s CPU) "
                  f"{result['recordsPerSecond']:>8} records/s  {result['peakRssMiB']:>7} MiB  "
                  f"anchor {result['anchorSeconds']:.2f} s ({result['anchorCpuSeconds']:.2f} s CPU)  "
                  f"ratio {result['ratioToAnchor']} (CPU {result['cpuRatioToAnchor']}; rounds "
                  f"{result['roundRatios']} / {result['roundCpuRatios']})",
                  file=sys.stderr)
            results.append(result)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "benchmark": "validate-data, instruction format, exact + near dedup (threshold 0.9), "
                     "against rensa's MinHash LSH alone on the same records",
        "python": platform.python_version(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "results": results,
        "notes": args.note,
    }, indent=2) + "\n")


if __name__ == "__main__":
    main()
