"""`finetune-trainer` / `python -m finetune_trainer`.

    finetune-trainer train --config /etc/finetune/config.json
    finetune-trainer launch --config ... --nproc-per-node G [--nnodes N --rdzv-endpoint H:P ...]
    finetune-trainer validate-data ...        (see finetune_trainer.data)
    finetune-trainer evaluate --config /etc/finetune/config.json
    finetune-trainer compare --config /etc/finetune/config.json [--gpu-hour-price P --gpus N]

Every failure ends with an exit code the Job's podFailurePolicy acts on (42 permanent:
bad config or data, a diverging run; 43 retryable: anything else, including SIGTERM)
and a JSON summary in the termination log. Heavy libraries load only inside commands.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import shutil
import sys
import traceback
from typing import Any, Callable

from . import exitcodes
from .config import ConfigError, TrainerConfig

log = logging.getLogger("finetune_trainer")


def _setup_logging() -> None:
    rank = os.environ.get("RANK")
    prefix = f"[rank {rank}] " if rank is not None and os.environ.get("WORLD_SIZE", "1") != "1" else ""
    logging.basicConfig(
        level=os.environ.get("FINETUNE_LOG_LEVEL", "INFO"),
        format=f"%(asctime)s %(levelname)s {prefix}%(name)s: %(message)s",
        stream=sys.stderr,
    )


def classify(exc: BaseException) -> tuple[int, str]:
    """(exit code, reason) for an exception that ended a command."""
    from .train import TerminationRequested, TrainingDiverged

    if isinstance(exc, TrainingDiverged):
        return exitcodes.PERMANENT, "TrainingDiverged"
    if isinstance(exc, ConfigError):
        name = type(exc).__name__
        return exitcodes.PERMANENT, "DataValidationFailed" if name == "DataValidationError" else "InvalidConfig"
    from .fetch import SourceUnavailable
    from .model import GPUUnavailable

    if isinstance(exc, GPUUnavailable):
        return exitcodes.PERMANENT, "GPUUnavailable"
    if isinstance(exc, SourceUnavailable):
        return exitcodes.RETRYABLE, "SourceUnavailable"
    if isinstance(exc, TerminationRequested):
        return exitcodes.RETRYABLE, "Terminated"
    if isinstance(exc, KeyboardInterrupt):
        return exitcodes.RETRYABLE, "Interrupted"
    return exitcodes.RETRYABLE, "Error"


def _is_main_rank() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _guarded(command: Callable[[], dict[str, Any]]) -> int:
    from .reporting import write_termination_message

    try:
        summary = command() or {}
    except (Exception, KeyboardInterrupt) as exc:  # noqa: BLE001 - every failure gets an exit code
        code, reason = classify(exc)
        full = _no_space_left(exc) if code == exitcodes.RETRYABLE else None
        if full:
            reason, exc = "NoSpaceLeft", RuntimeError(f"{full}: {exc}")
        if code == exitcodes.PERMANENT:
            log.error("%s: %s", reason, exc)
        else:
            log.error("%s: %s\n%s", reason, exc, traceback.format_exc())
        write_termination_message({"reason": reason, "message": str(exc), "exitCode": code,
                                   "step": _last_step()})
        if code == exitcodes.PERMANENT:
            from .launch import freeze_agent_on_permanent_failure

            freeze_agent_on_permanent_failure()
        return code
    if _is_main_rank():
        summary.setdefault("reason", "Succeeded")
        summary.setdefault("exitCode", exitcodes.SUCCESS)
        write_termination_message({k: summary.get(k) for k in
                                   ("reason", "message", "exitCode", "step", "trainLoss", "evalLoss",
                                    "perplexity") if summary.get(k) is not None})
    return exitcodes.SUCCESS


def _no_space_left(exc: BaseException) -> str | None:
    """Why the job volume is full, when it is; None otherwise.

    torch.save reports a full disk as "enforce fail ... unexpected pos", without ENOSPC, so
    the volume itself is asked too: less room left than the newest checkpoint takes.
    """
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno == errno.ENOSPC:
            return "no space left on device"
        seen = seen.__cause__ or seen.__context__
    config = os.environ.get("_FINETUNE_CONFIG_PATH")
    if not config:
        return None
    try:
        from .checkpoints import find_resumable

        root = TrainerConfig.load(config).paths.checkpoints
        latest = find_resumable(root, quarantine_bad=False)
        if latest is None:
            return None
        needed = sum(p.stat().st_size for p in latest.path.rglob("*") if p.is_file())
        free = shutil.disk_usage(root).free
    except Exception:  # noqa: BLE001 - a best-effort diagnosis
        return None
    if free >= needed:
        return None
    return (f"no space left on the job volume: {free} bytes free under {root}, a checkpoint "
            f"takes {needed}; enlarge spec.storage.size or lower training.saveTotalLimit")


def _last_step() -> int | None:
    """The newest complete checkpoint's step, for the termination message."""
    config = os.environ.get("_FINETUNE_CONFIG_PATH")
    if not config:
        return None
    try:
        from .checkpoints import find_resumable

        latest = find_resumable(TrainerConfig.load(config).paths.checkpoints, quarantine_bad=False)
        return latest.step if latest else None
    except Exception:  # noqa: BLE001
        return None


def _load(path: str) -> TrainerConfig:
    os.environ["_FINETUNE_CONFIG_PATH"] = path
    try:
        return TrainerConfig.load(path)
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {path} does not exist") from exc


def cmd_train(args: argparse.Namespace) -> int:
    if args.nproc_per_node and args.nproc_per_node > 1 and "LOCAL_RANK" not in os.environ:
        return launch_workers(args.config, args.nproc_per_node)

    def run() -> dict[str, Any]:
        from .train import run as train

        return train(_load(args.config))

    return _guarded(run)


def launch_workers(config: str, nproc_per_node: int) -> int:
    """`train --nproc-per-node N`: the launcher on one node (see launch.py)."""
    from .launch import LaunchPlan, run

    return run(LaunchPlan(config=config, nproc_per_node=nproc_per_node))


def cmd_launch(args: argparse.Namespace) -> int:
    from .launch import LaunchPlan, run

    node_rank = args.node_rank if args.node_rank is not None else \
        int(os.environ.get("JOB_COMPLETION_INDEX", "0") or 0)
    return run(LaunchPlan(
        config=args.config, nproc_per_node=args.nproc_per_node, nnodes=args.nnodes,
        node_rank=node_rank, rdzv_endpoint=args.rdzv_endpoint, rdzv_id=args.rdzv_id,
        max_restarts=args.max_restarts, grace_seconds=args.grace_seconds,
        local_addr=args.local_addr, join_timeout=args.join_timeout))


def cmd_evaluate(args: argparse.Namespace) -> int:
    def run() -> dict[str, Any]:
        from .evaluate import run as evaluate

        report = evaluate(_load(args.config))
        return {"reason": "Succeeded", "message": "evaluated", "evalLoss": report.get("evalLoss"),
                "perplexity": report.get("perplexity")}

    return _guarded(run)


def cmd_compare(args: argparse.Namespace) -> int:
    def run() -> dict[str, Any]:
        from .compare import run as compare

        return compare(_load(args.config), gpu_hour_price=args.gpu_hour_price, gpus=args.gpus)

    return _guarded(run)


def cmd_validate_data(argv: list[str]) -> int:
    from .data import validate_cli

    return validate_cli(argv)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="finetune-trainer", description="Fine-tune an LLM from a TrainerConfig.")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train as the config says (what the pod runs)")
    train.add_argument("--config", required=True, help="TrainerConfig JSON/YAML file")
    train.add_argument("--nproc-per-node", type=int, default=int(os.environ.get("FINETUNE_NPROC_PER_NODE", "1")),
                       help="worker processes on this node (one per GPU); above 1, runs under torchrun")
    launch = sub.add_parser("launch", help="run `train` under torchrun on this node (one worker per "
                            "GPU; several nodes through an elastic c10d rendezvous) with the pod's "
                            "exit codes, termination message and grace period")
    launch.add_argument("--config", required=True, help="TrainerConfig JSON/YAML file")
    launch.add_argument("--nproc-per-node", type=int, default=1, help="worker processes on this node")
    launch.add_argument("--nnodes", type=int, default=1, help="nodes (pods) in the training group")
    launch.add_argument("--node-rank", type=int, default=None,
                        help="this pod's index (default: $JOB_COMPLETION_INDEX); node 0 hosts the "
                        "rendezvous store")
    launch.add_argument("--rdzv-endpoint", default=None, help="HOST:PORT of node 0's rendezvous store")
    launch.add_argument("--rdzv-id", default="finetune", help="the rendezvous' id (the FineTuneJob's uid)")
    launch.add_argument("--max-restarts", type=int, default=0,
                        help="times the group may re-form (a node lost or replaced) before the pod fails")
    launch.add_argument("--grace-seconds", type=int, default=110,
                        help="how long workers get after SIGTERM to checkpoint (the pod's grace period)")
    launch.add_argument("--local-addr", default=None, help="this node's address as the others reach it")
    launch.add_argument("--join-timeout", type=int, default=900,
                        help="seconds the rendezvous waits for every node (a replacement pod) to join")
    sub.add_parser("validate-data", help="validate a dataset without training (see its own --help)",
                   add_help=False)
    evaluate = sub.add_parser("evaluate", help="evaluate the artifacts of a finished run")
    evaluate.add_argument("--config", required=True, help="TrainerConfig JSON/YAML file")
    compare = sub.add_parser("compare", help="base vs fine-tuned through one vLLM server "
                             "(quality, latency, tokens/s, cost): comparison.json, status.comparison")
    compare.add_argument("--config", required=True, help="TrainerConfig JSON/YAML file")
    compare.add_argument("--gpu-hour-price", type=float, default=0.0,
                         help="price of one GPU hour; 0: no cost column")
    compare.add_argument("--gpus", type=int, default=0, help="GPUs the server runs on (0: CPUs, priced as one)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _setup_logging()
    if argv and argv[0] == "validate-data":
        return cmd_validate_data(argv[1:])
    args = build_parser().parse_args(argv)
    if args.command == "train":
        return cmd_train(args)
    if args.command == "launch":
        return cmd_launch(args)
    if args.command == "compare":
        return cmd_compare(args)
    return cmd_evaluate(args)
