"""transformers TrainingArguments shared by every objective (the loop, checkpoints, eval)."""

from __future__ import annotations

import logging
import math
import os
from typing import Any

from ..config import TrainerConfig

log = logging.getLogger(__name__)


def training_kwargs(cfg: TrainerConfig, precision, *, has_eval: bool) -> dict[str, Any]:
    """The TrainingArguments every objective's TRL config starts from."""
    import torch

    t = cfg.training
    eval_steps = t.eval_steps or t.save_steps
    if has_eval and t.save_steps % eval_steps:
        # load_best_model_at_end needs every save to follow an evaluation.
        eval_steps = math.gcd(eval_steps, t.save_steps)
        log.warning("training.evalSteps %s does not divide saveSteps %s; evaluating every %s steps",
                    t.eval_steps, t.save_steps, eval_steps)
    # perplexity = exp(eval_loss): the same checkpoints in the same order, lower is better.
    metric = "eval_loss" if t.metric_for_best_model == "perplexity" else t.metric_for_best_model
    use_cpu = not torch.cuda.is_available()
    from ..model import fsdp_arguments, sharding_enabled

    sharded = fsdp_arguments(t.gradient_checkpointing) if sharding_enabled(cfg) else {}
    kwargs = dict(
        output_dir=str(cfg.paths.checkpoints),
        num_train_epochs=t.epochs,
        max_steps=t.max_steps if t.max_steps else -1,
        per_device_train_batch_size=t.per_device_batch_size,
        per_device_eval_batch_size=t.per_device_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_steps if t.warmup_steps else t.warmup_ratio,
        weight_decay=t.weight_decay,
        optim=t.optimizer,
        max_grad_norm=t.max_grad_norm,
        gradient_checkpointing=t.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if t.gradient_checkpointing else None,
        logging_steps=t.logging_steps,
        logging_first_step=True,
        # A NaN must reach the divergence guard, not be averaged away.
        logging_nan_inf_filter=False,
        save_strategy="steps",
        save_steps=t.save_steps,
        # Rotation happens in CheckpointCallback, after the COMPLETE marker.
        save_total_limit=None,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=eval_steps if has_eval else None,
        load_best_model_at_end=has_eval,
        metric_for_best_model=metric if has_eval else None,
        greater_is_better=(not metric.endswith("loss")) if has_eval else None,
        seed=t.seed,
        data_seed=t.seed,
        bf16=precision.effective == "bf16",
        fp16=precision.effective == "fp16",
        use_cpu=use_cpu,
        ddp_backend="gloo" if use_cpu and int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
        # How long a collective may wait for a lost node before the group fails and re-forms
        # (the launcher sets it; transformers' default is 1,800 s).
        ddp_timeout=int(os.environ.get("FINETUNE_COLLECTIVE_TIMEOUT_SECONDS", "1800")),
        # Every trainable weight takes part in each step (LoRA or full), so DDP need not search.
        ddp_find_unused_parameters=False,
        report_to="none",
        include_num_input_tokens_seen="non_padding",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    kwargs.update(sharded)
    return kwargs


def records_dataset(records: list[dict]):
    """A `datasets.Dataset` of `records` with the union of their keys as columns.

    `Dataset.from_list` takes its columns from the first record only: a key that only later
    records have (a `tools` list, a `system` prompt) was dropped without a word. Records
    lacking a key get None for it."""
    from datasets import Dataset

    columns: dict[str, None] = {}
    for record in records:
        for key in record:
            columns.setdefault(key, None)
    if not records or all(len(r) == len(columns) for r in records):
        return Dataset.from_list(records)
    return Dataset.from_list([{key: record.get(key) for key in columns} for record in records])
