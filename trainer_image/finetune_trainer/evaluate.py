"""Evaluation: eval loss and perplexity, and, for `evaluation.prompts`, generations of the
base and the fine-tuned model side by side scored with BLEU, ROUGE and exact match.

Everything is computed locally (`sacrebleu`, `rouge_score`): `evaluate.load` fetches
metric code from the Hub at run time, which an air-gapped cluster cannot do.
Written to `paths.reports/eval.json`.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Callable

from finetune_api.models import to_dict

from .config import ConfigError, TrainerConfig

log = logging.getLogger(__name__)

METRICS = ("bleu", "rouge", "exactMatch")


def perplexity(eval_loss: float | None) -> float | None:
    if eval_loss is None or not math.isfinite(eval_loss):
        return None
    return math.exp(eval_loss) if eval_loss < 50 else float("inf")


def score(predictions: list[str], references: list[str], metrics: list[str]) -> dict[str, float]:
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ConfigError(f"evaluation.metrics: unknown {unknown}; known: {', '.join(METRICS)}")
    out: dict[str, float] = {}
    if not predictions:
        return out
    if "bleu" in metrics:
        import sacrebleu

        out["bleu"] = round(sacrebleu.corpus_bleu(predictions, [references]).score, 4)
    if "rouge" in metrics:
        from rouge_score import rouge_scorer

        scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
        totals = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
        for pred, ref in zip(predictions, references):
            for name, value in scorer.score(ref, pred).items():
                totals[name] += value.fmeasure
        out.update({name: round(total / len(predictions), 4) for name, total in totals.items()})
    if "exactMatch" in metrics:
        hits = sum(p.strip() == r.strip() for p, r in zip(predictions, references))
        out["exactMatch"] = round(hits / len(predictions), 4)
    return out


def load_prompts(cfg: TrainerConfig) -> list[dict[str, str]]:
    prompts = [to_dict(p) for p in cfg.evaluation.prompts]
    if cfg.evaluation.prompts_source:
        path = Path(cfg.paths.resolve(cfg.evaluation.prompts_source))
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                record = json.loads(line)
                if "prompt" not in record:
                    raise ConfigError(f"{path} line {n}: field \"prompt\" is missing")
                prompts.append(record)
    return prompts


def format_prompt(cfg: TrainerConfig, tokenizer, prompt: str) -> str:
    """Present a prompt the way the training data presented prompts."""
    fmt = cfg.dataset.format
    if fmt == "chat" and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                             add_generation_prompt=True, tokenize=False)
    if fmt == "instruction":
        try:
            from .data.formats import INSTRUCTION_TEMPLATE
        except ImportError:
            return prompt
        return INSTRUCTION_TEMPLATE.format(instruction=prompt)
    return prompt


def generate(model, tokenizer, texts: list[str], max_new_tokens: int) -> list[str]:
    import torch

    model.eval()
    device = next(model.parameters()).device
    stop = [tokenizer.eos_token_id]
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tokenizer.get_vocab() else None
    if im_end is not None:
        stop.append(im_end)
    outputs = []
    for text in texts:
        encoded = tokenizer(text, return_tensors="pt", add_special_tokens=False).to(device)
        with torch.no_grad():
            generated = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False,
                                       pad_token_id=tokenizer.pad_token_id, eos_token_id=stop)
        new_tokens = generated[0][encoded["input_ids"].shape[1]:]
        outputs.append(tokenizer.decode(new_tokens, skip_special_tokens=True).strip())
    return outputs


def evaluate_run(cfg: TrainerConfig, model, tokenizer, *, eval_metrics: dict[str, float],
                 base_loader: Callable[[], Any] | None = None) -> dict[str, Any]:
    """Write eval.json: loss, perplexity, and base vs fine-tuned generations when prompts are set.

    For an adapter model the base is the same model with its adapter disabled; otherwise
    `base_loader` (default: a fresh copy of the base model) provides it.
    """
    eval_loss = eval_metrics.get("eval_loss")
    report: dict[str, Any] = {"evalLoss": eval_loss, "perplexity": perplexity(eval_loss),
                              "metrics": list(cfg.evaluation.metrics)}
    prompts = load_prompts(cfg)
    if prompts:
        texts = [format_prompt(cfg, tokenizer, p["prompt"]) for p in prompts]
        n = cfg.evaluation.max_new_tokens
        model = getattr(model, "module", model)
        tuned = generate(model, tokenizer, texts, n)
        if hasattr(model, "disable_adapter"):
            with model.disable_adapter():
                base = generate(model, tokenizer, texts, n)
        else:
            if base_loader is None:
                from .model import load_base_for_inference

                def base_loader():
                    return load_base_for_inference(cfg).to(next(model.parameters()).device)
            base = generate(base_loader(), tokenizer, texts, n)
        with_ref = [i for i, p in enumerate(prompts) if p.get("reference") is not None]
        refs = [prompts[i]["reference"] for i in with_ref]
        report["scores"] = {
            "base": score([base[i] for i in with_ref], refs, cfg.evaluation.metrics),
            "finetuned": score([tuned[i] for i in with_ref], refs, cfg.evaluation.metrics),
        }
        report["generations"] = [
            {"prompt": p["prompt"], "reference": p.get("reference"), "base": b, "finetuned": t}
            for p, b, t in zip(prompts, base, tuned)
        ]
    cfg.paths.reports.mkdir(parents=True, exist_ok=True)
    (cfg.paths.reports / "eval.json").write_text(json.dumps(report, indent=2, default=str))
    return report


def run(cfg: TrainerConfig) -> dict[str, Any]:
    """`finetune-trainer evaluate`: evaluate the artifacts of a finished run."""
    import torch

    from .model import load_base_for_inference, load_tokenizer

    artifacts = cfg.paths.artifacts
    tokenizer = load_tokenizer(cfg)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if (artifacts / "adapter" / "adapter_config.json").is_file():
        from peft import PeftModel

        model = PeftModel.from_pretrained(load_base_for_inference(cfg), str(artifacts / "adapter"))
    elif (artifacts / "merged" / "config.json").is_file():
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(artifacts / "merged"), dtype=torch.float32)
    else:
        raise ConfigError(f"no artifacts to evaluate under {artifacts} (adapter/ or merged/)")
    model = model.to(device)
    eval_metrics = _eval_loss(cfg, model, tokenizer)
    return evaluate_run(cfg, model, tokenizer, eval_metrics=eval_metrics)


def _eval_loss(cfg: TrainerConfig, model, tokenizer) -> dict[str, float]:
    """Eval loss on the prepared eval split, if the run left one in the data cache."""
    import tempfile

    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from .train import _read_jsonl, dataset_digest

    eval_file = cfg.paths.data_cache / dataset_digest(cfg) / "eval.jsonl"
    if not eval_file.is_file():
        log.info("no prepared eval split at %s; skipping eval loss", eval_file)
        return {}
    records = _read_jsonl(eval_file)
    if not records:
        return {}
    dataset = Dataset.from_list(records)
    with tempfile.TemporaryDirectory() as tmp:
        args = SFTConfig(output_dir=tmp, per_device_eval_batch_size=cfg.training.per_device_batch_size,
                         max_length=cfg.training.max_seq_length, report_to="none",
                         use_cpu=not __import__("torch").cuda.is_available(), disable_tqdm=True)
        trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, eval_dataset=dataset,
                             processing_class=tokenizer)
        return trainer.evaluate()
