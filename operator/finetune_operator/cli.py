"""`finetune-operator`: run the operator against KUBECONFIG or the in-cluster config.

`finetune-operator api ...` serves OpenAI's fine-tuning API instead (package
`finetune_openai`, imported only then: it needs the trainer's data validator, so it runs from
the trainer image).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from finetune_operator import settings


def build_parser() -> argparse.ArgumentParser:
    defaults = settings.OperatorConfig.from_env()
    p = argparse.ArgumentParser(prog="finetune-operator", description=__doc__)
    p.add_argument("--namespace", action="append", default=[], dest="namespaces",
                   help="watch only this namespace (repeatable; default: all namespaces)")
    p.add_argument("--metrics-port", type=int, default=defaults.metrics_port,
                   help="port of /metrics (0 disables; default %(default)s)")
    p.add_argument("--liveness-port", type=int, default=defaults.liveness_port,
                   help="port of the /healthz liveness endpoint (0 disables; default %(default)s)")
    p.add_argument("--log-level", default=defaults.log_level,
                   choices=["DEBUG", "INFO", "WARNING", "ERROR"], type=str.upper)
    p.add_argument("--gpu-hour-price", type=float, default=defaults.gpu_hour_price,
                   help="price of one GPU hour, for status.estimatedCost (default %(default)s)")
    p.add_argument("--trainer-image", default=defaults.trainer_image,
                   help="trainer image when spec.resources.image is unset (default %(default)s)")
    p.add_argument("--vllm-image", default=defaults.vllm_image,
                   help="vLLM image when an InferenceService sets no spec.vllm.image (default %(default)s)")
    p.add_argument("--resync-seconds", type=float, default=defaults.resync_seconds,
                   help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["api"]:
        from finetune_openai.cli import main as api_main

        return api_main(argv[1:])
    args = build_parser().parse_args(argv)
    settings.current = settings.OperatorConfig(
        namespaces=args.namespaces, metrics_port=args.metrics_port, liveness_port=args.liveness_port,
        log_level=args.log_level, gpu_hour_price=args.gpu_hour_price, trainer_image=args.trainer_image,
        vllm_image=args.vllm_image,
        resync_seconds=args.resync_seconds)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import kopf

    import finetune_operator.main  # noqa: F401 - registers the handlers with the settings above

    liveness = f"http://0.0.0.0:{args.liveness_port}/healthz" if args.liveness_port else None
    try:
        asyncio.run(kopf.operator(
            clusterwide=not args.namespaces, namespaces=args.namespaces,
            liveness_endpoint=liveness, standalone=True))
    except KeyboardInterrupt:
        pass
    return 0
