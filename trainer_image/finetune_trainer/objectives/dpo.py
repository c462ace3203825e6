"""Direct preference optimisation (`method.objective: dpo`) with TRL's DPOTrainer.

Trains on `preference` pairs ({prompt, chosen, rejected}, or OpenAI's DPO shape, converted
by data/formats.py). The reference model:
- lora/qlora: the base with the adapter disabled. The trainer gets the unwrapped base and
  the LoRA config, so TRL wraps it and computes reference log-probs with the adapter off
  (no second model, no second adapter);
- full: an explicit frozen copy of the base, loaded here (in the training precision, no
  gradients, eval mode): one more model's weights in memory, see docs/dpo.md.

TRL 1.16's DPOConfig has one `max_length` (the sequence, truncated keeping its start), no
prompt or completion limits: `method.dpo.maxPromptLength` / `maxCompletionLength` are applied
when the dataset is prepared (prompts keep their end, answers their beginning), and
training.maxSeqLength is DPOConfig.max_length.

Evaluation (`preferenceAccuracy`): over the held-out pairs, the share whose chosen answer
has a higher summed log-probability (given the prompt) than the rejected one, under the base
model (`base`) and under the tuned model (`finetuned`). The implicit-reward accuracy of the
tuned model against the reference (TRL's rewards/accuracies) is `rewardAccuracy`.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

from ..config import ConfigError, TrainerConfig
from . import MetricSpec, check_format, register
from .common import records_dataset, training_kwargs

log = logging.getLogger(__name__)

METRICS = (
    MetricSpec("rewards/chosen", "rewardsChosen", "rewards_chosen",
               "DPO: mean implicit reward of the chosen answers (beta x log-ratio to the reference)"),
    MetricSpec("rewards/rejected", "rewardsRejected", "rewards_rejected",
               "DPO: mean implicit reward of the rejected answers"),
    MetricSpec("rewards/accuracies", "rewardsAccuracy", "rewards_accuracy",
               "DPO: share of pairs whose chosen answer has the higher implicit reward"),
    MetricSpec("rewards/margins", "rewardsMargin", "rewards_margin",
               "DPO: mean implicit reward of chosen minus rejected"),
)


def is_conversational(record: dict) -> bool:
    return isinstance(record.get("prompt"), list)


def _ids(tokenizer, messages_or_text, *, generation_prompt: bool = False, tools=None) -> list[int]:
    if isinstance(messages_or_text, list):
        ids = tokenizer.apply_chat_template(messages_or_text, tools=tools, tokenize=True,
                                            add_generation_prompt=generation_prompt,
                                            return_dict=False)
        if isinstance(ids, dict):  # transformers versions differ in what tokenize=True returns
            ids = ids["input_ids"]
        return list(ids)
    return tokenizer(messages_or_text, add_special_tokens=False)["input_ids"]


def pair_token_ids(tokenizer, record: dict, max_length: int | None = None) -> tuple[list[int], list[int], int]:
    """(prompt+chosen ids, prompt+rejected ids, prompt length) the way TRL's DPOTrainer cuts
    them: the answer starts where prompt and prompt+answer tokenizations diverge."""
    tools = record.get("tools")
    prompt = record["prompt"]
    if is_conversational(record):
        prompt_ids = _ids(tokenizer, prompt, generation_prompt=True, tools=tools)
        chosen = _ids(tokenizer, prompt + record["chosen"], tools=tools)
        rejected = _ids(tokenizer, prompt + record["rejected"], tools=tools)
    else:
        eos = tokenizer.eos_token or ""
        prompt_ids = _ids(tokenizer, prompt)
        chosen = _ids(tokenizer, prompt + record["chosen"] + eos)
        rejected = _ids(tokenizer, prompt + record["rejected"] + eos)

    def common(a: list[int], b: list[int]) -> int:
        n = 0
        for x, y in zip(a, b):
            if x != y:
                break
            n += 1
        return n

    start = min(common(prompt_ids, chosen), common(prompt_ids, rejected))
    if max_length:
        chosen, rejected = chosen[:max_length], rejected[:max_length]
    return chosen, rejected, start


def sequence_logp(model, ids: list[int], start: int) -> float:
    """Sum of log p(token | tokens before) over ids[start:]."""
    import torch

    if len(ids) <= start:
        return 0.0
    device = next(model.parameters()).device
    tensor = torch.tensor([ids], device=device)
    with torch.no_grad():
        logits = model(input_ids=tensor).logits[0, :-1].float()
    logps = torch.log_softmax(logits, dim=-1)
    targets = tensor[0, 1:]
    picked = logps.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return float(picked[start - 1:].sum()) if start > 0 else float(picked.sum())


def preference_accuracy(model, tokenizer, records: list[dict], max_length: int | None = None) -> float | None:
    """Share of pairs whose chosen answer the model finds likelier than the rejected one
    (summed log-probability of the answer tokens given the prompt); None without pairs."""
    if not records:
        return None
    model.eval()
    wins = 0
    for record in records:
        chosen, rejected, start = pair_token_ids(tokenizer, record, max_length)
        if sequence_logp(model, chosen, start) > sequence_logp(model, rejected, start):
            wins += 1
    return round(wins / len(records), 4)


class DPO:
    name = "dpo"
    formats = ("preference",)
    lm_loss = False
    metrics = METRICS

    def check(self, cfg: TrainerConfig) -> None:
        check_format(self, cfg)
        dpo = cfg.method.dpo
        if dpo is None:
            raise ConfigError("method.dpo: missing (method.objective dpo)")
        # The schema's bounds, for configs no API server has checked.
        if not dpo.beta > 0:
            raise ConfigError(f"method.dpo.beta: must be > 0, got {dpo.beta}")
        for name, value in (("maxPromptLength", dpo.max_prompt_length),
                            ("maxCompletionLength", dpo.max_completion_length)):
            if value is not None and value < 1:
                raise ConfigError(f"method.dpo.{name}: must be at least 1, got {value}")
        if cfg.training.packing == "on":
            raise ConfigError("training.packing on: DPO trains on whole pairs and does not pack")

    def data_options(self, cfg: TrainerConfig) -> dict[str, Any]:
        dpo = cfg.method.dpo
        return {"max_prompt_length": dpo.max_prompt_length if dpo else None,
                "max_completion_length": dpo.max_completion_length if dpo else None}

    def probe_kind(self, cfg: TrainerConfig) -> str:
        return "preference"

    def data_kind(self, records: list[dict]) -> str:
        return "preference"

    def build_args(self, cfg, precision, *, has_eval, kind, tokenizer, packing):
        from trl import DPOConfig

        dpo = cfg.method.dpo
        kwargs = training_kwargs(cfg, precision, has_eval=has_eval)
        kwargs.update(
            beta=dpo.beta,
            loss_type=[dpo.loss_type],
            max_length=cfg.training.max_seq_length,
            # The checkpoint resume and the eval both need the reference computed live.
            precompute_ref_log_probs=False,
        )
        return DPOConfig(**kwargs)

    def load_model(self, cfg: TrainerConfig, precision):
        """The base as the method trains it; adapters are added by the trainer (see make_trainer)."""
        from ..model import load_base_model

        return load_base_model(cfg, precision)

    def make_trainer(self, cfg, model, args, tokenizer, train, evals, callbacks: Sequence = ()):
        from trl import DPOTrainer

        from ..model import adapter_config, check_adapter_model, load_base_for_inference

        ref_model = None
        peft_config = None
        if cfg.method.type == "full":
            # An explicit frozen reference: TRL would otherwise reload it by name.
            ref_model = load_base_for_inference(cfg, dtype=model.dtype)
            ref_model.requires_grad_(False)
            ref_model.eval()
        else:
            peft_config = adapter_config(cfg, model)
        trainer = DPOTrainer(
            model=model,
            ref_model=ref_model,
            args=args,
            train_dataset=records_dataset(train),
            eval_dataset=records_dataset(evals) if evals else None,
            processing_class=tokenizer,
            callbacks=list(callbacks),
            peft_config=peft_config,
        )
        if peft_config is not None:
            check_adapter_model(cfg, trainer.model)
        trainer.finetune_reference = ref_model
        return trainer

    def evaluate(self, cfg, model, tokenizer, eval_records, *, reference=None) -> dict[str, Any]:
        """preferenceAccuracy (base and tuned) on the held-out pairs."""
        if not eval_records:
            return {}
        model = getattr(model, "module", model)
        limit = cfg.training.max_seq_length
        tuned = preference_accuracy(model, tokenizer, eval_records, limit)
        if hasattr(model, "disable_adapter"):
            with model.disable_adapter():
                base = preference_accuracy(model, tokenizer, eval_records, limit)
        else:
            if reference is None:
                from ..model import load_base_for_inference

                reference = load_base_for_inference(cfg).to(next(model.parameters()).device)
            base = preference_accuracy(reference, tokenizer, eval_records, limit)
        return {"preferenceAccuracy": {"base": base, "finetuned": tuned, "pairs": len(eval_records)}}

    def standalone_eval(self, cfg, model, tokenizer, eval_records) -> dict[str, float]:
        return {}  # preferenceAccuracy comes from evaluate(); DPO's loss needs the trainer


DPO_OBJECTIVE = register(DPO())
