"""Supervised fine-tuning (`method.objective: sft`) with TRL's SFTTrainer.

Formats: chat (rendered with the chat template; loss on the assistant turns, each with its
end-of-turn token, located by chat_templates.py for any template); instruction and
completion, which data preparation turns into user/assistant conversations when the model
has a chat template (so they train exactly as chat records do, and as they are asked through
/v1/chat/completions), else prompt/completion records (the Alpaca prompt, or the raw prompt;
loss on the completion); text (loss on all).
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
    """Assistant turns are located by rendering prefixes (chat_templates.py), whatever the
    template: only a model without a template has none to locate them in."""
    from ..chat_templates import template_of

    return template_of(tokenizer) is not None


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

    kwargs: dict[str, Any] = training_kwargs(cfg, precision, has_eval=has_eval)
    kwargs.update(
        max_length=cfg.training.max_seq_length,
        packing=packing,
        completion_only_loss=True if kind == "prompt-completion" else None,
        # Chat records reach TRL tokenized, with their assistant_masks (sft_dataset): TRL's
        # own masking needs {% generation %} tags it only has for templates it knows.
        assistant_only_loss=False,
        dataset_text_field="text",
    )
    return SFTConfig(**kwargs)


def sft_dataset(records: list[dict], tokenizer, chat_template=None):
    """The records as SFTTrainer takes them: chat records rendered with the chat template
    into input_ids and assistant_masks (dataset.chatTemplate.lossOn assistant), the rest as
    they are (TRL tokenizes them and masks prompts)."""
    if records and "messages" in records[0]:
        from ..chat_templates import dataset_renderer, tokenized_records

        renderer = dataset_renderer(tokenizer, chat_template)
        if renderer is None:
            from ..config import ConfigError

            raise ConfigError("the model has no chat template to render chat records with: set "
                              "dataset.chatTemplate")
        records = tokenized_records(renderer, records)
    return records_dataset(records)


def make_sft_trainer(model, args, tokenizer, train: list[dict], evals: list[dict], callbacks=(),
                     chat_template=None):
    """TRL's SFTTrainer over prepared records (`chat_template`: dataset.chatTemplate)."""
    from trl import SFTTrainer

    return SFTTrainer(
        model=model,
        args=args,
        train_dataset=sft_dataset(train, tokenizer, chat_template),
        eval_dataset=sft_dataset(evals, tokenizer, chat_template) if evals else None,
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
        """A guess before the data is prepared (only for setting up distributed training): the
        kind the prepared records have decides (instruction and completion records become
        conversations when the model has a chat template)."""
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
        return make_sft_trainer(model, args, tokenizer, train, evals, callbacks,
                                cfg.dataset.chat_template)

    def evaluate(self, cfg, model, tokenizer, eval_records, *, reference=None) -> dict[str, Any]:
        return {}  # loss, perplexity and the prompt generations are common (evaluate.py)

    def standalone_eval(self, cfg, model, tokenizer, eval_records) -> dict[str, float]:
        """Eval loss of finished artifacts on the prepared eval split."""
        import torch
        from trl import SFTConfig, SFTTrainer

        if not eval_records:
            return {}
        dataset = sft_dataset(eval_records, tokenizer, cfg.dataset.chat_template)
        with tempfile.TemporaryDirectory() as tmp:
            args = SFTConfig(output_dir=tmp, per_device_eval_batch_size=cfg.training.per_device_batch_size,
                             max_length=cfg.training.max_seq_length, report_to="none",
                             use_cpu=not torch.cuda.is_available(), disable_tqdm=True)
            trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, eval_dataset=dataset,
                                 processing_class=tokenizer)
            return trainer.evaluate()


SFT_OBJECTIVE = register(SFT())
