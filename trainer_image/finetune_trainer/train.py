"""`finetune-trainer train`: from a TrainerConfig to checkpoints, artifacts and reports.

The run, in order: check the method fits this device (QLoRA needs CUDA), load the
tokenizer, prepare the dataset once (rank 0 writes a cache keyed by content hash, other
ranks wait and read it), load the model, resume from the newest complete checkpoint,
train with TRL's SFTTrainer, then (rank 0) evaluate and write artifacts and reports.

Guards that end a run: NaN/inf or a loss spike (permanent, exit 42); SIGTERM (the
current step finishes, a checkpoint is written, exit 43 so the Job restarts or the
suspend stops it).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import signal
import tempfile
import time
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import Any

from . import checkpoints
from .config import ConfigError, TrainerConfig

log = logging.getLogger(__name__)

# Test hooks (never set in a pod): slow each step down so a test can kill mid-run,
# or make the loss NaN from a given step on.
ENV_STEP_DELAY = "FINETUNE_TEST_STEP_DELAY"
ENV_NAN_AT_STEP = "FINETUNE_TEST_NAN_AT_STEP"


class TrainingDiverged(RuntimeError):
    """NaN/inf or exploding loss: retrying the same config gives the same result (permanent)."""


class TerminationRequested(RuntimeError):
    """SIGTERM arrived (preemption, suspend, drain): retryable once restarted."""


@dataclass
class PreparedData:
    train: list[dict]
    eval: list[dict]
    report: Any
    digest: str


# ---------------------------------------------------------------- decisions

def choose_packing(mode: str, *, cuda: bool) -> bool:
    """`auto` packs only where it is faster: with CUDA. On CPU, without variable-length
    attention kernels, packed rows make attention dearer (measured 0.65-0.73x the
    throughput of dynamic padding; see bench/bench_trainer.py)."""
    if mode == "on":
        return True
    if mode == "off":
        return False
    return cuda


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


# ---------------------------------------------------------------- dataset

def _hash_source(digest: "hashlib._Hash", source: str | None) -> None:
    if not source:
        return
    digest.update(source.encode())
    path = Path(source)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if not file.is_file():
            continue  # a hub dataset: the config (name, split) is the key
        digest.update(str(file.relative_to(path) if path.is_dir() else file.name).encode())
        with open(file, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)


def dataset_digest(cfg: TrainerConfig) -> str:
    """Content hash of everything that shapes the prepared dataset."""
    from finetune_api.models import to_dict

    digest = hashlib.sha256()
    digest.update(json.dumps({
        "dataset": to_dict(cfg.dataset),
        "seed": cfg.training.seed,
        "maxSeqLength": cfg.training.max_seq_length,
        "model": cfg.model.source,
        "revision": cfg.model.revision,
    }, sort_keys=True).encode())
    resolve = cfg.paths.resolve
    _hash_source(digest, resolve(cfg.dataset.source))
    _hash_source(digest, resolve(cfg.dataset.eval_source) if cfg.dataset.eval_source else None)
    _hash_source(digest, resolve(cfg.dataset.mix.source) if cfg.dataset.mix else None)
    return digest.hexdigest()[:20]


def _jsonable(value: Any) -> Any:
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if is_dataclass(value):
        return asdict(value)
    return value


def _write_jsonl(path: Path, records: list[dict]) -> None:
    with open(path, "w") as fh:
        for record in records:
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")


def _read_jsonl(path: Path) -> list[dict]:
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def prepare_data(cfg: TrainerConfig, tokenizer, *, is_main: bool) -> PreparedData:
    """Prepare the dataset, or read the cache another rank (or an earlier attempt) wrote.

    Callers run this under `main_process_first`: the main process builds the cache, the
    others find it ready.
    """
    digest = dataset_digest(cfg)
    cache = cfg.paths.data_cache / digest
    ready = cache / "READY"
    if not ready.is_file():
        if not is_main:
            raise RuntimeError(f"the prepared dataset {cache} is missing after the main process ran")
        from .data import prepare_dataset

        from .data import DataValidationError

        try:
            prepared = prepare_dataset(cfg.dataset, seed=cfg.training.seed,
                                       max_seq_length=cfg.training.max_seq_length,
                                       tokenizer=tokenizer, resolve=cfg.paths.resolve)
        except DataValidationError as exc:
            _report_unusable_dataset(cfg, exc)
            raise
        cache.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{digest}.", dir=cache.parent))
        _write_jsonl(staging / "train.jsonl", list(prepared.train))
        _write_jsonl(staging / "eval.jsonl", list(prepared.eval))
        (staging / "report.json").write_text(json.dumps(_jsonable(prepared.report), indent=2, default=str))
        (staging / "READY").write_text(digest + "\n")
        if cache.exists():
            shutil.rmtree(cache)
        staging.rename(cache)
        cfg.paths.reports.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(cache / "report.json", cfg.paths.reports / "dataset.json")
        log.info("prepared dataset %s: %d train, %d eval records", digest,
                 len(prepared.train), len(prepared.eval))
    else:
        log.info("using the prepared dataset cache %s", cache)
    return PreparedData(
        train=_read_jsonl(cache / "train.jsonl"),
        eval=_read_jsonl(cache / "eval.jsonl"),
        report=json.loads((cache / "report.json").read_text()),
        digest=digest,
    )


def _report_unusable_dataset(cfg: TrainerConfig, exc) -> None:
    """Put the line-numbered errors of an unusable dataset into the FineTuneJob's status."""
    from .reporting import StatusPatcher, dataset_status

    cfg.paths.reports.mkdir(parents=True, exist_ok=True)
    report = exc.report.to_dict()
    (cfg.paths.reports / "dataset.json").write_text(json.dumps(_jsonable(report), indent=2, default=str))
    if cfg.reporting.status_patch:
        StatusPatcher(cfg.job, 0).patch({"status": {"dataset": dataset_status(report)}})


# ---------------------------------------------------------------- trainer pieces

def build_sft_config(cfg: TrainerConfig, precision, *, has_eval: bool, kind: str, tokenizer,
                     packing: bool):
    import torch
    from trl import SFTConfig

    t = cfg.training
    eval_steps = t.eval_steps or t.save_steps
    if has_eval and t.save_steps % eval_steps:
        # load_best_model_at_end needs every save to follow an evaluation.
        eval_steps = math.gcd(eval_steps, t.save_steps)
        log.warning("training.evalSteps %s does not divide saveSteps %s; evaluating every %s steps",
                    t.eval_steps, t.save_steps, eval_steps)
    metric = t.metric_for_best_model
    assistant_only = kind == "messages" and template_supports_assistant_mask(tokenizer)
    if kind == "messages" and not assistant_only:
        log.warning("the chat template has no {%% generation %%} tags; training on whole conversations")
    use_cpu = not torch.cuda.is_available()
    kwargs: dict[str, Any] = dict(
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
        # Every trainable weight takes part in each step (LoRA or full), so DDP need not search.
        ddp_find_unused_parameters=False,
        report_to="none",
        include_num_input_tokens_seen="non_padding",
        disable_tqdm=True,
        dataloader_num_workers=0,
        # SFTConfig
        max_length=t.max_seq_length,
        packing=packing,
        completion_only_loss=True if kind == "prompt-completion" else None,
        assistant_only_loss=assistant_only,
        dataset_text_field="text",
    )
    if kind == "messages" and not assistant_only:
        kwargs["completion_only_loss"] = None
    return SFTConfig(**kwargs)


def make_trainer(model, args, tokenizer, train: list[dict], evals: list[dict], callbacks=()):
    """TRL's SFTTrainer over TRL-shaped records (it tokenizes and builds the label masks)."""
    from datasets import Dataset
    from trl import SFTTrainer

    return SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(train),
        eval_dataset=Dataset.from_list(evals) if evals else None,
        processing_class=tokenizer,
        callbacks=list(callbacks),
    )


def _callbacks(cfg: TrainerConfig, reporter, has_eval: bool, guard: "SignalGuard"):
    from transformers import EarlyStoppingCallback, TrainerCallback

    def is_main(state) -> bool:
        return state.is_world_process_zero

    class DivergenceGuard(TrainerCallback):
        """Stops on NaN/inf loss or a spike beyond loss_spike_factor x the running minimum."""

        def __init__(self):
            self.running_min = math.inf

        def on_log(self, args, state, control, logs=None, **kwargs):
            loss = (logs or {}).get("loss")
            if loss is None:
                return
            if not math.isfinite(loss):
                raise TrainingDiverged(
                    f"training loss became {loss} at step {state.global_step}; lower "
                    f"training.learningRate (now {cfg.training.learning_rate}) or check the data")
            factor = cfg.training.loss_spike_factor
            if factor and self.running_min < math.inf and loss > factor * self.running_min:
                raise TrainingDiverged(
                    f"training loss spiked to {loss:.4g} at step {state.global_step}, over "
                    f"{factor:g}x its minimum {self.running_min:.4g}; lower training.learningRate "
                    f"(now {cfg.training.learning_rate}) or raise training.lossSpikeFactor")
            self.running_min = min(self.running_min, loss)

    class StopOnSignal(TrainerCallback):
        """SIGTERM: finish this step, save a checkpoint, stop (all ranks together)."""

        def on_step_end(self, args, state, control, **kwargs):
            delay = float(os.environ.get(ENV_STEP_DELAY, "0") or 0)
            if delay:
                time.sleep(delay)
            if guard.any_rank_requested():
                log.warning("termination requested: saving a checkpoint at step %d and stopping",
                            state.global_step)
                control.should_save = True
                control.should_training_stop = True
                control.should_evaluate = False
            return control

    class CheckpointCallback(TrainerCallback):
        """Marks each checkpoint COMPLETE once every rank finished writing it, then rotates."""

        def on_save(self, args, state, control, **kwargs):
            _barrier()
            if is_main(state):
                folder = Path(args.output_dir) / f"{checkpoints.CHECKPOINT_PREFIX}{state.global_step}"
                checkpoints.mark_complete(folder, step=state.global_step)
                checkpoints.rotate(args.output_dir, keep_last=cfg.training.save_total_limit,
                                   best=state.best_model_checkpoint)
                if reporter is not None:
                    reporter.progress.latest_checkpoint = folder.name
                    reporter.progress.checkpoint_count = sum(
                        1 for c in checkpoints.list_checkpoints(args.output_dir)
                        if (c.path / checkpoints.COMPLETE_MARKER).is_file())
                    reporter.publish(force=True)
            _barrier()

    class ReportCallback(TrainerCallback):
        def __init__(self):
            self.last_tokens = None
            self.last_time = None

        def on_train_begin(self, args, state, control, **kwargs):
            p = reporter.progress
            p.total_steps = state.max_steps
            p.step = p.start_step = state.global_step
            p.started_at = time.monotonic()
            reporter.publish(force=True)

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
            p = reporter.progress
            p.step, p.epoch = state.global_step, state.epoch or 0.0
            if "loss" in logs:
                p.train_loss = logs["loss"]
            if "learning_rate" in logs:
                p.learning_rate = logs["learning_rate"]
            if "eval_loss" in logs:
                p.eval_loss = logs["eval_loss"]
            now, tokens = time.monotonic(), state.num_input_tokens_seen
            if self.last_time is not None and tokens and now > self.last_time:
                p.tokens_per_second = round((tokens - self.last_tokens) / (now - self.last_time), 1)
            self.last_time, self.last_tokens = now, tokens
            reporter.publish()

        def on_train_end(self, args, state, control, **kwargs):
            reporter.progress.step = state.global_step
            reporter.publish(force=True)

    callbacks = [DivergenceGuard(), StopOnSignal(), CheckpointCallback()]
    if reporter is not None:
        callbacks.append(ReportCallback())
    es = cfg.training.early_stopping
    if es is not None:
        if has_eval:
            callbacks.append(EarlyStoppingCallback(early_stopping_patience=es.patience,
                                                   early_stopping_threshold=es.threshold))
        else:
            log.warning("training.earlyStopping needs an eval set (dataset.evalFraction or evalSource); ignored")
    return callbacks


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


class SignalGuard:
    """Turns SIGTERM into a flag the training loop checks after each step.

    Before the loop runs there is no step to finish, so SIGTERM ends the run at once.
    """

    def __init__(self):
        self.requested = False
        self.in_loop = False
        self._previous = None

    def install(self) -> None:
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.requested = True
        if not self.in_loop:
            raise TerminationRequested("SIGTERM before training started")

    def any_rank_requested(self) -> bool:
        import torch
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            flag = torch.tensor([1 if self.requested else 0], dtype=torch.int64,
                                device="cuda" if dist.get_backend() == "nccl" else "cpu")
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            self.requested = bool(flag.item())
        return self.requested


def _install_nan_hook(model) -> None:
    """Test hook: from the Nth training forward pass on, activations (so the loss) are NaN,
    as in a diverging run."""
    at = int(os.environ.get(ENV_NAN_AT_STEP, "0") or 0)
    if not at:
        return
    calls = {"n": 0}

    def hook(module, args, output):
        if module.training:
            calls["n"] += 1
        if calls["n"] >= at:
            return output * float("nan")
        return output

    model.get_input_embeddings().register_forward_hook(hook)


# ---------------------------------------------------------------- the run

def run(cfg: TrainerConfig) -> dict[str, Any]:
    """Train as the config says; return the run summary (rank 0) or {} (other ranks)."""
    import torch

    from .model import check_method_supported, load_model, load_tokenizer, resolve_precision
    from .reporting import Reporter

    guard = SignalGuard()
    guard.install()
    check_method_supported(cfg.method)
    precision = resolve_precision(cfg.training.precision)
    cuda = torch.cuda.is_available()
    packing = choose_packing(cfg.training.packing, cuda=cuda)
    rank = int(os.environ.get("RANK", "0"))
    is_main = rank == 0
    log.info("method %s, precision %s (asked %s), packing %s (%s), device %s, world size %s",
             cfg.method.type, precision.effective, precision.requested, packing, cfg.training.packing,
             "cuda" if cuda else "cpu", os.environ.get("WORLD_SIZE", "1"))

    tokenizer = load_tokenizer(cfg)
    # Only the first SFTConfig sets up torch.distributed; it needs the data's kind first,
    # so the kind is read from a cheap probe of the config's format.
    kind = {"chat": "messages", "text": "text"}.get(cfg.dataset.format, "prompt-completion")
    probe_args = build_sft_config(cfg, precision, has_eval=False, kind=kind, tokenizer=tokenizer,
                                  packing=packing)
    with probe_args.main_process_first(local=False, desc="prepare dataset"):
        data = prepare_data(cfg, tokenizer, is_main=is_main)
        resume = checkpoints.find_resumable(cfg.paths.checkpoints, quarantine_bad=is_main)
    if not data.train:
        raise ConfigError("the prepared dataset has no training records")
    kind = data_kind(data.train)
    has_eval = bool(data.eval)
    args = build_sft_config(cfg, precision, has_eval=has_eval, kind=kind, tokenizer=tokenizer,
                            packing=packing)

    reporter = Reporter(cfg.reporting, cfg.job) if is_main else None
    if reporter is not None:
        from .reporting import dataset_status

        reporter.progress.dataset = dataset_status(data.report)
        reporter.publish(force=True)
    try:
        model = load_model(cfg, precision)
        _install_nan_hook(model)
        trainer = make_trainer(model, args, tokenizer, data.train, data.eval,
                               callbacks=_callbacks(cfg, reporter, has_eval, guard))
        if resume is not None:
            log.info("resuming from %s (step %d)", resume.path, resume.step)
        guard.in_loop = True
        started = time.monotonic()
        result = trainer.train(resume_from_checkpoint=str(resume.path) if resume else None)
        guard.in_loop = False
        if guard.requested:
            raise TerminationRequested(
                f"stopped by SIGTERM after saving checkpoint-{trainer.state.global_step}")
        train_seconds = time.monotonic() - started
        eval_metrics = trainer.evaluate() if has_eval else {}
        _barrier()
        if not is_main:
            return {}
        return _finish(cfg, trainer, tokenizer, data, result, eval_metrics, train_seconds,
                       precision, packing, resume, reporter)
    finally:
        if reporter is not None:
            reporter.close()


def _finish(cfg, trainer, tokenizer, data, result, eval_metrics, train_seconds, precision, packing,
            resume, reporter) -> dict[str, Any]:
    from . import artifacts, evaluate

    model = trainer.model
    artifact_paths = artifacts.save(cfg, model, tokenizer)
    eval_report = evaluate.evaluate_run(cfg, model, tokenizer, eval_metrics=eval_metrics,
                                        base_loader=None)
    state = trainer.state
    summary = {
        "reason": "Succeeded",
        "message": f"trained {state.global_step} steps",
        "step": state.global_step,
        "totalSteps": state.max_steps,
        "epoch": state.epoch,
        "trainLoss": result.training_loss,
        "evalLoss": eval_metrics.get("eval_loss"),
        "perplexity": eval_report.get("perplexity"),
        "trainSeconds": round(train_seconds, 2),
        "tokensSeen": state.num_input_tokens_seen,
        "resumedFrom": resume.path.name if resume else None,
        "bestCheckpoint": Path(state.best_model_checkpoint).name if state.best_model_checkpoint else None,
        "precision": precision.effective,
        "packing": packing,
        "datasetHash": data.digest,
        "trainRecords": len(data.train),
        "evalRecords": len(data.eval),
        "artifacts": {k: str(v) for k, v in artifact_paths.items()},
    }
    artifacts.write_model_card(cfg, summary, eval_report)
    cfg.paths.reports.mkdir(parents=True, exist_ok=True)
    (cfg.paths.reports / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    if reporter is not None and eval_metrics.get("eval_loss") is not None:
        reporter.progress.eval_loss = eval_metrics["eval_loss"]
        reporter.publish(force=True)
    return summary
