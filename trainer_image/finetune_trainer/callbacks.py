"""Trainer callbacks every objective uses, and the SIGTERM guard they rely on.

DivergenceGuard (NaN/inf or a loss spike: permanent), StopOnSignal (SIGTERM: finish the
step, checkpoint, stop), CheckpointCallback (COMPLETE marker after every rank wrote, then
rotation), ReportCallback (progress to the status patch and Prometheus; an objective's own
metrics through its MetricSpecs), and transformers' EarlyStoppingCallback when asked for.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import time
from pathlib import Path
from typing import Sequence

from . import checkpoints
from .config import TrainerConfig
from .results import write_results

log = logging.getLogger(__name__)

# Test hook (never set in a pod): slow each step down so a test can kill mid-run.
ENV_STEP_DELAY = "FINETUNE_TEST_STEP_DELAY"


class TrainingDiverged(RuntimeError):
    """NaN/inf or exploding loss: retrying the same config gives the same result (permanent)."""


class TerminationRequested(RuntimeError):
    """SIGTERM arrived (preemption, suspend, drain): retryable once restarted."""


class LossSpikeDetector:
    """A spike is a logged loss above `factor` x the median of the recent logged losses *and*
    above the first logged loss. Against the running minimum (as before), a healthy multi-epoch
    run failed: late in training the loss is tiny and one harder batch is many times it. A run
    that diverges climbs back above where it started; one that learns does not."""

    WINDOW = 20

    def __init__(self, factor: float) -> None:
        self.factor = factor
        self.first: float | None = None
        self.recent: list[float] = []

    def observe(self, loss: float) -> str | None:
        """Record `loss`; the reason it is a spike, or None."""
        reason = None
        if self.factor and self.first is not None and len(self.recent) >= 3:
            median = sorted(self.recent)[len(self.recent) // 2]
            if loss > self.factor * median and loss > self.first:
                reason = (f"over {self.factor:g}x the median {median:.4g} of the last {len(self.recent)} "
                          f"logged losses and above the first logged loss {self.first:.4g}")
        if self.first is None:
            self.first = loss
        self.recent = (self.recent + [loss])[-self.WINDOW:]
        return reason


def barrier() -> None:
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


def make_callbacks(cfg: TrainerConfig, reporter, has_eval: bool, guard: SignalGuard,
                   metric_specs: Sequence = ()):
    """The callbacks of a run; `metric_specs` (objectives.MetricSpec) route an objective's own
    logged values (e.g. DPO's rewards/margins) into the reporter's progress."""
    from transformers import EarlyStoppingCallback, TrainerCallback

    def is_main(state) -> bool:
        return state.is_world_process_zero

    class DivergenceGuard(TrainerCallback):
        """Stops on NaN/inf loss or a spike (LossSpikeDetector, loss_spike_factor)."""

        def __init__(self):
            self.spikes = LossSpikeDetector(cfg.training.loss_spike_factor)

        def on_log(self, args, state, control, logs=None, **kwargs):
            loss = (logs or {}).get("loss")
            if loss is None:
                return
            if not math.isfinite(loss):
                raise TrainingDiverged(
                    f"training loss became {loss} at step {state.global_step}; lower "
                    f"training.learningRate (now {cfg.training.learning_rate}) or check the data")
            spike = self.spikes.observe(loss)
            if spike:
                raise TrainingDiverged(
                    f"training loss spiked to {loss:.4g} at step {state.global_step}, {spike}; lower "
                    f"training.learningRate (now {cfg.training.learning_rate}) or raise "
                    "training.lossSpikeFactor")

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
            barrier()
            if is_main(state):
                folder = Path(args.output_dir) / f"{checkpoints.CHECKPOINT_PREFIX}{state.global_step}"
                checkpoints.mark_complete(folder, step=state.global_step)
                checkpoints.rotate(args.output_dir, keep_last=cfg.training.save_total_limit,
                                   best=state.best_model_checkpoint)
                write_results(cfg, state.log_history)
                if reporter is not None:
                    reporter.progress.latest_checkpoint = folder.name
                    reporter.progress.kept_checkpoints = checkpoints.kept_summary(args.output_dir)
                    reporter.progress.checkpoint_count = sum(
                        1 for c in checkpoints.list_checkpoints(args.output_dir)
                        if (c.path / checkpoints.COMPLETE_MARKER).is_file())
                    reporter.progress.tokens_seen = state.num_input_tokens_seen or 0
                    reporter.publish(force=True)
            barrier()

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
            for spec in metric_specs:
                value = logs.get(spec.log_key)
                if isinstance(value, (int, float)):
                    p.objective_metrics[spec.status_key] = float(value)
            now, tokens = time.monotonic(), state.num_input_tokens_seen
            p.tokens_seen = tokens or 0
            # The rate between two training logs. An evaluation log (same step, same token
            # count) used to set it to 0 just before the end, which status kept (issue 14).
            if tokens and (self.last_tokens is None or tokens > self.last_tokens):
                if self.last_time is not None and now > self.last_time:
                    p.tokens_per_second = round((tokens - (self.last_tokens or 0)) / (now - self.last_time), 1)
                self.last_time, self.last_tokens = now, tokens
            reporter.log_step(logs, state.global_step)
            reporter.publish()

        def on_train_end(self, args, state, control, **kwargs):
            reporter.progress.step = state.global_step
            reporter.progress.tokens_seen = state.num_input_tokens_seen or 0
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
