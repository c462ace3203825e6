"""`finetune-trainer train`: from a TrainerConfig to checkpoints, artifacts and reports.

The run, in order: check the method fits this device (QLoRA needs CUDA), pick the training
objective (`method.objective`, see objectives/), load the tokenizer, prepare the dataset
once (rank 0 writes a cache keyed by content hash, other ranks wait and read it; see
prepared.py), load the model, resume from the newest complete checkpoint, train with the
objective's TRL trainer, then (rank 0) evaluate and write artifacts and reports.

Guards that end a run (callbacks.py): NaN/inf or a loss spike (permanent, exit 42); SIGTERM
(the current step finishes, a checkpoint is written, exit 43 so the Job restarts or the
suspend stops it).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from . import checkpoints, evaluate
from .callbacks import (ENV_STEP_DELAY, SignalGuard, TerminationRequested, TrainingDiverged,
                        barrier as _barrier, make_callbacks)
from .config import ConfigError, TrainerConfig
from .objectives import get_objective
from .objectives.sft import (build_sft_config, data_kind, make_sft_trainer,
                             template_supports_assistant_mask)
from .prepared import PreparedData, dataset_digest, prepare_data
from .results import write_results

log = logging.getLogger(__name__)

# Test hook (never set in a pod): make the loss NaN from a given step on.
ENV_NAN_AT_STEP = "FINETUNE_TEST_NAN_AT_STEP"

__all__ = [
    "ENV_NAN_AT_STEP", "ENV_STEP_DELAY", "PreparedData", "SignalGuard", "TerminationRequested",
    "TrainingDiverged", "build_sft_config", "choose_packing", "data_kind", "dataset_digest",
    "make_trainer", "prepare_data", "run", "template_supports_assistant_mask",
]


def choose_packing(mode: str, *, cuda: bool, varlen: bool = False) -> bool:
    """`auto` packs only where it is faster: on CUDA with a variable-length attention kernel
    (flash-attn; model.varlen_attention). Without one, padding-free packing builds a
    block-diagonal mask over SDPA: no flash backend, and a (B*L)^2 mask (4.3 GB at batch 8 x
    8192); on CPU packed rows measured 0.65-0.73x the throughput of dynamic padding
    (bench/bench_trainer.py). `on` packs anyway."""
    if mode == "on":
        return True
    if mode == "off":
        return False
    return cuda and varlen


def make_trainer(model, args, tokenizer, train: list[dict], evals: list[dict], callbacks=()):
    """TRL's SFTTrainer (kept for callers of the SFT-only API; runs use the objective)."""
    return make_sft_trainer(model, args, tokenizer, train, evals, callbacks)


def _callbacks(cfg: TrainerConfig, reporter, has_eval: bool, guard: SignalGuard, metric_specs=()):
    return make_callbacks(cfg, reporter, has_eval, guard, metric_specs)


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

    from .model import check_method_supported, load_tokenizer, resolve_precision
    from .reporting import Reporter

    from .model import check_gpus_usable

    check_gpus_usable()  # before anything is downloaded or loaded
    guard = SignalGuard()
    guard.install()
    check_method_supported(cfg.method)
    objective = get_objective(cfg.method.objective)
    objective.check(cfg)
    precision = resolve_precision(cfg.training.precision)
    cuda = torch.cuda.is_available()
    from .model import varlen_attention

    packing = choose_packing(cfg.training.packing, cuda=cuda, varlen=varlen_attention() is not None) \
        and objective.name == "sft"
    rank = int(os.environ.get("RANK", "0"))
    is_main = rank == 0
    log.info("method %s, objective %s, precision %s (asked %s), packing %s (%s), device %s, "
             "world size %s", cfg.method.type, objective.name, precision.effective,
             precision.requested, packing, cfg.training.packing, "cuda" if cuda else "cpu",
             os.environ.get("WORLD_SIZE", "1"))

    from .fetch import fetch_sources

    sources = fetch_sources(cfg, is_main=is_main)  # s3:// and https:// onto the job volume
    tokenizer = load_tokenizer(cfg)
    # Only the first TRL config sets up torch.distributed; it needs the data's kind first,
    # so the kind is read from a cheap probe of the config's format.
    kind = objective.probe_kind(cfg)
    probe_args = objective.build_args(cfg, precision, has_eval=False, kind=kind,
                                      tokenizer=tokenizer, packing=packing)
    with probe_args.main_process_first(local=False, desc="prepare dataset"):
        data = prepare_data(cfg, tokenizer, is_main=is_main)
    resume = checkpoints.agreed_resumable(cfg.paths.checkpoints, is_main=is_main)
    if not data.train:
        raise ConfigError("the prepared dataset has no training records")
    kind = objective.data_kind(data.train)
    has_eval = bool(data.eval)
    args = objective.build_args(cfg, precision, has_eval=has_eval, kind=kind, tokenizer=tokenizer,
                                packing=packing)
    if not cuda and getattr(args, "fsdp", False):
        from .model import enable_fsdp_on_cpu

        enable_fsdp_on_cpu(args)

    reporter = Reporter(cfg.reporting, cfg.job) if is_main else None
    if reporter is not None:
        from .reporting import dataset_status

        reporter.progress.dataset = dataset_status(data.report)
        reporter.progress.sources = sources
        reporter.progress.lm_loss = objective.lm_loss
        from .tracking import Tracking, enabled

        if enabled(cfg.tracking):
            reporter.tracking = Tracking(cfg, resume.step if resume else None)
            reporter.tracking.start(data.digest)
            reporter.progress.tracking = reporter.tracking.status()
        reporter.publish(force=True)
    finished = False
    try:
        model = objective.load_model(cfg, precision)
        _install_nan_hook(model)
        trainer = objective.make_trainer(
            cfg, model, args, tokenizer, data.train, data.eval,
            callbacks=make_callbacks(cfg, reporter, has_eval, guard, objective.metrics))
        if resume is not None:
            log.info("resuming from %s (step %d), chosen by rank 0", resume.path, resume.step)
        guard.in_loop = True
        started = time.monotonic()
        result = trainer.train(resume_from_checkpoint=str(resume.path) if resume else None)
        guard.in_loop = False
        if guard.requested:
            raise TerminationRequested(
                f"stopped by SIGTERM after saving checkpoint-{trainer.state.global_step}")
        train_seconds = time.monotonic() - started
        eval_metrics = trainer.evaluate() if has_eval else {}
        if has_eval and objective.lm_loss:
            eval_metrics.update(evaluate.base_eval_with_trainer(trainer))  # every rank: collective
        from .model import sharding_enabled

        # A sharded model is gathered whole (to rank 0's CPU memory) by every rank together.
        full_state = trainer.accelerator.get_state_dict(trainer.model) if sharding_enabled(cfg) else None
        _barrier()
        if not is_main:
            return {}
        summary = _finish(cfg, objective, trainer, tokenizer, data, result, eval_metrics,
                          train_seconds, precision, packing, resume, reporter, sources, full_state)
        finished = True
        return summary
    finally:
        if reporter is not None:
            if reporter.tracking is not None and not finished:
                reporter.tracking.finish([], None, succeeded=False)
            reporter.close()


def _finish(cfg, objective, trainer, tokenizer, data, result, eval_metrics, train_seconds,
            precision, packing, resume, reporter, sources=(), full_state=None) -> dict[str, Any]:
    from . import artifacts

    model = trainer.model
    artifact_paths = artifacts.save(cfg, model, tokenizer, state_dict=full_state)
    model = evaluate.evaluation_model(cfg, trainer, artifact_paths, sharded=full_state is not None)
    from .renderings import prompt_renderings, write as write_renderings

    renderings = prompt_renderings(tokenizer, data.eval)
    write_renderings(cfg.paths.artifacts, renderings)
    from .chat_templates import write_artifact

    template = write_artifact(cfg.paths.artifacts, tokenizer)  # what vLLM serves with
    if template is not None:
        artifact_paths["chatTemplate"] = template
    reference = getattr(trainer, "finetune_reference", None)
    eval_report = evaluate.evaluate_run(cfg, model, tokenizer, eval_metrics=eval_metrics,
                                        base_loader=(lambda: reference) if reference is not None else None,
                                        eval_records=data.eval)
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
        "peakMemoryBytes": _peak_memory_bytes(),
        "resumedFrom": resume.path.name if resume else None,
        "bestCheckpoint": Path(state.best_model_checkpoint).name if state.best_model_checkpoint else None,
        "precision": precision.effective,
        "packing": packing,
        "datasetHash": data.digest,
        "promptFormat": data.report.get("promptFormat"),  # finetune_api.prompts
        "trainRecords": len(data.train),
        "evalRecords": len(data.eval),
        "objective": objective.name,
        "artifacts": {k: str(v) for k, v in artifact_paths.items()},
        "sources": list(sources),
    }
    # The objective's own metrics: the last logged training values, and the final evaluation's.
    logged = {}
    for entry in state.log_history:
        logged.update({k: v for k, v in entry.items() if isinstance(v, (int, float))})
    objective_metrics = {spec.status_key: logged[spec.log_key] for spec in objective.metrics
                         if spec.log_key in logged}
    eval_objective = {spec.status_key: eval_metrics[f"eval_{spec.log_key}"]
                      for spec in objective.metrics if f"eval_{spec.log_key}" in eval_metrics}
    if objective_metrics:
        summary["objectiveMetrics"] = objective_metrics
    if eval_objective:
        eval_report["objectiveMetrics"] = eval_objective
    from .plots import write_loss_plot

    plot = write_loss_plot(state.log_history, cfg.paths.artifacts / "loss.png",
                           f"{cfg.job.namespace}/{cfg.job.name}: {cfg.model.source}")
    if plot is not None:
        summary["artifacts"]["lossPlot"] = str(plot)
    artifacts.write_model_card(cfg, summary, eval_report)
    write_results(cfg, state.log_history)
    pushed: dict[str, str] = {}
    if cfg.output.push_uri:
        from .push import push

        pushed = push(cfg, artifact_paths)
        summary["push"] = pushed
    cfg.paths.reports.mkdir(parents=True, exist_ok=True)
    (cfg.paths.reports / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    (cfg.paths.reports / "eval.json").write_text(json.dumps(eval_report, indent=2, default=str))
    if reporter is not None and reporter.tracking is not None:
        adapter = artifact_paths.get("adapter") or artifact_paths.get("merged")
        reporter.tracking.finish(
            [cfg.paths.artifacts / "README.md", cfg.paths.artifacts / "loss.png",
             cfg.paths.reports / "summary.json", cfg.paths.reports / "eval.json"],
            Path(adapter) if adapter else None)
        reporter.progress.tracking = reporter.tracking.status()
    if reporter is not None:
        if eval_metrics.get("eval_loss") is not None:
            reporter.progress.eval_loss = eval_metrics["eval_loss"]
        reporter.progress.objective_metrics.update(objective_metrics)
        reporter.progress.evaluation = evaluation_status(eval_report)
        reporter.progress.artifacts = {**artifacts_status(artifact_paths), **pushed}
        if renderings:
            reporter.progress.artifacts["promptRenderings"] = renderings
        if state.best_model_checkpoint:
            reporter.progress.best_checkpoint = str(state.best_model_checkpoint)
        reporter.publish(force=True)
    return summary


def _peak_memory_bytes() -> int:
    """This process's peak: GPU memory allocated by torch on CUDA, resident memory on CPU."""
    import resource

    import torch

    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# status.evaluation keeps the first answers, each cut short (the API server stores the object).
STATUS_SCORES = ("bleu", "rouge1", "rouge2", "rougeL", "exactMatch")
ANSWER_CHARS = 500
MAX_STATUS_ANSWERS = 20


def artifacts_status(artifact_paths: dict[str, Any]) -> dict[str, str]:
    """status.artifacts: the adapter and merged model's paths on the job volume."""
    return {k: str(v) for k, v in artifact_paths.items() if k in ("adapter", "merged")}


def evaluation_status(eval_report: dict[str, Any]) -> dict[str, Any]:
    """status.evaluation from the evaluation report (only what the schema declares)."""
    out: dict[str, Any] = {}
    for key in ("evalLoss", "perplexity", "baseEvalLoss", "basePerplexity"):
        if isinstance(eval_report.get(key), (int, float)):
            out[key] = eval_report[key]
    accuracy = eval_report.get("preferenceAccuracy")
    if accuracy:
        out["preferenceAccuracy"] = {k: v for k, v in accuracy.items() if v is not None}
    if eval_report.get("objectiveMetrics", {}).get("rewardsAccuracy") is not None:
        out["rewardAccuracy"] = eval_report["objectiveMetrics"]["rewardsAccuracy"]
    scores = {model: {k: v for k, v in (eval_report.get("scores") or {}).get(model, {}).items()
                      if k in STATUS_SCORES and isinstance(v, (int, float))}
              for model in ("base", "finetuned")}
    if any(scores.values()):
        out["scores"] = {model: s for model, s in scores.items() if s}
    eval_set = eval_report.get("evalSetScores") or {}
    if eval_set.get("examples"):
        out["evalSetScores"] = {"examples": eval_set["examples"], **{
            model: {k: v for k, v in eval_set.get(model, {}).items() if k in STATUS_SCORES}
            for model in ("base", "finetuned")}}
    answers = eval_report.get("generations") or []
    if answers:
        out["answers"] = [{k: str(g[k])[:ANSWER_CHARS] for k in ("prompt", "reference", "base", "finetuned")
                           if g.get(k) is not None} for g in answers[:MAX_STATUS_ANSWERS]]
    return out
