"""Supervised fine-tuning (`method.objective: sft`) with TRL's SFTTrainer.

Formats: instruction and completion (prompt/completion records, loss on the completion),
chat (loss on the assistant turns when the chat template marks them), text (loss on all).
"""

from __future__ import annotations

import logging
import tempfile
from typing import Any, Sequence

from ..config import TrainerConfig
from . import MetricSpec, check_format, register
from .common import records_dataset, training_kwargs

log = logging.getLogger(__name__)


def template_supports_assistant_mask(tokenizer) -> bool:
    """Assistant-only loss needs `{% generation %}` tags (or a template TRL can rewrite)."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return False
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    if has_generation_markers(template):
        return True
    try:
        return get_training_chat_template(tokenizer) is not None
    except Exception:  # noqa: BLE001 - an unknown template: train on the whole conversation
        return False


def data_kind(records: list[dict]) -> str:
    sample = records[0] if records else {}
    if "messages" in sample:
        return "messages"
    if "prompt" in sample and "completion" in sample:
        return "prompt-completion"
    return "text"


def build_sft_config(cfg: TrainerConfig, precision, *, has_eval: bool, kind: str, tokenizer,
                     packing: bool):
    from trl import SFTConfig

    assistant_only = kind == "messages" and template_supports_assistant_mask(tokenizer)
    if kind == "messages" and not assistant_only:
        log.warning("the chat template has no {%% generation %%} tags; training on whole conversations")
    kwargs: dict[str, Any] = training_kwargs(cfg, precision, has_eval=has_eval)
    kwargs.update(
        max_length=cfg.training.max_seq_length,
        packing=packing,
        completion_only_loss=True if kind == "prompt-completion" else None,
        assistant_only_loss=assistant_only,
        dataset_text_field="text",
    )
    if kind == "messages" and not assistant_only:
        kwargs["completion_only_loss"] = None
    return SFTConfig(**kwargs)


def make_sft_trainer(model, args, tokenizer, train: list[dict], evals: list[dict], callbacks=()):
    """TRL's SFTTrainer over TRL-shaped records (it tokenizes and builds the label masks)."""
    from trl import SFTTrainer

    return SFTTrainer(
        model=model,
        args=args,
        train_dataset=records_dataset(train),
        eval_dataset=records_dataset(evals) if evals else None,
        processing_class=tokenizer,
        callbacks=list(callbacks),
    )


class SFT:
    name = "sft"
    formats = ("instruction", "completion", "chat", "text")
    lm_loss = True
    metrics: tuple[MetricSpec, ...] = ()

    def check(self, cfg: TrainerConfig) -> None:
        check_format(self, cfg)

    def data_options(self, cfg: TrainerConfig) -> dict[str, Any]:
        return {}

    def probe_kind(self, cfg: TrainerConfig) -> str:
        return {"chat": "messages", "text": "text"}.get(cfg.dataset.format, "prompt-completion")

    def data_kind(self, records: list[dict]) -> str:
        return data_kind(records)

    def build_args(self, cfg, precision, *, has_eval, kind, tokenizer, packing):
        return build_sft_config(cfg, precision, has_eval=has_eval, kind=kind, tokenizer=tokenizer,
                                packing=packing)

    def load_model(self, cfg: TrainerConfig, precision):
        from ..model import load_model

        return load_model(cfg, precision)

    def make_trainer(self, cfg, model, args, tokenizer, train, evals, callbacks: Sequence = ()):
        return make_sft_trainer(model, args, tokenizer, train, evals, callbacks)

    def evaluate(self, cfg, model, tokenizer, eval_records, *, reference=None) -> dict[str, Any]:
        return {}  # loss, perplexity and the prompt generations are common (evaluate.py)

    def standalone_eval(self, cfg, model, tokenizer, eval_records) -> dict[str, float]:
        """Eval loss of finished artifacts on the prepared eval split."""
        import torch
        from trl import SFTConfig, SFTTrainer

        if not eval_records:
            return {}
        dataset = records_dataset(eval_records)
        with tempfile.TemporaryDirectory() as tmp:
            args = SFTConfig(output_dir=tmp, per_device_eval_batch_size=cfg.training.per_device_batch_size,
                             max_length=cfg.training.max_seq_length, report_to="none",
                             use_cpu=not torch.cuda.is_available(), disable_tqdm=True)
            trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, eval_dataset=dataset,
                                 processing_class=tokenizer)
            return trainer.evaluate()


SFT_OBJECTIVE = register(SFT())
