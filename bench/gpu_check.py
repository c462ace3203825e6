"""`make gpu-check`: the trainer on one GPU, as a pod runs it, in one prepared script.

Cases (each a real `finetune_trainer` run in a subprocess, on randomly initialised
Llama-architecture models built here from a config: no model hub):

- LoRA and QLoRA (nf4, double quantization, bf16 compute) on a ~1B (Llama 3.2 1B shape) and
  a ~8B (Llama 3.1 8B shape) model, each with padded batches and with packing (packing uses
  a variable-length attention kernel when flash-attn is importable; recorded either way);
- full fine-tuning of the 1B with FSDP2 (`training.sharding: fsdp`, through the launcher),
  a sharded checkpoint, then a second run that resumes from it;
- a merge (`output.merge`) of the 1B LoRA adapter;
- vLLM's CUDA build serving the 1B with the adapter, when vLLM is importable.

Per case it records tokens/s (the trainer's count of non-padding tokens over its training
time), MFU (model FLOPs: 6 x parameters per token for full fine-tuning, 4 x for LoRA/QLoRA,
where frozen weights get no weight gradients; over the GPU's dense bf16 peak) and peak GPU
memory, into bench/results/gpu.json and a table in docs/benchmarks.md. It stops starting
cases once its time budget (default 8 minutes) is spent and records the rest as skipped.

`make gpu-check-dry` (`--dry`) runs the same code path on CPU with the repo's tiny model and
a few steps: LoRA padded and packed with a merge, FSDP over two gloo processes with a
checkpoint and a resume; QLoRA and vLLM are recorded as skipped (CUDA only). The test suite
runs its LoRA cases (tests/unit/trainer/test_gpu_check_dry.py; FSDP with a sharded
checkpoint and a resume is tests/unit/trainer/test_fsdp_sharding.py, which also SIGKILLs it).

    PYTHONPATH=api:trainer_image:hack:. .venv/bin/python bench/gpu_check.py [--dry] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
for sub in ("api", "trainer_image", "hack"):
    if str(REPO / sub) not in sys.path:
        sys.path.insert(0, str(REPO / sub))

# Dense bf16 peak FLOP/s by device name (vendor data sheets, without sparsity).
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12}

SHAPES = {
    # Llama 3.2 1B and Llama 3.1 8B, vocabulary cut to a size the tiny tokenizer's ids fit
    # (the embedding's share of FLOPs is small; parameters are counted as built).
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, head_dim=64, vocab_size=32768, max_position_embeddings=4096,
               rope_theta=500000.0, tie_word_embeddings=True),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, head_dim=128, vocab_size=32768, max_position_embeddings=4096,
               rope_theta=500000.0, tie_word_embeddings=False),
}

WORDS = ("the model learns to answer questions from examples and the operator schedules jobs on "
         "nodes while checkpoints store weights optimizer state red green blue cat dog sun moon").split()


def records(n: int, max_words: int, seed: int = 0) -> list[dict[str, str]]:
    """Instruction records with a long-tailed length spread (what makes packing pay)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        words = max(4, min(int(rng.lognormvariate(3.6, 0.8)), max_words))
        out.append({"instruction": f"Say something about item {i}.",
                    "output": " ".join(rng.choice(WORDS) for _ in range(words)) + "."})
    return out


def build_model(shape: str, folder: Path, tokenizer_dir: Path, device: str) -> Path:
    """A randomly initialised Llama of the given shape, saved in bf16 with the tiny tokenizer."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    if (folder / "config.json").is_file():
        return folder
    config = LlamaConfig(**SHAPES[shape], bos_token_id=1, eos_token_id=2, pad_token_id=0,
                         dtype="bfloat16")
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    for name in os.listdir(tokenizer_dir):
        if "token" in name or name.endswith(".jinja"):
            shutil.copy(tokenizer_dir / name, folder / name)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()  # the trainer runs in other processes: leave them the memory
    return folder


def trainer_config(root: Path, model: Path, *, method: str, packing: bool, steps: int, batch: int,
                   seq: int, sharding: str = "none", save_steps: int = 1000, merge: bool = False,
                   dry: bool) -> dict[str, Any]:
    lora = {"r": 16, "alpha": 32, "dropout": 0.0, "targetModules": ["all-linear"]}
    cfg: dict[str, Any] = {
        "apiVersion": "finetune.dev/v1alpha1", "kind": "TrainerConfig",
        "model": {"source": str(model)},
        "method": {"type": method, **({"lora": lora} if method != "full" else {}),
                   **({"quantization": {"quantType": "nf4", "doubleQuant": True, "computeDtype": "bf16"}}
                      if method == "qlora" else {})},
        "dataset": {"source": "volume://data/train.jsonl", "format": "instruction", "evalFraction": 0,
                    "minExamples": 4, "dedup": {"exact": False, "nearThreshold": 0}},
        "training": {"maxSteps": steps, "perDeviceBatchSize": batch, "learningRate": 1e-4,
                     "lrScheduler": "constant", "maxSeqLength": seq, "precision": "fp32" if dry else "bf16",
                     "packing": "on" if packing else "off", "loggingSteps": 1, "saveSteps": save_steps,
                     "gradientCheckpointing": not dry, "sharding": sharding, "seed": 0},
        "evaluation": {"maxNewTokens": 8},
        "output": {"merge": merge},
        "paths": {"root": str(root)},
        "reporting": {"statusPatch": False, "metricsPort": None},
    }
    return cfg


def run_trainer(config: dict, root: Path, *, processes: int, timeout: float) -> tuple[int, str, float]:
    """One trainer run as a pod runs it: `train`, or the launcher for FSDP or several processes."""
    root.mkdir(parents=True, exist_ok=True)
    path = root / "config.json"
    path.write_text(json.dumps(config))
    if processes > 1 or config["training"]["sharding"] == "fsdp":
        command = [sys.executable, "-m", "finetune_trainer", "launch", "--config", str(path),
                   "--nproc-per-node", str(processes)]
    else:
        command = [sys.executable, "-m", "finetune_trainer", "train", "--config", str(path)]
    env = dict(os.environ, FINETUNE_TERMINATION_LOG=str(root / "termination-log"), HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join([str(REPO / s) for s in ("api", "trainer_image", "hack")]
                                          + [os.environ.get("PYTHONPATH", "")]))
    started = time.monotonic()
    try:
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
        code, log = result.returncode, result.stderr
    except subprocess.TimeoutExpired as exc:
        code, log = -1, f"timed out after {timeout:.0f} s: {exc.stderr or ''}"
    return code, log, time.monotonic() - started


def parameters(model: Path) -> int:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        return sum(p.numel() for p in AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model)).parameters())


def peak_flops() -> tuple[float | None, str]:
    import torch

    if not torch.cuda.is_available():
        return None, "cpu"
    name = torch.cuda.get_device_name(0)
    return next((v for k, v in PEAK_BF16.items() if k in name), None), name


def measure(case: str, root: Path, code: int, log: str, seconds: float, n_params: int, method: str,
            peak: float | None, world: int = 1, tokens_before: int = 0) -> dict[str, Any]:
    """A case's figures from the trainer's summary; a resumed run counts only its own tokens."""
    entry: dict[str, Any] = {"rc": code, "seconds": round(seconds, 1)}
    summary_path = root / "reports" / "summary.json"
    if code != 0 or not summary_path.is_file():
        entry["error"] = log[-1500:]
        return entry
    summary = json.loads(summary_path.read_text())
    tokens, train_seconds = summary.get("tokensSeen") or 0, summary.get("trainSeconds") or 0
    tokens_per_second = (tokens - tokens_before) / train_seconds if train_seconds else None
    flops_per_token = (6 if method == "full" else 4) * n_params
    entry.update({
        "step": summary.get("step"), "resumedFrom": summary.get("resumedFrom"),
        "packing": summary.get("packing"), "precision": summary.get("precision"),
        "tokens": tokens, "trainSeconds": train_seconds,
        "tokensPerSecond": round(tokens_per_second, 1) if tokens_per_second else None,
        "peakMemoryBytes": summary.get("peakMemoryBytes"),
        "mfu": round(tokens_per_second * flops_per_token / (peak * world), 4)
        if tokens_per_second and peak else None,
        "trainLoss": summary.get("trainLoss"),
        "artifacts": sorted((summary.get("artifacts") or {}).keys()),
    })
    return entry


def serve_with_vllm(model: Path, adapter: Path, timeout: float) -> dict[str, Any]:
    """vLLM's CUDA build serving the base model and the adapter: one completion through each."""
    import importlib.util
    import socket
    import urllib.request

    if importlib.util.find_spec("vllm") is None:
        return {"skipped": "vLLM is not installed"}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
               "--port", str(port), "--host", "127.0.0.1", "--enable-lora", "--max-lora-rank", "16",
               "--lora-modules", f"tuned={adapter}", "--max-model-len", "1024", "--gpu-memory-utilization", "0.5"]
    started = time.monotonic()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        while time.monotonic() - started < timeout:
            if proc.poll() is not None:
                return {"rc": proc.returncode, "error": proc.stdout.read()[-1500:]}
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                time.sleep(1)
        else:
            return {"error": f"not ready in {timeout:.0f} s"}
        ready = time.monotonic() - started
        answers = {}
        for name in (str(model), "tuned"):
            body = json.dumps({"model": name, "prompt": "Say something", "max_tokens": 8}).encode()
            request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body,
                                             {"Content-Type": "application/json"})
            answers[name] = json.loads(urllib.request.urlopen(request, timeout=60).read())["usage"]
        return {"rc": 0, "readySeconds": round(ready, 1), "served": sorted(answers)}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def plan(dry: bool) -> list[dict[str, Any]]:
    """The cases, in order. `after` names a case whose volume a case continues (resume)."""
    if dry:
        common = dict(steps=2, batch=2, seq=128)
        return [
            dict(name="lora-tiny-padded", model="tiny", method="lora", packing=False, merge=True, **common),
            dict(name="lora-tiny-packed", model="tiny", method="lora", packing=True, **common),
            dict(name="qlora-tiny-padded", model="tiny", method="qlora", skip="QLoRA needs CUDA"),
            dict(name="full-tiny-fsdp", model="tiny", method="full", packing=False, sharding="fsdp",
                 processes=2, save_steps=2, steps=2, batch=2, seq=128),
            dict(name="full-tiny-fsdp-resumed", model="tiny", method="full", packing=False, sharding="fsdp",
                 processes=2, save_steps=2, steps=3, batch=2, seq=128, after="full-tiny-fsdp"),
            dict(name="vllm-serve", serve="lora-tiny-padded", skip="vLLM's CUDA build: GPU only"),
        ]
    import torch

    gpus = max(torch.cuda.device_count(), 1)

    def adapters(size: str) -> list[dict[str, Any]]:
        return [dict(name=f"{method}-{size}-{'packed' if packing else 'padded'}", model=size, method=method,
                     packing=packing, steps=10, batch=4, seq=2048,
                     merge=(size, method, packing) == ("1b", "lora", False))
                for method in ("lora", "qlora") for packing in (False, True)]

    # The 1B cases first (each part of the check once), the 8B ones last: the time budget
    # skips from the end.
    return [
        *adapters("1b"),
        dict(name="full-1b-fsdp", model="1b", method="full", packing=False, sharding="fsdp", processes=gpus,
             save_steps=6, steps=6, batch=4, seq=2048),
        dict(name="full-1b-fsdp-resumed", model="1b", method="full", packing=False, sharding="fsdp",
             processes=gpus, save_steps=6, steps=10, batch=4, seq=2048, after="full-1b-fsdp"),
        dict(name="vllm-serve", serve="lora-1b-padded"),
        *adapters("8b"),
    ]


def run(dry: bool, out: Path, work: Path, budget: float, docs: Path | None,
        only: set[str] | None = None) -> dict[str, Any]:
    import torch

    from finetune_devcluster.tiny_model import build_tiny_model, default_cache_dir

    started = time.monotonic()
    tiny = build_tiny_model(default_cache_dir())
    device = "cuda" if torch.cuda.is_available() else "cpu"
    peak, device_name = peak_flops()
    results: dict[str, Any] = {"device": device_name, "dry": dry, "peakBf16Flops": peak,
                               "mfuFormula": "tokens/s x (6 full | 4 lora, qlora) x parameters / peak",
                               "cases": {}}
    import importlib.util

    from finetune_trainer.model import varlen_attention

    # What packing runs on: flash-attn's kernel (the trainer loads the model with it), or
    # padding-free rows over SDPA when it is absent. The `kernels` package is recorded too.
    results["varlenKernel"] = varlen_attention()
    results["kernelsPackage"] = importlib.util.find_spec("kernels") is not None
    models: dict[str, Path] = {"tiny": tiny}
    volumes: dict[str, Path] = {}
    for case in plan(dry):
        name = case["name"]
        if case.get("skip") or (only is not None and name not in only):
            results["cases"][name] = {"skipped": case.get("skip") or "not selected (--only)"}
            continue
        elapsed = time.monotonic() - started
        if elapsed > budget:
            results["cases"][name] = {"skipped": f"time budget ({budget:.0f} s) spent"}
            continue
        if case.get("serve"):
            served = volumes.get(case["serve"])
            adapter = served / "artifacts" / "adapter" if served else None
            results["cases"][name] = serve_with_vllm(models["1b"], adapter, budget - elapsed) \
                if adapter and adapter.is_dir() else {"skipped": "no adapter to serve"}
            continue
        if case["model"] not in models:
            models[case["model"]] = build_model(case["model"], work / f"model-{case['model']}", tiny, device)
        model = models[case["model"]]
        root = volumes[case["after"]] if case.get("after") else work / name
        volumes[name] = root
        if not case.get("after"):
            (root / "data").mkdir(parents=True, exist_ok=True)
            lines = records(256 if dry else 4096, max_words=case["seq"] // 2)
            (root / "data" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
        config = trainer_config(root, model, method=case["method"], packing=case["packing"], steps=case["steps"],
                                batch=case["batch"], seq=case["seq"], sharding=case.get("sharding", "none"),
                                save_steps=case.get("save_steps", 1000), merge=case.get("merge", False), dry=dry)
        processes = case.get("processes", 1)
        code, log, seconds = run_trainer(config, root, processes=processes, timeout=max(budget - elapsed, 60))
        before = results["cases"].get(case.get("after"), {}).get("tokens", 0) if case.get("after") else 0
        results["cases"][name] = measure(name, root, code, log, seconds, parameters(model), case["method"],
                                         peak, world=processes, tokens_before=before)
        print(f"{name}: {json.dumps(results['cases'][name])[:300]}", flush=True)
    results["seconds"] = round(time.monotonic() - started, 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    if docs is not None:
        write_table(results, docs)
    return results


TABLE_HEADING = "## The trainer on one GPU (`make gpu-check`, `bench/results/gpu.json`)"


def table(results: dict[str, Any]) -> str:
    lines = [TABLE_HEADING, "",
             f"Device: {results['device']}; variable-length kernel: {results['varlenKernel'] or 'absent'}; "
             f"{results['seconds']} s in all. MFU = {results['mfuFormula']}.", "",
             "| case | tokens/s | MFU | peak memory (GiB) | step | note |", "| --- | --- | --- | --- | --- | --- |"]
    for name, c in results["cases"].items():
        peak = c.get("peakMemoryBytes")
        note = c.get("skipped") or (f"resumed from {c['resumedFrom']}" if c.get("resumedFrom") else "") \
            or ("failed: see gpu.json" if c.get("rc") not in (None, 0) else "")
        lines.append(f"| {name} | {c.get('tokensPerSecond') or '-'} | {c.get('mfu') or '-'} | "
                     f"{round(peak / 2**30, 2) if peak else '-'} | {c.get('step', '-')} | {note} |")
    return "\n".join(lines) + "\n"


def write_table(results: dict[str, Any], docs: Path) -> None:
    """Replace (or append) this section of docs/benchmarks.md."""
    text = docs.read_text() if docs.is_file() else ""
    section = table(results)
    if TABLE_HEADING in text:
        head, rest = text.split(TABLE_HEADING, 1)
        following = rest.find("\n## ")
        tail = rest[following + 1:] if following >= 0 else ""
        text = head + section + ("\n" + tail if tail else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    docs.write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry", action="store_true", help="CPU, the tiny model, a few steps")
    parser.add_argument("--out", type=Path, default=None,
                        help="results file (default bench/results/gpu.json, or gpu-dry.json with --dry)")
    parser.add_argument("--docs", type=Path, default=None,
                        help="markdown file whose section gets the table (default docs/benchmarks.md; "
                        "none with --dry)")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--budget-seconds", type=float, default=480.0)
    parser.add_argument("--only", default=None, help="comma-separated case names to run (default: all)")
    args = parser.parse_args(argv)
    out = args.out or REPO / "bench" / "results" / ("gpu-dry.json" if args.dry else "gpu.json")
    docs = args.docs if args.docs or args.dry else REPO / "docs" / "benchmarks.md"
    only = set(args.only.split(",")) if args.only else None
    if args.work:
        results = run(args.dry, out, args.work, args.budget_seconds, docs, only)
    else:
        with tempfile.TemporaryDirectory(prefix="gpu-check-") as work:
            results = run(args.dry, out, Path(work), args.budget_seconds, docs, only)
    failed = [n for n, c in results["cases"].items() if c.get("rc") not in (None, 0)]
    print(table(results))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
