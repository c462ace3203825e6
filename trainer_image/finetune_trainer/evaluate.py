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


BASE_LOSS_KEY = "base_eval_loss"


def base_eval_with_trainer(trainer) -> dict[str, float]:
    """The base model's loss on the eval set, measured by the training run's own trainer (same
    eval split, collator and packing as the fine-tuned eval loss) with the adapter disabled.
    Called on every rank (the evaluation gathers across them). `{}` when the model has no
    adapter to disable (full fine-tuning: `evaluate_run` measures the base separately)."""
    model = trainer.model
    if not hasattr(model, "disable_adapter"):
        return {}
    with model.disable_adapter():
        metrics = trainer.evaluate(metric_key_prefix="base_eval")
    return {BASE_LOSS_KEY: metrics[BASE_LOSS_KEY]} if BASE_LOSS_KEY in metrics else {}


def _base_eval_loss(cfg: TrainerConfig, objective, model, base_loader, tokenizer,
                    eval_records: list[dict]) -> float | None:
    """The base model's eval loss by a separate evaluation pass (`finetune-trainer evaluate`, and
    full fine-tuning), single process only: a pass on rank 0 alone would wait for the others."""
    import os

    if not eval_records or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return None
    try:
        if hasattr(model, "disable_adapter"):
            with model.disable_adapter():
                metrics = objective.standalone_eval(cfg, model, tokenizer, eval_records)
        else:
            metrics = objective.standalone_eval(cfg, base_loader(), tokenizer, eval_records)
    except Exception as exc:  # noqa: BLE001 - a figure for comparison; the run's own results stand
        log.warning("the base model's eval loss could not be measured: %s", exc)
        return None
    return metrics.get("eval_loss")


def evaluation_model(cfg: TrainerConfig, trainer, artifact_paths: dict[str, Path], *, sharded: bool):
    """The trained model for evaluation on rank 0, with the optimizer's state freed first
    (AdamW keeps 8 bytes per parameter: evaluation must not load a second model beside it).

    Unsharded full fine-tuning evaluates the trained model itself; an adapter model is kept
    as it is (its base is the same model with the adapter disabled). A sharded (FSDP) model
    lives in pieces on ranks that have left, so it is read back from the artifact just
    written, in its own dtype, on the GPU when there is one."""
    import gc

    import torch

    if not sharded and cfg.method.type != "full":
        return trainer.model
    trainer.optimizer = None
    trainer.lr_scheduler = None
    model = getattr(trainer.model, "module", trainer.model)
    if sharded:
        trainer.model = trainer.model_wrapped = model = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if not sharded:
        return model
    from .model import load_saved_for_inference

    return load_saved_for_inference(artifact_paths["merged"])  # only full fine-tuning is sharded


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


def prompt_format_for(cfg: TrainerConfig, tokenizer) -> str:
    """The prompt format training used with this tokenizer (finetune_api.prompts): the chat
    template when the tokenizer has one (instruction, completion, chat and preference data),
    else the Alpaca prompt (instruction) or the prompt as it is."""
    from finetune_api.prompts import prompt_format

    template = getattr(tokenizer, "chat_template", None)
    return prompt_format(cfg.dataset.format, bool(template) and hasattr(tokenizer, "apply_chat_template"))


def trained_prompt_format(cfg: TrainerConfig) -> str:
    """The prompt format the run recorded (reports/dataset.json); a run that recorded none was
    trained before instruction records went through the chat template."""
    from finetune_api.prompts import unrecorded_prompt_format

    from .prepared import recorded_prompt_format

    return recorded_prompt_format(cfg) or unrecorded_prompt_format(cfg.dataset.format)


def format_prompt(cfg: TrainerConfig, tokenizer, prompt: str, fmt: str | None = None) -> str:
    """Present a prompt (a question) the way the training data presented prompts: in `fmt`
    (the format the run recorded), by default the one this tokenizer (the one training used)
    gives: through its chat template, else the Alpaca prompt or the prompt as it is."""
    from finetune_api.prompts import CHAT_TEMPLATE, text_prompt

    fmt = fmt or prompt_format_for(cfg, tokenizer)
    if fmt == CHAT_TEMPLATE and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                             add_generation_prompt=True, tokenize=False)
    return text_prompt(fmt, prompt)


# End-of-turn tokens of the common chat templates (ChatML, Llama 3): generation stops there.
END_OF_TURN = ("<|im_end|>", "<|eot_id|>")


def generate(model, tokenizer, texts: list[str], max_new_tokens: int) -> list[str]:
    import torch

    model.eval()
    device = next(model.parameters()).device
    stop = [tokenizer.eos_token_id]
    vocab = tokenizer.get_vocab()
    stop += [vocab[token] for token in END_OF_TURN if token in vocab]
    outputs = []
    for text in texts:
        encoded = tokenizer(text, return_tensors="pt", add_special_tokens=False).to(device)
        with torch.no_grad():
            generated = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False,
                                       pad_token_id=tokenizer.pad_token_id, eos_token_id=stop)
        new_tokens = generated[0][encoded["input_ids"].shape[1]:]
        outputs.append(tokenizer.decode(new_tokens, skip_special_tokens=True).strip())
    return outputs


# evaluation.metrics on the eval set: generation is slow, so the first records only.
EVAL_SET_SCORED = 32


def eval_set_pairs(cfg: TrainerConfig, tokenizer, records: list[dict]) -> list[tuple[str, str]]:
    """(prompt as the model saw it, reference answer) of the first eval records that have an
    answer: prompt/completion records, and chats ending in an assistant turn."""
    pairs = []
    for record in records:
        if isinstance(record.get("prompt"), str) and isinstance(record.get("completion"), str):
            pairs.append((record["prompt"], record["completion"]))
        elif (messages := record.get("messages")) and messages[-1].get("role") == "assistant" \
                and getattr(tokenizer, "chat_template", None):
            prompt = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False)
            pairs.append((prompt, str(messages[-1].get("content", ""))))
        if len(pairs) == EVAL_SET_SCORED:
            break
    return pairs


def _generate_both(model, base_loader, tokenizer, texts: list[str], n: int) -> tuple[list[str], list[str]]:
    """The fine-tuned and the base model's answers (an adapter model's base: adapter disabled)."""
    tuned = generate(model, tokenizer, texts, n)
    if hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            return tuned, generate(model, tokenizer, texts, n)
    return tuned, generate(base_loader(), tokenizer, texts, n)


def evaluate_run(cfg: TrainerConfig, model, tokenizer, *, eval_metrics: dict[str, float],
                 base_loader: Callable[[], Any] | None = None,
                 eval_records: list[dict] | None = None) -> dict[str, Any]:
    """Write eval.json: loss, perplexity, the base model's loss and perplexity on the same eval
    set (sft), the objective's own evaluation on the held-out records (DPO: preference
    accuracy), and base vs fine-tuned generations when prompts are set.

    For an adapter model the base is the same model with its adapter disabled; otherwise
    `base_loader` (default: a fresh copy of the base model) provides it.
    """
    from .objectives import get_objective

    objective = get_objective(cfg.method.objective)
    eval_loss = eval_metrics.get("eval_loss")
    report: dict[str, Any] = {"evalLoss": eval_loss,
                              "perplexity": perplexity(eval_loss) if objective.lm_loss else None,
                              "metrics": list(cfg.evaluation.metrics)}
    base_model = None
    if base_loader is not None and not hasattr(getattr(model, "module", model), "disable_adapter"):
        base_model = base_loader()
        base_loader = (lambda: base_model)
    report.update(objective.evaluate(
        cfg, model, tokenizer, eval_records or [], reference=base_model))
    model = getattr(model, "module", model)
    n = cfg.evaluation.max_new_tokens
    if base_loader is None:
        from .model import load_base_for_inference

        loaded: list = []

        def base_loader():  # loaded once, for the base loss and the generations
            if not loaded:  # in the model's own dtype (bf16), beside the tuned model
                loaded.append(load_base_for_inference(cfg).to(next(model.parameters()).device))
            return loaded[0]
    if objective.lm_loss and eval_loss is not None:
        base_loss = eval_metrics.get(BASE_LOSS_KEY)
        if base_loss is None:
            base_loss = _base_eval_loss(cfg, objective, model, base_loader, tokenizer, eval_records or [])
        if base_loss is not None:
            report["baseEvalLoss"] = base_loss
            report["basePerplexity"] = perplexity(base_loss)
    pairs = eval_set_pairs(cfg, tokenizer, eval_records or []) if cfg.evaluation.metrics else []
    if pairs:
        tuned, base = _generate_both(model, base_loader, tokenizer, [t for t, _ in pairs], n)
        refs = [r for _, r in pairs]
        report["evalSetScores"] = {"examples": len(pairs),
                                   "base": score(base, refs, cfg.evaluation.metrics),
                                   "finetuned": score(tuned, refs, cfg.evaluation.metrics)}
    prompts = load_prompts(cfg)
    if prompts:
        fmt = trained_prompt_format(cfg)
        report["promptFormat"] = fmt
        texts = [format_prompt(cfg, tokenizer, p["prompt"], fmt) for p in prompts]
        tuned, base = _generate_both(model, base_loader, tokenizer, texts, n)
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
        from .model import load_saved_for_inference

        model = load_saved_for_inference(artifacts / "merged")
    else:
        raise ConfigError(f"no artifacts to evaluate under {artifacts} (adapter/ or merged/)")
    model = model.to(device)
    from .objectives import get_objective
    from .prepared import cached_eval_records

    # Eval loss (and the objective's evaluation) on the prepared eval split, if the run left one.
    records = cached_eval_records(cfg) or []
    eval_metrics = get_objective(cfg.method.objective).standalone_eval(cfg, model, tokenizer, records)
    return evaluate_run(cfg, model, tokenizer, eval_metrics=eval_metrics, eval_records=records)
