"""What a finished run leaves on the job volume for serving: the adapter, the merged model,
the tokenizer beside each, and a model card.

`adapter/` is a PEFT LoRA adapter vLLM can load (`--lora-modules name=path`): linear
targets only, no `modules_to_save`. `merged/` is a plain transformers checkpoint (full
fine-tuning, or `output.merge`).
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from finetune_api.models import to_dict
from finetune_api.prompts import ASKED_THROUGH

from .config import TrainerConfig
from .model import VLLM_UNSUPPORTED_LORA_TARGETS

log = logging.getLogger(__name__)

LIBRARIES = ("torch", "transformers", "peft", "trl", "accelerate", "datasets", "bitsandbytes")


def _replace_dir(staging: Path, target: Path) -> None:
    """Swap a fully written folder into place (a retried run may find an old one)."""
    if target.exists():
        shutil.rmtree(target)
    staging.rename(target)


def _staging(target: Path) -> Path:
    staging = target.with_name(f".{target.name}.tmp")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    return staging


def check_adapter_servable(adapter_dir: Path) -> None:
    """Fail loudly now, not at serve time, on an adapter vLLM would reject."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    if config.get("modules_to_save"):
        raise RuntimeError(f"adapter saves whole modules {config['modules_to_save']}; vLLM rejects it")
    targets = config.get("target_modules") or []
    if isinstance(targets, str):
        targets = [targets]
    bad = [t for t in targets if any(t.endswith(u) for u in VLLM_UNSUPPORTED_LORA_TARGETS)]
    if bad:
        raise RuntimeError(f"adapter targets {bad}, which vLLM cannot serve")


def save(cfg: TrainerConfig, model, tokenizer, *, state_dict=None) -> dict[str, Path]:
    """Write adapter/ (LoRA, QLoRA) and merged/ (full, or output.merge); return their paths.

    `state_dict` is the whole model gathered from a sharded (FSDP) run. A full model is
    saved in the base model's own dtype (bf16 for today's models), not in the fp32 of the
    master weights, which would double the files and what vLLM loads."""
    root = cfg.paths.artifacts
    root.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}
    model = getattr(model, "module", model)  # unwrap DDP
    if cfg.method.type == "full":
        from .model import native_dtype

        dtype = native_dtype(cfg, cfg.training.precision)
        state = state_dict if state_dict is not None else model.state_dict()
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
        merged = root / "merged"
        staging = _staging(merged)
        model.config.dtype = dtype
        model.save_pretrained(staging, state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        _replace_dir(staging, merged)
        out["merged"] = merged
        return out

    adapter = root / "adapter"
    staging = _staging(adapter)
    model.save_pretrained(staging, state_dict=state_dict, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    check_adapter_servable(staging)
    _replace_dir(staging, adapter)
    out["adapter"] = adapter
    if cfg.output.merge:
        out["merged"] = merge_adapter(cfg, adapter, tokenizer)
    return out


def merge_adapter(cfg: TrainerConfig, adapter: Path, tokenizer) -> Path:
    """Merge into a fresh, unquantized base (merging into 4-bit weights would lose precision):
    on the GPU when there is one, in the base model's own dtype (model.load_base_for_inference)."""
    from peft import PeftModel

    from .model import load_base_for_inference, native_dtype

    base = load_base_for_inference(cfg)
    merged_model = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
    merged_model = merged_model.to(native_dtype(cfg, cfg.training.precision))
    merged = cfg.paths.artifacts / "merged"
    staging = _staging(merged)
    merged_model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    _replace_dir(staging, merged)
    return merged


def library_versions() -> dict[str, str]:
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def write_model_card(cfg: TrainerConfig, summary: dict[str, Any], eval_report: dict[str, Any]) -> Path:
    """README.md beside the artifacts: what was trained, on what, how, with which result."""
    training = to_dict(cfg.training)
    method = to_dict(cfg.method)
    lines = [
        f"# {cfg.job.name}: fine-tuned {cfg.model.source}",
        "",
        f"- Base model: `{cfg.model.source}`" + (f" (revision `{cfg.model.revision}`)" if cfg.model.revision else ""),
        f"- Method: {cfg.method.type}, objective {cfg.method.objective}",
        f"- Dataset: `{cfg.dataset.source}` (format {cfg.dataset.format}, hash `{summary.get('datasetHash')}`,"
        f" {summary.get('trainRecords')} train / {summary.get('evalRecords')} eval records)",
        *([f"- Prompt format: {summary['promptFormat']}: ask through "
           f"{ASKED_THROUGH.get(summary['promptFormat'], '?')}"] if summary.get("promptFormat") else []),
        f"- Trainer image: `{os.environ.get('FINETUNE_IMAGE', 'unknown')}`",
        f"- FineTuneJob: `{cfg.job.namespace}/{cfg.job.name}`",
        "",
        "## Results",
        "",
        "| metric | value |",
        "| --- | --- |",
    ]
    for key in ("step", "epoch", "trainLoss", "evalLoss", "perplexity", "trainSeconds", "tokensSeen",
                "bestCheckpoint", "precision", "packing"):
        lines.append(f"| {key} | {_fmt(summary.get(key))} |")
    for key, value in (summary.get("objectiveMetrics") or {}).items():
        lines.append(f"| {key} (last training log) | {_fmt(value)} |")
    for key, value in (eval_report.get("objectiveMetrics") or {}).items():
        lines.append(f"| {key} (held-out pairs) | {_fmt(value)} |")
    accuracy = eval_report.get("preferenceAccuracy") or {}
    for model_name in ("base", "finetuned"):
        if model_name in accuracy:
            lines.append(f"| preferenceAccuracy ({model_name}, {accuracy.get('pairs')} held-out pairs) "
                         f"| {_fmt(accuracy[model_name])} |")
    scores = eval_report.get("scores") or {}
    for model_name, metrics in scores.items():
        for metric, value in metrics.items():
            lines.append(f"| {metric} ({model_name}) | {_fmt(value)} |")
    eval_set = eval_report.get("evalSetScores") or {}
    for model_name in ("base", "finetuned"):
        for metric, value in (eval_set.get(model_name) or {}).items():
            lines.append(f"| {metric} ({model_name}, {eval_set.get('examples')} eval records) | {_fmt(value)} |")
    if summary.get("sources"):
        lines += ["", "## Sources", "", "| source | sha256 | bytes |", "| --- | --- | --- |"]
        lines += [f"| `{s['location']}` | `{s['sha256']}` | {s['bytes']} |" for s in summary["sources"]]
    if (summary.get("artifacts") or {}).get("lossPlot"):
        # The plot lies beside this card (artifacts/loss.png), so the link is relative.
        lines += ["", "## Loss curve", "", "![training and evaluation loss, learning rate](loss.png)"]
    lines += ["", "## Method", "", "```json", json.dumps(method, indent=2, sort_keys=True), "```",
              "", "## Hyperparameters", "", "```json", json.dumps(training, indent=2, sort_keys=True), "```",
              "", "## Library versions", ""]
    lines += [f"- {name} {version}" for name, version in library_versions().items()]
    artifacts = summary.get("artifacts") or {}
    if "adapter" in artifacts:
        lines += ["", "## Serving", "",
                  f"vLLM: `--enable-lora --lora-modules {cfg.job.name}={artifacts['adapter']}"
                  f" --max-lora-rank {max(16, cfg.method.lora.r if cfg.method.lora else 16)}`"]
    path = cfg.paths.artifacts / "README.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path
