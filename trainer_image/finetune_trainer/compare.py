"""`finetune-trainer compare`: the base model and the result, side by side through one vLLM
server (the guide's comparison table: quality, latency, cost per 1K tokens).

The comparison Job (built by the operator after the trainer Job completed) runs this with the
trainer's config. It starts vLLM's OpenAI server as a subprocess (a list, never a shell)
serving the base model and, for an adapter, the adapter as a LoRA module, so both answer
from the same server in the same run; a merged or fully trained model gets a second server
after the first stopped. Every evaluation prompt and a sample of the eval split are asked of
both models, alternating which goes first. It writes `artifacts/comparison.json` next to the
model card (every answer, for the review page) and patches `status.comparison` (the table).

When vLLM cannot serve (not installed, the model does not load, no port within the start-up
budget) the result is `state: Unavailable` with the reason: the training is not failed for it.
A rerun on the same artifacts reports the comparison already written instead of measuring
again.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import math
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from .config import TrainerConfig

log = logging.getLogger(__name__)

BASE, FINETUNED = "base", "fine-tuned"
REPORT_NAME = "comparison.json"
STARTUP_TIMEOUT = float(os.environ.get("FINETUNE_COMPARE_STARTUP_TIMEOUT", "900"))
REQUEST_TIMEOUT = 600.0
# vLLM accepts these --max-lora-rank values only.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


class ServerUnavailable(RuntimeError):
    """vLLM could not serve the models; the message says why."""


# --- pure parts: what is asked, how answers are scored, the table ----------------------------


@dataclass
class Item:
    """One request: a prompt (or chat messages) and its reference answer."""

    kind: str  # "prompt" (spec.evaluation.prompts) or "sample" (the eval split)
    prompt: str | None = None
    messages: list[dict] | None = None
    reference: str | None = None
    # The prompt as shown to a person (the raw prompt, or the last user message).
    shown: str = ""


@dataclass
class Answer:
    text: str
    latency_s: float
    output_tokens: int


@dataclass
class ModelRun:
    answers: list[Answer] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0-100) with linear interpolation between ranks; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    low, high = math.floor(pos), math.ceil(pos)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def pattern_matches(answer: str, reference: str) -> bool:
    """A reference written `/regex/` is searched as a regular expression; any other reference
    counts when the answer contains it (case and surrounding spaces ignored)."""
    if len(reference) >= 2 and reference.startswith("/") and reference.endswith("/"):
        try:
            return re.search(reference[1:-1], answer) is not None
        except re.error:
            return False
    return reference.strip().lower() in answer.lower()


def quality(answers: list[str], references: list[str | None], metrics: list[str]) -> dict[str, float]:
    """exactMatch/bleu/rougeL (those asked for in spec.evaluation.metrics) and patternMatch,
    over the answers that have a reference."""
    from .evaluate import score

    pairs = [(a, r) for a, r in zip(answers, references) if r is not None]
    if not pairs:
        return {}
    preds, refs = [a for a, _ in pairs], [r for _, r in pairs]
    # A /regex/ reference is not text to compare word by word.
    textual = [(p, r) for p, r in pairs if not (r.startswith("/") and r.endswith("/") and len(r) >= 2)]
    out: dict[str, float] = {}
    if textual:
        scores = score([p for p, _ in textual], [r for _, r in textual], list(metrics))
        for key in ("exactMatch", "bleu", "rougeL"):
            if key in scores:
                out[key] = scores[key]
    out["patternMatch"] = round(sum(pattern_matches(p, r) for p, r in zip(preds, refs)) / len(preds), 4)
    return out


def speed(answers: list[Answer], *, gpu_hour_price: float, gpus: int) -> dict[str, Any]:
    """Latency p50/p95 (ms), output tokens per second of request time, cost per 1K output
    tokens at the GPU-hour price (priced as one GPU when the server ran on CPUs)."""
    if not answers:
        return {}
    latencies = [a.latency_s for a in answers]
    busy = sum(latencies)
    tokens = sum(a.output_tokens for a in answers)
    out: dict[str, Any] = {"latencyP50Ms": round(percentile(latencies, 50) * 1000, 1),
                           "latencyP95Ms": round(percentile(latencies, 95) * 1000, 1)}
    if busy > 0:
        tps = tokens / busy
        out["outputTokensPerSecond"] = round(tps, 2)
        if gpu_hour_price > 0 and tps > 0:
            cost = gpu_hour_price * max(gpus, 1) / 3600.0 / tps * 1000.0
            out["costPer1kOutputTokens"] = f"{cost:.6f}"
    return out


def table_rows(items: list[Item], runs: dict[str, ModelRun], served: dict[str, str], *,
               metrics: list[str], gpu_hour_price: float, gpus: int) -> list[dict[str, Any]]:
    """status.comparison.rows: base first, then fine-tuned."""
    rows = []
    references = [i.reference for i in items]
    for model in (BASE, FINETUNED):
        run = runs[model]
        row: dict[str, Any] = {"model": model, "servedAs": served[model]}
        row.update(quality([a.text for a in run.answers], references, metrics))
        if run.losses:
            row["evalLoss"] = round(sum(run.losses) / len(run.losses), 4)
        row.update(speed(run.answers, gpu_hour_price=gpu_hour_price, gpus=gpus))
        rows.append(row)
    return rows


def render_table(rows: list[dict[str, Any]]) -> str:
    """The table as text (the demo and logs print it)."""
    columns = [("model", "model"), ("exactMatch", "exact match"), ("patternMatch", "pattern match"),
               ("bleu", "BLEU"), ("rougeL", "ROUGE-L"), ("evalLoss", "eval loss"),
               ("latencyP50Ms", "p50 ms"), ("latencyP95Ms", "p95 ms"),
               ("outputTokensPerSecond", "tokens/s"), ("costPer1kOutputTokens", "cost/1K tok")]
    from finetune_api.review import format_value

    shown = [(k, title) for k, title in columns if any(k in r for r in rows)]
    cells = [[title for _, title in shown]] + [[format_value(r.get(k)) for k, _ in shown] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(shown))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells)


def items_for(cfg: TrainerConfig, eval_records: list[dict], *, sample_size: int, seed: int) -> list[Item]:
    """The prompts (spec.evaluation.prompts and promptsSource) and a seeded sample of the
    prepared eval split."""
    from finetune_api.prompts import CHAT_TEMPLATE, text_prompt

    from .evaluate import load_prompts, trained_prompt_format

    fmt = trained_prompt_format(cfg)
    items = []
    for p in load_prompts(cfg):
        if fmt == CHAT_TEMPLATE:  # asked through /v1/chat/completions: vLLM renders the template
            items.append(Item("prompt", messages=[{"role": "user", "content": p["prompt"]}],
                              reference=p.get("reference"), shown=p["prompt"]))
        else:
            items.append(Item("prompt", prompt=text_prompt(fmt, p["prompt"]),
                              reference=p.get("reference"), shown=p["prompt"]))
    records = list(eval_records)
    random.Random(seed).shuffle(records)
    for record in records[:sample_size]:
        item = _record_item(record)
        if item is not None:
            items.append(item)
    return items


def _record_item(record: dict) -> Item | None:
    if isinstance(record.get("messages"), list) and record["messages"]:
        messages = record["messages"]
        if messages[-1].get("role") != "assistant" or len(messages) < 2:
            return None
        shown = next((m.get("content", "") for m in reversed(messages[:-1]) if m.get("role") == "user"), "")
        return Item("sample", messages=messages[:-1], reference=str(messages[-1].get("content", "")),
                    shown=str(shown))
    prompt = record.get("prompt")
    answer = record.get("completion", record.get("chosen"))
    if isinstance(prompt, list) and isinstance(answer, list) and answer:
        return Item("sample", messages=prompt, reference=str(answer[-1].get("content", "")),
                    shown=str(prompt[-1].get("content", "")) if prompt else "")
    if isinstance(prompt, str) and isinstance(answer, str):
        return Item("sample", prompt=prompt, reference=answer, shown=prompt)
    return None  # plain text has no answer to compare


# --- the server ---------------------------------------------------------------------------------


def lora_rank_limit(rank: int) -> int:
    """The smallest --max-lora-rank vLLM accepts that fits `rank`."""
    return next((r for r in VLLM_LORA_RANKS if r >= rank), VLLM_LORA_RANKS[-1])


def server_command(model: str, served_name: str, port: int, *, adapter: str | None = None,
                   adapter_name: str = FINETUNED, lora_rank: int = 16,
                   max_model_len: int | None = None, chat_template: Path | None = None) -> list[str]:
    """vLLM's OpenAI server, as a list. `python -m vllm.entrypoints.openai.api_server`: the
    `vllm` console script fails in the CPU build. `chat_template`: the one training rendered
    with, when the job chose one (dataset.chatTemplate); both models are asked with it."""
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
           "--served-model-name", served_name, "--host", "127.0.0.1", "--port", str(port),
           "--seed", "0"]
    if adapter:
        cmd += ["--enable-lora", "--lora-modules", f"{adapter_name}={adapter}",
                "--max-lora-rank", str(lora_rank_limit(lora_rank)), "--max-loras", "1"]
    if max_model_len:
        cmd += ["--max-model-len", str(max_model_len)]
    if chat_template is not None:
        cmd += ["--chat-template", str(chat_template)]
    return cmd


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http(url: str, body: dict | None = None, timeout: float = REQUEST_TIMEOUT) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read() or b"{}")


@contextlib.contextmanager
def serving(argv: list[str], port: int, *, cpu: bool = False,
            startup_timeout: float = STARTUP_TIMEOUT) -> Iterator[str]:
    """Run vLLM until the block ends; yield its base URL once /health answers."""
    if importlib.util.find_spec("vllm") is None:
        raise ServerUnavailable("vLLM is not installed where the comparison runs (its image needs "
                                "the vllm package)")
    logfile = tempfile.NamedTemporaryFile(prefix="vllm-", suffix=".log", delete=False)
    env = {"VLLM_NO_USAGE_STATS": "1", **os.environ}
    if cpu:
        # The CPU build reserves VLLM_CPU_KVCACHE_SPACE GiB for the KV cache (else a share of
        # the machine's memory): 1 GiB is plenty for a comparison's sequential requests.
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    proc = subprocess.Popen(argv, stdout=logfile, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            if proc.poll() is not None:
                raise ServerUnavailable(f"vLLM exited with code {proc.returncode} before serving: "
                                        f"{_tail(logfile.name)}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5) as resp:
                    if resp.status == 200:
                        break
            except (OSError, urllib.error.URLError):
                pass
            if time.monotonic() > deadline:
                raise ServerUnavailable(f"vLLM did not serve within {startup_timeout:.0f} s: "
                                        f"{_tail(logfile.name)}")
            time.sleep(1)
        yield url
    finally:
        # vLLM starts engine processes of its own: stop the whole process group.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        logfile.close()
        with contextlib.suppress(OSError):
            os.unlink(logfile.name)


def _tail(path: str, lines: int = 3) -> str:
    """The first error vLLM logged (its root cause comes before the tracebacks that follow
    it), else its last lines."""
    try:
        text = Path(path).read_text(errors="replace").strip().splitlines()
    except OSError:
        return "no log"
    errors = [line for line in text if re.search(r"\b[A-Z]\w*(Error|Exception): ", line)]
    if errors:
        return re.sub(r"^.*?\] ", "", errors[0])[-1500:]
    return " | ".join(text[-lines:])[-1500:] or "no output"


def ask(url: str, model: str, item: Item, max_tokens: int) -> Answer:
    """One greedy request; its wall time and the output tokens vLLM counted."""
    if item.messages is not None:
        body = {"model": model, "messages": item.messages, "max_tokens": max_tokens, "temperature": 0}
        endpoint = "/v1/chat/completions"
    else:
        body = {"model": model, "prompt": item.prompt, "max_tokens": max_tokens, "temperature": 0}
        endpoint = "/v1/completions"
    started = time.perf_counter()
    out = _http(url + endpoint, body)
    elapsed = time.perf_counter() - started
    choice = out["choices"][0]
    text = choice["message"]["content"] if item.messages is not None else choice["text"]
    return Answer((text or "").strip(), elapsed, int((out.get("usage") or {}).get("completion_tokens") or 0))


def _chat_answer_ids(url: str, model: str, messages: list[dict], answer: str) -> tuple[int, list[int]]:
    """(prompt length, token ids of the conversation with the answer) as the served chat
    template renders them, the answer ending with its end-of-turn token: what training put
    the loss on (the template's whitespace after it, ChatML's newline, left out)."""
    n_prompt = _http(url + "/tokenize", {"model": model, "messages": messages,
                                         "add_generation_prompt": True})["count"]
    ids = list(_http(url + "/tokenize", {"model": model, "add_generation_prompt": False,
                                         "messages": messages + [{"role": "assistant", "content": answer}]})["tokens"])
    while len(ids) > n_prompt + 1:
        text = _http(url + "/detokenize", {"model": model, "tokens": ids[-1:]}).get("prompt", "")
        if text.strip():
            break
        ids.pop()
    return n_prompt, ids


def answer_loss(url: str, model: str, prompt: str | list[dict], answer: str) -> float | None:
    """Mean negative log-probability of the answer's tokens given the prompt (a text, or chat
    messages rendered by the served chat template), from vLLM's prompt log-probabilities (the
    boundary token is as the joint tokenisation has it)."""
    try:
        if isinstance(prompt, list):
            n_prompt, ids = _chat_answer_ids(url, model, prompt, answer)
            scored: str | list[int] = ids
        else:
            n_prompt = _http(url + "/tokenize", {"model": model, "prompt": prompt})["count"]
            ids = _http(url + "/tokenize", {"model": model, "prompt": prompt + answer})["tokens"]
            scored = prompt + answer
        out = _http(url + "/v1/completions", {"model": model, "prompt": scored,
                                              "max_tokens": 1, "temperature": 0, "prompt_logprobs": 0})
    except (OSError, KeyError, ValueError, urllib.error.URLError) as exc:
        log.warning("no eval loss from vLLM: %s", exc)
        return None
    logprobs = out["choices"][0].get("prompt_logprobs") or []
    nll = []
    for position in range(max(n_prompt, 1), min(len(ids), len(logprobs))):
        entry = logprobs[position] or {}
        hit = entry.get(str(ids[position])) or entry.get(ids[position])
        if hit is not None:
            nll.append(-float(hit["logprob"] if isinstance(hit, dict) else hit))
    return sum(nll) / len(nll) if nll else None


# --- the run --------------------------------------------------------------------------------------


def _fingerprint(path: Path) -> list[list]:
    """Names, sizes and modification times of the artifact's files: a new result changes it."""
    return sorted([str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns]
                  for p in path.rglob("*") if p.is_file())


def _max_model_len(cfg: TrainerConfig, base: str) -> int | None:
    wanted = cfg.training.max_seq_length + cfg.evaluation.max_new_tokens
    try:
        config = json.loads((Path(base) / "config.json").read_text())
    except (OSError, ValueError):
        return wanted
    limit = config.get("max_position_embeddings")
    return min(wanted, int(limit)) if limit else wanted


def measure(cfg: TrainerConfig, items: list[Item], *, base: str, adapter: Path | None,
            merged: Path | None, cpu: bool) -> tuple[dict[str, ModelRun], dict[str, str]]:
    """Ask every item of both models; alternate which model goes first."""
    n = cfg.evaluation.max_new_tokens
    runs = {BASE: ModelRun(), FINETUNED: ModelRun()}
    max_len = _max_model_len(cfg, base)
    from .chat_templates import served_template

    template = served_template(cfg)

    def ask_all(url: str, order: list[tuple[str, str]]) -> None:
        for model, served in order:  # warm-up: the first request pays for compilation
            ask(url, served, items[0], 4)
        for i, item in enumerate(items):
            for model, served in (order if i % 2 == 0 else order[::-1]):
                runs[model].answers.append(ask(url, served, item, n))
                if item.kind == "sample" and item.reference:  # the eval split, as trained
                    loss = answer_loss(url, served, item.prompt if item.prompt is not None else item.messages,
                                       item.reference)
                    if loss is not None:
                        runs[model].losses.append(loss)

    if adapter is not None:
        port = _free_port()
        lora_rank = cfg.method.lora.r if cfg.method.lora else 16
        argv = server_command(base, BASE, port, adapter=str(adapter), lora_rank=lora_rank,
                              max_model_len=max_len, chat_template=template)
        with serving(argv, port, cpu=cpu) as url:
            ask_all(url, [(BASE, BASE), (FINETUNED, FINETUNED)])
    else:
        for model, path in ((BASE, base), (FINETUNED, str(merged))):
            port = _free_port()
            with serving(server_command(path, model, port, max_model_len=max_len, chat_template=template),
                         port, cpu=cpu) as url:
                ask_all(url, [(model, model)])
    return runs, {BASE: BASE, FINETUNED: FINETUNED}


def run(cfg: TrainerConfig, *, gpu_hour_price: float = 0.0, gpus: int = 0) -> dict[str, Any]:
    """Measure (or re-report) the comparison; write comparison.json; patch status.comparison."""
    from .prepared import cached_eval_records

    artifacts = cfg.paths.artifacts
    adapter = artifacts / "adapter"
    merged = artifacts / "merged"
    adapter = adapter if (adapter / "adapter_config.json").is_file() else None
    merged = merged if adapter is None and (merged / "config.json").is_file() else None
    report_path = artifacts / REPORT_NAME
    fingerprint = _fingerprint(adapter or merged) if (adapter or merged) else []
    previous = _read(report_path)
    if previous and previous.get("fingerprint") == fingerprint and previous.get("state") == "Measured":
        log.info("the comparison of these artifacts is already in %s", report_path)
        report = previous
    else:
        report = _measure_report(cfg, adapter, merged, gpu_hour_price=gpu_hour_price, gpus=gpus,
                                 eval_records=cached_eval_records(cfg) or [])
        report["fingerprint"] = fingerprint
        artifacts.mkdir(parents=True, exist_ok=True)
        staging = report_path.with_suffix(".json.tmp")
        staging.write_text(json.dumps(report, indent=2))
        staging.replace(report_path)
    status = comparison_status(report, str(report_path))
    if report.get("rows"):
        log.info("base vs fine-tuned:\n%s", render_table(report["rows"]))
    material = review_material(cfg, report)
    write_review_page(cfg, status, material)
    if cfg.reporting.status_patch:
        from .reporting import StatusPatcher

        StatusPatcher(cfg.job, 0).patch({"status": {"comparison": status}})
        if cfg.reporting.review_config_map:
            publish_review(cfg, material)
    return {"reason": "Compared" if status["state"] == "Measured" else "ComparisonUnavailable",
            "message": status["message"]}


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _measure_report(cfg: TrainerConfig, adapter: Path | None, merged: Path | None, *,
                    gpu_hour_price: float, gpus: int, eval_records: list[dict]) -> dict[str, Any]:
    items = items_for(cfg, eval_records, sample_size=cfg.evaluation.comparison.sample_size,
                      seed=cfg.training.seed)
    counts = {"prompts": sum(i.kind == "prompt" for i in items),
              "samples": sum(i.kind == "sample" for i in items)}
    if adapter is None and merged is None:
        return {"state": "Unavailable", "message": f"no adapter or merged model under {cfg.paths.artifacts}",
                **counts}
    if not items:
        return {"state": "Unavailable", "message": "nothing to ask: no evaluation prompts and no "
                "eval records with an answer (spec.evaluation.prompts, dataset.evalFraction)", **counts}
    try:
        # pvc://, volume://, and s3:// or https:// once the trainer downloaded them: on the volume.
        runs, served = measure(cfg, items, base=cfg.paths.resolve(cfg.model.source), adapter=adapter, merged=merged,
                               cpu=gpus == 0)
    except (ServerUnavailable, OSError, urllib.error.URLError, KeyError, ValueError) as exc:
        log.warning("comparison unavailable: %s", exc)
        return {"state": "Unavailable", "message": f"vLLM could not serve the comparison: {exc}", **counts}
    rows = table_rows(items, runs, served, metrics=list(cfg.evaluation.metrics),
                      gpu_hour_price=gpu_hour_price, gpus=gpus)
    answers = [{"kind": item.kind, "prompt": item.shown, "reference": item.reference,
                "base": b.text, "fineTuned": t.text,
                "baseMs": round(b.latency_s * 1000, 1), "fineTunedMs": round(t.latency_s * 1000, 1)}
               for item, b, t in zip(items, runs[BASE].answers, runs[FINETUNED].answers)]
    return {"state": "Measured",
            "message": f"{counts['prompts']} prompts and {counts['samples']} eval records asked of both "
                       f"models through one vLLM run",
            **counts, "rows": rows, "answers": answers}


def comparison_status(report: dict[str, Any], where: str) -> dict[str, Any]:
    """status.comparison from the report (only what the schema declares)."""
    status = {"state": report.get("state", "Unavailable"), "message": str(report.get("message", ""))[:4000],
              "prompts": int(report.get("prompts") or 0), "samples": int(report.get("samples") or 0),
              "report": where}
    rows = [{k: v for k, v in row.items() if v is not None and not (isinstance(v, float) and not math.isfinite(v))}
            for row in report.get("rows") or []]
    if rows:
        status["rows"] = rows
    return status


# --- the review page's material -------------------------------------------------------------------

# A ConfigMap holds at most 1 MiB; keep well below it.
REVIEW_BUDGET = 700_000
ANSWER_CHARS = 2000


def review_material(cfg: TrainerConfig, report: dict[str, Any]) -> dict[str, Any]:
    """comparison.json (answers shortened to fit a ConfigMap), the dataset report, loss.png."""
    from finetune_api import review

    shown = {k: v for k, v in report.items() if k != "fingerprint"}
    text = json.dumps(shown)
    if len(text) > REVIEW_BUDGET:
        cut = [{k: (v[:ANSWER_CHARS] + "…" if isinstance(v, str) and len(v) > ANSWER_CHARS else v)
                for k, v in a.items()} for a in shown.get("answers") or []]
        while cut and len(json.dumps({**shown, "answers": cut})) > REVIEW_BUDGET:
            cut.pop()
        shown = {**shown, "answers": cut, "shortened": True}
        text = json.dumps(shown)
    dataset_file = cfg.paths.reports / "dataset.json"
    plot = cfg.paths.artifacts / "loss.png"
    material: dict[str, Any] = {review.COMPARISON_KEY: text}
    if dataset_file.is_file():
        material[review.DATASET_KEY] = dataset_file.read_text()
    if plot.is_file() and plot.stat().st_size < REVIEW_BUDGET // 4:
        material[review.LOSS_PLOT_KEY] = plot.read_bytes()
    return material


def write_review_page(cfg: TrainerConfig, status: dict[str, Any], material: dict[str, Any]) -> Path:
    """artifacts/report.html, next to the model card (self-contained, without forms)."""
    from finetune_api import review

    dataset = json.loads(material[review.DATASET_KEY]) if review.DATASET_KEY in material else None
    job = {"metadata": {"name": cfg.job.name, "namespace": cfg.job.namespace},
           "spec": {"model": {"source": cfg.model.source}, "method": {"type": cfg.method.type}},
           "status": {"phase": "Comparing", "comparison": status}}
    page = review.render(job, json.loads(material[review.COMPARISON_KEY]),
                         loss_png=material.get(review.LOSS_PLOT_KEY), dataset=dataset)
    path = cfg.paths.artifacts / review.REPORT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page)
    return path


def publish_review(cfg: TrainerConfig, material: dict[str, Any], target=None) -> bool:
    """Merge-patch the review ConfigMap the operator created (its Role allows only that one)."""
    import base64

    from .reporting import StatusPatcher

    class ConfigMapPatcher(StatusPatcher):
        @property
        def url_path(self) -> str:
            return f"/api/v1/namespaces/{self.job.namespace}/configmaps/{cfg.reporting.review_config_map}"

    data = {k: v for k, v in material.items() if isinstance(v, str)}
    binary = {k: base64.b64encode(v).decode() for k, v in material.items() if isinstance(v, bytes)}
    return ConfigMapPatcher(cfg.job, 0, target).patch({"data": data, "binaryData": binary})
