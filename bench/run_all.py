"""`make bench`: run every benchmark, then write docs/benchmarks.md from bench/results/*.json.

    .venv/bin/python bench/run_all.py [--only scale trainer data resume serve] [--render-only] [--quick]

Each benchmark is its own script (and its own process, so one's memory and threads do not
colour another's numbers); each writes bench/results/<name>.json. The table in
docs/benchmarks.md is rendered from those files, with the machine it ran on.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
DOC = REPO / "docs" / "benchmarks.md"

BENCHES = {
    "scale": ["bench/bench_operator_scale.py"],
    "trainer": ["bench/bench_trainer.py"],
    "data": ["bench/bench_data.py"],
    "resume": ["bench/bench_resume.py"],
    "serve": ["bench/bench_time_to_serve.py"],
    "adapter": ["bench/bench_runtime_adapter.py"],
}
QUICK = {
    "scale": ["--sizes", "100"],
    "trainer": ["--steps", "10", "--rounds", "1"],
    "data": ["--sizes", "10000", "100000"],
    "resume": ["--save-steps", "5", "--kill-at", "8", "--max-steps", "12"],
    "serve": [],
    "adapter": ["--rounds", "1"],
}


def env() -> dict[str, str]:
    paths = [str(REPO / p) for p in ("api", "operator", "trainer_image", "hack", ".")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths + [os.environ.get("PYTHONPATH", "")])}


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem_kib = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemTotal"))
    versions = {}
    for mod in ("kopf", "kubernetes", "torch", "transformers", "trl", "peft"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - not installed or no version: leave it out
            pass
    kube = subprocess.run([sys.executable, "-c", "from finetune_devcluster.cluster import control_plane_binaries as b;"
                           "import subprocess;print(subprocess.run([str(b()/'kube-apiserver'),'--version'],"
                           "capture_output=True,text=True).stdout.strip())"],
                          capture_output=True, text=True, env=env(), cwd=REPO).stdout.strip()
    return {"nproc": os.cpu_count(), "memory_gib": round(mem_kib / 2**20, 1), "cpu": cpu,
            "python": platform.python_version(), "kube": kube or "unknown", "versions": versions,
            "loadAverage": [round(x, 1) for x in os.getloadavg()],
            "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def load(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def fmt(x, unit: str = "") -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        x = f"{x:.2f}" if abs(x) < 10 else f"{x:.1f}" if abs(x) < 100 else f"{x:,.0f}"
    return f"{x}{unit}"


def scale_section(data: dict) -> list[str]:
    out = ["## Operator at scale", "",
           f"N FineTuneJobs created at once (8 client threads) on 200 kwok nodes with 8 GPUs each; "
           f"commit `{data.get('commit')}`, run took {data.get('seconds')} s, load average at the end "
           f"{data.get('loadAverage1m')} on {data.get('cpus')} CPUs. Anchor: N bare Jobs of the same pod shape "
           "in the same control plane, the built-in Job controller. Latencies from watch events seen by the "
           "benchmark (p50 / p95 / p99, seconds).", "",
           "| run | N | created -> Job (FTJ) / Job -> pod (anchor) | all exist after | pod done -> Succeeded / Complete "
           "| operator CPU s | peak RSS MiB | API requests per object until done | per FTJ per minute after |",
           "| --- | ---: | --- | ---: | --- | ---: | ---: | ---: | ---: |"]
    for r in data["results"]:
        if "operator" in r:
            d, s = r["ftj_created_to_job_created_s"], r["pod_succeeded_to_ftj_succeeded_s"]
            out.append(f"| operator {r['operator']} | {r['n']} | {fmt(d['p50'])} / {fmt(d['p95'])} / {fmt(d['p99'])} "
                       f"| {fmt(r['all_jobs_exist_after_s'])} | {fmt(s['p50'])} / {fmt(s['p95'])} / {fmt(s['p99'])} "
                       f"| {fmt(r['operator_cpu_seconds'])} | {fmt(r['operator_peak_rss_mib'])} "
                       f"| {fmt(r['requests_per_ftj_until_succeeded'])} "
                       f"| {fmt(r['after_succeeded']['requests_per_ftj_per_minute'])} |"
                       + (f" error: {r['error']}" if r.get("error") else ""))
        else:
            d, s = r["job_created_to_pod_created_s"], r["pod_succeeded_to_job_complete_s"]
            out.append(f"| anchor: bare Jobs | {r['n']} | {fmt(d['p50'])} / {fmt(d['p95'])} / {fmt(d['p99'])} "
                       f"| {fmt(r['all_pods_exist_after_s'])} | {fmt(s['p50'])} / {fmt(s['p95'])} / {fmt(s['p99'])} "
                       f"| - | - | {fmt(r['job_controller_requests_per_job'])} (Job controller) | - |")
    out.append("")
    return out


def trainer_section(data: dict) -> list[str]:
    out = ["## Trainer throughput (tiny Llama, CPU)", "",
           f"{data['device']}; {data['versions']}; settings {data['settings']}. From `bench/bench_trainer.py`.", "",
           "| case | useful tokens/s | useful tokens per CPU-s | non-padding share | rounds (tokens/s) |",
           "| --- | ---: | ---: | ---: | --- |"]
    for r in data["results"]:
        out.append(f"| {r['case']} | {r['useful_tokens_per_second']:,.0f} | {r['useful_tokens_per_cpu_second']:,.0f} "
                   f"| {r['non_padding_share']:.0%} | {r.get('rounds_useful_tokens_per_second')} |")
    out += ["", f"Packing / dynamic padding: {data['packing_vs_padding']}x wall clock, "
                f"{data['packing_vs_padding_cpu_time']}x per CPU-second; `packing: auto` picks "
                f"{'packing' if data['auto']['packs'] else 'dynamic padding'} here, the faster is "
                f"{data['auto']['faster_strategy']}.",
            "No GPU machine was lent to this task, so there are no GPU figures. As context only (not "
            "comparable: a 128-wide, 2-layer model on 2 shared CPU cores): torchtune publishes 3,083 tokens/s "
            "for Llama 3.1 8B LoRA on one RTX 4090, and packing taking a 3B model on an A100 from 2,091 to "
            "7,075 tokens/s; on CPU without variable-length attention, packing is the slower here, as "
            "docs/reference.md also saw (dynamic padding 17.5k-19.9k vs packing 12.9k-13.0k tokens/s).", ""]
    return out


def data_section(data: dict) -> list[str]:
    rows = data["results"]
    out = ["## Data pipeline (`validate-data`, exact + near-duplicate removal)", "",
           f"{data['benchmark']}; {data.get('machine')}. From `bench/bench_data.py`. Each measurement "
           "is its own child process, timed inside itself; peak RSS is the child's (`os.wait4`). The "
           "anchor is rensa's MinHash LSH alone on the same records, record by record as its README "
           "shows (RMinHash(128) over the words, insert, query); \"rensa bulk\" is its batch API alone. "
           "CPU seconds are given too: on a shared machine they move less than wall time. With "
           "several rounds (the three children one after the other, round after round) the figures "
           "are medians and each round's ratio is listed.", "",
           "| records | rounds | seconds (CPU s) | records/s | peak RSS MiB | anchor s (CPU s) | ratio to anchor (CPU) "
           "| each round: ratio (CPU) | median of the rounds' ratios (CPU) | rensa bulk s "
           "| time growth vs previous size (CPU; anchor CPU) "
           "| exact / near duplicates removed | load 1m before/after |",
           "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        growth = (f"{r['timeGrowth']:.1f}x for {r['recordsGrowth']:.0f}x records"
                  if "timeGrowth" in r else "-")
        if "cpuTimeGrowth" in r:
            growth += f" ({r['cpuTimeGrowth']:.1f}x; {r['anchorCpuTimeGrowth']:.1f}x)"
        rounds = ", ".join(f"{w:.2f} ({c:.2f})" for w, c in zip(r.get("roundRatios", []),
                                                                 r.get("roundCpuRatios", []))) or "-"
        out.append(f"| {r['records']:,} | {r.get('rounds', 1)} | {r['seconds']:.1f} ({r['cpuSeconds']:.1f}) "
                   f"| {r['recordsPerSecond']:,} "
                   f"| {r['peakRssMiB']:,.0f} | {r['anchorSeconds']:.1f} ({r['anchorCpuSeconds']:.1f}) "
                   f"| {r['ratioToAnchor']:.2f} ({r['cpuRatioToAnchor']:.2f}) | {rounds} "
                   f"| {fmt(r.get('medianRoundRatio'))} ({fmt(r.get('medianRoundCpuRatio'))}) "
                   f"| {r['rensaBulkSeconds']:.1f} | {growth} "
                   f"| {r['duplicatesRemoved']:,} / {r['nearDuplicatesRemoved']:,} "
                   f"| {r['loadAverage1mBefore']} / {r['loadAverage1mAfter']} |")
    for note in data.get("notes", []):
        out += ["", note]
    return out + [""]


def resume_section(data: dict) -> list[str]:
    out = ["## Resume after SIGKILL of the trainer (tiny model, LoRA, CPU)", "",
           f"{data['benchmark']}; killed after {data['kill_at']} logged steps; load average at the end "
           f"{data.get('loadAverage1m')}. From `bench/bench_resume.py`.", "",
           "| saveSteps | resumed from step | steps lost | restart -> first new step (s) | fresh start -> first step (s) "
           "| s/step | seconds lost (restart + lost steps) |", "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in data["results"]:
        lost_s = (r["restart_to_first_new_step_s"] or 0) + r["steps_lost"] * r["seconds_per_step"]
        out.append(f"| {r['save_steps']} | {r['resumed_from_step']} | {r['steps_lost']} "
                   f"| {fmt(r['restart_to_first_new_step_s'])} | {fmt(r['fresh_start_to_first_step_s'])} "
                   f"| {fmt(r['seconds_per_step'])} | {fmt(lost_s)} |")
    out.append("")
    return out


def serve_section(data: dict) -> list[str]:
    base = data.get("baseline") or {}
    ref = base.get("ref") if base.get("ref") == base.get("commit") else f"{base.get('ref')}, {base.get('commit')}"
    runs = [(f"before ({ref})", base), ("after", data)] if base else [("", data)]
    out = ["## Time to serve (tiny model, vLLM CPU build, local node)", "",
           "From the FineTuneJob leaving training (phase Deploying) to its InferenceService being "
           "Ready with the adapter, against vLLM's own start-up measured in the same run by starting "
           "the serving pod's exact command alone (operator overhead = the difference). vLLM's "
           "start-up inside the flow (its container's start to its first /health 200) and what is "
           "left besides it are shown too, and how long the FineTuneJob then takes to be Succeeded. "
           "Times from watch events. From `bench/bench_time_to_serve.py`"
           + (" (`--baseline-ref`: both runs back to back, each with its own vLLM-alone run)." if len(runs) > 1
              else "."), "",
           "| run | training done -> Ready (s) | vLLM start-up alone (s) | operator overhead (s) | overhead share "
           "| vLLM start-up in the flow (s) | all but vLLM in the flow (s) | Ready -> job Succeeded (s) "
           "| load average (1 min) |",
           "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for label, d in runs:
        load_avg = d.get("loadAverage1mBeforeAfter")
        out.append(f"| {label} | {fmt(d['trainingDoneToReadySeconds'])} | {fmt(d['vllmStartupSeconds'])} "
                   f"| {fmt(d['operatorOverheadSeconds'])} "
                   f"| {fmt(100 * d['operatorOverheadSeconds'] / d['trainingDoneToReadySeconds'], '%')} "
                   f"| {fmt(d.get('vllmStartupInFlowSeconds'))} | {fmt(d.get('inFlowOverheadSeconds'))} "
                   f"| {fmt(d.get('readyToSucceededSeconds'))} "
                   f"| {' -> '.join(fmt(x) for x in load_avg) if load_avg else '-'} |")
    steps = [s for s in data.get("steps", {})]
    if steps:
        out += ["", "Where the time goes (s; `from -> to`, first seen by the benchmark's watches):", "",
                "| step | " + " | ".join(label or "s" for label, _ in runs) + " |",
                "| --- |" + " ---: |" * len(runs)]
        for step in steps:
            out.append(f"| {step} | " + " | ".join(fmt(d.get("steps", {}).get(step)) for _, d in runs) + " |")
    out.append("")
    return out


def adapter_section(data: dict) -> list[str]:
    return ["## A new adapter on a running server (tiny model, vLLM CPU build, local node)", "",
            "From a new adapter's FineTuneJob succeeding (added to the running InferenceService as the "
            "FineTuneJob handler does) to a completion with the adapter answering, against vLLM's "
            "start-up in the same run (the serving container's start to its first passing /health; "
            "whole seconds, the API's timestamps). The pod is neither replaced nor restarted. From "
            "`bench/bench_runtime_adapter.py`.", "",
            "| adapter -> answering (s), each round | worst | vLLM start-up (s) | worst / start-up | "
            "server created -> first adapter answering (s) |",
            "| --- | ---: | ---: | ---: | ---: |",
            f"| {', '.join(fmt(t) for t in data['adapterToAnswerSeconds'])} | {fmt(data['adapterToAnswerMax'])} "
            f"| {fmt(data['vllmStartupSeconds'])} | {fmt(data['ratioToVllmStartup'])} "
            f"| {fmt(data['serverStartSeconds'])} |", ""]


def dpo_gpu_section(data: dict) -> list[str]:
    """The one DPO check run on a lent H200 (bench/results/gpu_dpo_h200.json, written by hand from
    that run: no script re-runs it)."""
    names = {"qlora-dpo": "QLoRA (nf4) DPO", "lora-dpo": "LoRA DPO"}
    out = ["## DPO on a GPU (tiny Llama, one H200; `bench/results/gpu_dpo_h200.json`)", "",
           "A check, not a throughput figure: `finetune-trainer train` with `method.objective: dpo` on the",
           "tiny model and `examples/data/preference.jsonl`, 16 steps, bf16, eight held-out pairs on topics",
           "the training pairs never mention. Run once on the lent H200 (its own torch 2.11.0+cu130, not",
           "the pinned 2.13.0; trl, datasets, bitsandbytes 0.50.2 and rensa carried as wheels).", "",
           "| case | exit | wall (s, incl. start-up) | preference accuracy base -> tuned | rewards margin |",
           "| --- | --- | --- | --- | --- |"]
    for key, r in data.items():
        acc = r.get("preferenceAccuracy") or {}
        out.append(f"| {names.get(key, key)} | {r['rc']} | {fmt(r['seconds'])} "
                   f"| {acc.get('base', '-')} -> {acc.get('finetuned', '-')} "
                   f"| {fmt((r.get('objectiveMetrics') or {}).get('rewardsMargin'))} |")
    return out + [""]


GPU_NOT_MEASURED = [
    "## The trainer on one GPU (`make gpu-check`, `bench/results/gpu.json`)", "",
    "Not measured yet: no GPU has been lent since `bench/gpu_check.py` was written (issue 16).",
    "`make gpu-check` runs, on one GPU within 8 minutes: LoRA and QLoRA (nf4, double quantization,",
    "bf16 compute) on randomly initialised Llama 3.2 1B- and Llama 3.1 8B-shaped models, padded and",
    "packed; full fine-tuning of the 1B with FSDP2 and a resume from its sharded checkpoint; a merge;",
    "vLLM's CUDA build serving the adapter. It replaces this section with its table (tokens/s, MFU,",
    "peak memory per case). `make gpu-check-dry` runs the same code path on CPU with the tiny model",
    "(the test suite runs it: `tests/unit/trainer/test_gpu_check_dry.py`).", ""]


def gpu_section(data: dict) -> list[str]:
    """`make gpu-check`'s table (bench/gpu_check.py writes it too, when it runs)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from gpu_check import table

    return [table(data)]


def render(notes: str) -> str:
    m = machine()
    lines = ["# Benchmarks", "",
             "Written by `make bench` (`bench/run_all.py`) from `bench/results/*.json`; the text under "
             "\"Findings\" is kept across runs.", "",
             f"Machine: {m['nproc']} CPUs ({m['cpu']}), {m['memory_gib']} GiB memory, shared with other work "
             f"(load average {m['loadAverage']} when this page was written). Python {m['python']}, {m['kube']}, "
             f"{', '.join(f'{k} {v}' for k, v in m['versions'].items())}. Written {m['date']}.", ""]
    for name, section in (("operator_scale", scale_section), ("trainer", trainer_section), ("data", data_section),
                          ("resume", resume_section), ("time_to_serve", serve_section),
                          ("runtime_adapter", adapter_section), ("gpu_dpo_h200", dpo_gpu_section),
                          ("gpu", gpu_section)):
        data = load(name)
        if data:
            lines += section(data)
        elif name == "gpu":
            lines += GPU_NOT_MEASURED
    lines += ["## Findings", "", notes.strip() or "(none yet)", ""]
    return "\n".join(lines)


def kept_notes() -> str:
    if not DOC.exists():
        return ""
    text = DOC.read_text()
    return text.split("## Findings", 1)[1].strip() if "## Findings" in text else ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=list(BENCHES), default=list(BENCHES))
    parser.add_argument("--render-only", action="store_true", help="only rewrite docs/benchmarks.md")
    parser.add_argument("--quick", action="store_true", help="smaller sizes (a smoke run)")
    args = parser.parse_args(argv)
    failed = []
    if not args.render_only:
        for name in args.only:
            argv_ = [sys.executable, *BENCHES[name], *(QUICK[name] if args.quick else [])]
            print(f"== {name}: {' '.join(argv_[1:])}", file=sys.stderr, flush=True)
            if subprocess.run(argv_, cwd=REPO, env=env()).returncode != 0:
                failed.append(name)
    DOC.write_text(render(kept_notes()))
    print(f"wrote {DOC}" + (f"; failed: {', '.join(failed)}" if failed else ""), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
