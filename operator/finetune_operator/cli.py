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
    p.add_argument("--log-format", default="text", choices=["text", "json"],
                   help="text for people; json (one object per line, with the namespace, name and uid "
                        "of the object a line is about) for log pipelines (default %(default)s)")
    p.add_argument("--gpu-hour-price", type=float, default=defaults.gpu_hour_price,
                   help="price of one GPU hour, for status.estimatedCost (default %(default)s)")
    p.add_argument("--trainer-image", default=defaults.trainer_image,
                   help="trainer image when spec.resources.image is unset (default %(default)s)")
    p.add_argument("--vllm-image", default=defaults.vllm_image,
                   help="vLLM image when an InferenceService sets no spec.vllm.image (default %(default)s)")
    p.add_argument("--capacity-policy", choices=["wait", "fail"], default=defaults.capacity_policy,
                   help="a GPU request larger than every current node: wait for the cluster to grow "
                        "(autoscaler, Karpenter, Kueue; default) or fail the job (clusters that cannot grow)")
    p.add_argument("--resync-seconds", type=float, default=defaults.resync_seconds,
                   help=argparse.SUPPRESS)
    p.add_argument("--workers", type=int, default=defaults.workers, metavar="N",
                   help="threads running handlers (default %(default)s); they mostly wait for the "
                        "API server, so many jobs arriving at once need many more than the CPUs")
    le = p.add_argument_group("leader election (several replicas, one active; client-go's semantics)")
    le.add_argument("--leader-elect", action="store_true",
                    help="run only while holding the Lease `finetune-operator`; stand by otherwise")
    le.add_argument("--leader-election-namespace", default=defaults.leader_election_namespace,
                    help="namespace of the Lease (default: $POD_NAMESPACE, required with --leader-elect)")
    le.add_argument("--leader-election-id", default="finetune-operator", help="name of the Lease (default %(default)s)")
    le.add_argument("--leader-election-lease-duration", type=float, default=15.0, metavar="SECONDS",
                    help="how long a standby waits after the last renewal it saw (default %(default)s)")
    le.add_argument("--leader-election-renew-deadline", type=float, default=10.0, metavar="SECONDS",
                    help="a leader that could not renew for this long exits (default %(default)s)")
    le.add_argument("--leader-election-retry-period", type=float, default=2.0, metavar="SECONDS",
                    help="how often to try to acquire or renew (default %(default)s)")
    return p


def _lease_config(p: argparse.ArgumentParser, args: argparse.Namespace):
    from finetune_operator.leader import LeaseConfig

    if not args.leader_election_namespace:
        p.error("--leader-elect needs --leader-election-namespace (or $POD_NAMESPACE)")
    try:
        return LeaseConfig(namespace=args.leader_election_namespace, name=args.leader_election_id,
                           lease_duration=args.leader_election_lease_duration,
                           renew_deadline=args.leader_election_renew_deadline,
                           retry_period=args.leader_election_retry_period)
    except ValueError as exc:
        p.error(str(exc))


class _StandbyHealth:
    """/healthz while this replica stands by (kopf, which serves it when leading, is not running)."""

    def __init__(self, port: int) -> None:
        import http.server
        import threading

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                ok = self.path.split("?")[0] == "/healthz"
                body = b'{"standby": true}' if ok else b"not found"
                self.send_response(200 if ok else 404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_args) -> None:
                pass

        class Server(http.server.ThreadingHTTPServer):
            allow_reuse_address = True  # read at bind time: kopf binds the same port next

        self.server = Server(("0.0.0.0", port), Handler) if port else None
        if self.server:
            threading.Thread(target=self.server.serve_forever, name="standby-health", daemon=True).start()

    def close(self) -> None:
        if self.server:
            self.server.shutdown()
            self.server.server_close()


# glibc's malloc gives each thread that allocates its own arena, up to 8 per CPU: with the
# handler, refresh and child-creating threads (dozens), freed memory stays spread over many
# arenas and the resident size grows with the thread count, not with the jobs. Two arenas
# (what MALLOC_ARENA_MAX=2 does, set here before any thread starts).
M_ARENA_MAX = -8
MALLOC_ARENAS = 2


def limit_malloc_arenas(arenas: int = MALLOC_ARENAS) -> bool:
    """True when glibc took the limit (False elsewhere: musl, macOS)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_ARENA_MAX, arenas))
    except (OSError, AttributeError):
        return False


# The cyclic garbage collector's generation thresholds once the operator has started. With
# Python's defaults (700, 10, 10) the objects that decoding watch events creates set off a
# young collection every few events and a full one (every object the watch caches hold) every
# ten seconds or so: 18.2 of 72.2 CPU-s at N=1000, 13.7 of them in 53 full collections (#14,
# session 11, measured with gc.callbacks; a profile had put it in the JSON decoder, the frame
# that allocated). With these and the start-up objects frozen: 5.4 of 60.4 CPU-s, peak RSS
# 222 -> 248 MiB. Reference counting frees nearly everything; only cycles wait longer.
GC_THRESHOLDS = (50_000, 20, 100)


def tune_gc(thresholds: tuple[int, int, int] = GC_THRESHOLDS) -> None:
    """Freeze what start-up made (modules, classes, the kubernetes client's models: never
    garbage, never walked again) and collect less often."""
    import gc

    gc.collect()
    gc.freeze()
    gc.set_threshold(*thresholds)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["api"]:
        from finetune_openai.cli import main as api_main

        return api_main(argv[1:])
    limit_malloc_arenas()
    args = build_parser().parse_args(argv)
    settings.current = settings.OperatorConfig(
        namespaces=args.namespaces, metrics_port=args.metrics_port, liveness_port=args.liveness_port,
        log_level=args.log_level, gpu_hour_price=args.gpu_hour_price, trainer_image=args.trainer_image,
        vllm_image=args.vllm_image, capacity_policy=args.capacity_policy,
        resync_seconds=args.resync_seconds, workers=args.workers)
    from finetune_operator import logs

    logs.configure(args.log_level, args.log_format)
    import kopf

    import finetune_operator.main  # noqa: F401 - registers the handlers with the settings above
    from finetune_operator import metrics

    elector = stop = None
    if args.leader_elect:
        elector, stop = _lead_or_wait(_lease_config(build_parser(), args), args)
        if elector is None:
            return 0
    metrics.leader.set(1)
    liveness = f"http://0.0.0.0:{args.liveness_port}/healthz" if args.liveness_port else None
    tune_gc()
    try:
        asyncio.run(kopf.operator(
            clusterwide=not args.namespaces, namespaces=args.namespaces,
            liveness_endpoint=liveness, standalone=True))
    except KeyboardInterrupt:
        pass
    finally:
        if elector is not None:
            stop.set()
            elector.release()
    return 0


def _lead_or_wait(config, args: argparse.Namespace):
    """Stand by (serving /healthz and /metrics) until this replica holds the Lease; then keep
    renewing it in a thread that ends the process if it is lost. (None, None) when stopped
    by SIGTERM/SIGINT while standing by."""
    import signal
    import threading

    from finetune_operator import kube, metrics, review_http
    from finetune_operator.leader import LeaderElector, LeaseAPI, exit_when_lost

    review_http.serve(args.metrics_port)
    metrics.leader.set(0)
    elector = LeaderElector(config, LeaseAPI(kube.api(), config.namespace, config.name))
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    health = _StandbyHealth(args.liveness_port)
    try:
        leading = elector.acquire(stop)
    finally:
        health.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if not leading:
        return None, None
    renewing = threading.Event()
    exit_when_lost(elector, renewing)
    return elector, renewing
