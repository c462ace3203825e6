"""What the trainer tells the outside world: Prometheus metrics, the FineTuneJob's status,
the termination message.

Reporting never stops training: a failed status patch is logged and training goes on.
"""

from __future__ import annotations

import json
import logging
import math
import os
import ssl
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import JobRef, ReportingConfig
from .exitcodes import TERMINATION_LOG

log = logging.getLogger(__name__)

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
GROUP_VERSION = "finetune.dev/v1alpha1"


def write_termination_message(summary: dict[str, Any]) -> None:
    """Write the JSON summary Kubernetes shows in the pod's terminated state (max 4 KiB).

    Under the launcher (`finetune-trainer launch`, or `train --nproc-per-node N`) each worker
    writes its own file and the launcher writes the pod's.
    """
    worker_dir = os.environ.get("FINETUNE_WORKER_TERMINATION_DIR")
    if worker_dir and "RANK" in os.environ:
        rank = int(os.environ["RANK"])
        summary = dict(summary, rank=rank)
        path = Path(worker_dir) / f"rank-{rank}.json"
    else:
        path = Path(os.environ.get("FINETUNE_TERMINATION_LOG", TERMINATION_LOG))
    text = json.dumps(summary, sort_keys=True, default=str)
    if len(text) > 4000:
        summary = dict(summary, message=str(summary.get("message", ""))[:3000] + "...")
        text = json.dumps(summary, sort_keys=True, default=str)
    try:
        path.write_text(text)
    except OSError as exc:  # not in a pod, or the file is not writable
        log.debug("cannot write termination message to %s: %s", path, exc)


@dataclass
class Progress:
    """The trainer's latest known state, shared by metrics and the status patch."""

    step: int = 0
    total_steps: int = 0
    epoch: float = 0.0
    train_loss: float | None = None
    eval_loss: float | None = None
    learning_rate: float | None = None
    tokens_per_second: float | None = None
    # Non-padding input tokens trained on (the HF Trainer's count, kept across a resume).
    tokens_seen: int = 0
    latest_checkpoint: str | None = None
    checkpoint_count: int = 0
    # checkpoints.kept_summary(): every complete checkpoint with its step and metrics.
    kept_checkpoints: list[dict[str, Any]] = field(default_factory=list)
    started_at: float = field(default_factory=time.monotonic)
    start_step: int = 0
    # The dataset report, as the FineTuneJob status declares it (see dataset_status).
    dataset: dict[str, Any] | None = None
    # An objective's own latest values, by status.metrics key (DPO: rewardsChosen, ...).
    objective_metrics: dict[str, float] = field(default_factory=dict)
    # False when the loss is not a language-model loss (DPO): no perplexity then.
    lm_loss: bool = True
    # status.evaluation once the run evaluated (evalLoss, perplexity, preferenceAccuracy, ...).
    evaluation: dict[str, Any] | None = None
    # Each tracker's state, run id and URL (tracking.Tracking.status()).
    tracking: dict[str, Any] | None = None
    # s3:// and https:// sources as downloaded (fetch.fetch_sources): status.sources.
    sources: list[dict[str, Any]] = field(default_factory=list)
    # Where the results are once training ended (status.artifacts) and the best checkpoint.
    artifacts: dict[str, str] | None = None
    best_checkpoint: str | None = None

    @property
    def percent(self) -> int:
        # An integer in the FineTuneJob's status schema: whole percents are enough.
        return min(100, 100 * self.step // self.total_steps) if self.total_steps else 0

    @property
    def eta_seconds(self) -> int | None:
        done = self.step - self.start_step
        if done <= 0 or not self.total_steps:
            return None
        rate = (time.monotonic() - self.started_at) / done
        return int(rate * max(self.total_steps - self.step, 0))

    @property
    def perplexity(self) -> float | None:
        if self.eval_loss is None or not self.lm_loss:
            return None
        return math.exp(self.eval_loss) if self.eval_loss < 50 else float("inf")

    def status_patch(self) -> dict[str, Any]:
        metrics = {
            "trainLoss": self.train_loss,
            "evalLoss": self.eval_loss,
            "perplexity": self.perplexity,
            "learningRate": self.learning_rate,
            "tokensPerSecond": self.tokens_per_second,
            **self.objective_metrics,
        }
        # JSON has no NaN/inf and the schema types these as numbers: leave such values out
        # rather than have the API server reject the whole patch.
        metrics = {k: round(float(v), 6) for k, v in metrics.items()
                   if v is not None and math.isfinite(v)}
        progress = {"step": self.step, "totalSteps": self.total_steps,
                    "epoch": round(self.epoch, 4), "percent": self.percent}
        if self.eta_seconds is not None:
            progress["etaSeconds"] = self.eta_seconds
        if self.tokens_seen:
            progress["tokensSeen"] = int(self.tokens_seen)
        status: dict[str, Any] = {"progress": progress, "metrics": metrics}
        if self.latest_checkpoint:
            status["checkpoints"] = {"latest": self.latest_checkpoint, "count": self.checkpoint_count}
            if self.kept_checkpoints:
                status["checkpoints"]["kept"] = [_finite(c) for c in self.kept_checkpoints]
        if self.best_checkpoint:
            status.setdefault("checkpoints", {})["best"] = self.best_checkpoint
        if self.sources:
            status["sources"] = self.sources
        if self.artifacts:
            status["artifacts"] = self.artifacts
        if self.dataset:
            status["dataset"] = self.dataset
        if self.evaluation:
            status["evaluation"] = _finite(self.evaluation)
        if self.tracking:
            status["tracking"] = self.tracking
        return {"status": status}


def _finite(value: Any) -> Any:
    """A status value without NaN/inf numbers (the API server would reject the patch)."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()
                if not (isinstance(v, float) and not math.isfinite(v))}
    if isinstance(value, float):
        return round(value, 6)
    return value


# Fields of the dataset report that the FineTuneJob status declares (others would be pruned).
DATASET_STATUS_FIELDS = (
    "examplesRead", "rejected", "duplicatesRemoved", "nearDuplicatesRemoved", "truncated",
    "droppedTooLong", "droppedNoTrainableTokens", "trainExamples", "evalExamples", "mixExamples",
    "tokenLengthPercentiles", "tokenLengthsApproximate", "contentHash", "promptFormat", "firstErrors",
    "warnings", "problems",
)
STATUS_LIST_LIMIT = 20


def dataset_status(report: dict[str, Any]) -> dict[str, Any]:
    """The dataset report (camelCase, as written to reports/dataset.json) for the status."""
    out: dict[str, Any] = {}
    for key in DATASET_STATUS_FIELDS:
        value = report.get(key)
        if value is None:
            continue
        if isinstance(value, list):
            value = [str(v)[:1000] for v in value[:STATUS_LIST_LIMIT]]
        out[key] = value
    return out


class Metrics:
    """`finetune_trainer_*` gauges on their own registry, served on metrics_port."""

    def __init__(self, port: int | None):
        from prometheus_client import CollectorRegistry, Gauge, start_http_server

        self.registry = CollectorRegistry()
        names = {
            "step": "Optimizer steps done",
            "total_steps": "Optimizer steps planned",
            "loss": "Latest logged training loss",
            "eval_loss": "Latest evaluation loss",
            "learning_rate": "Current learning rate",
            "tokens_per_second": "Training throughput in non-padding tokens per second",
            "epoch": "Epochs done (fractional)",
        }
        from .objectives import all_metric_specs

        self.objective_gauges = {spec.status_key: spec.gauge for spec in all_metric_specs()}
        names.update({spec.gauge: spec.help for spec in all_metric_specs()})
        self.gauges = {n: Gauge(f"finetune_trainer_{n}", h, registry=self.registry) for n, h in names.items()}
        self.preference_accuracy = Gauge(
            "finetune_trainer_preference_accuracy",
            "Share of held-out preference pairs whose chosen answer the model finds likelier "
            "than the rejected one (model: base or finetuned)", ["model"], registry=self.registry)
        self.server = None
        if port is not None:  # 0 picks a free port (tests)
            try:
                self.server = start_http_server(port, registry=self.registry)
            except OSError as exc:
                log.warning("cannot serve metrics on port %s: %s", port, exc)

    def update(self, progress: Progress) -> None:
        values = {
            "step": progress.step,
            "total_steps": progress.total_steps,
            "loss": progress.train_loss,
            "eval_loss": progress.eval_loss,
            "learning_rate": progress.learning_rate,
            "tokens_per_second": progress.tokens_per_second,
            "epoch": progress.epoch,
        }
        for key, value in progress.objective_metrics.items():
            if key in self.objective_gauges:
                values[self.objective_gauges[key]] = value
        for name, value in values.items():
            if value is not None:
                self.gauges[name].set(value)
        accuracy = (progress.evaluation or {}).get("preferenceAccuracy") or {}
        for model in ("base", "finetuned"):
            if accuracy.get(model) is not None:
                self.preference_accuracy.labels(model=model).set(accuracy[model])

    def close(self) -> None:
        if self.server is not None:
            server, _thread = self.server
            server.shutdown()


@dataclass
class _ApiTarget:
    base_url: str
    token: str | None
    ssl_context: ssl.SSLContext | None
    client_cert: tuple[str, str] | None = None


def _in_cluster_target() -> _ApiTarget | None:
    host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT")
    token_file = SERVICE_ACCOUNT_DIR / "token"
    if not host or not port or not token_file.is_file():
        return None
    ctx = ssl.create_default_context(cafile=str(SERVICE_ACCOUNT_DIR / "ca.crt"))
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return _ApiTarget(f"https://{host}:{port}", token_file.read_text().strip(), ctx)


def _kubeconfig_target(path: str) -> _ApiTarget:
    """A target from a kubeconfig (local runs); uses the kubernetes client to read it."""
    from kubernetes import client, config

    api_client = config.new_client_from_config(config_file=path)
    conf: client.Configuration = api_client.configuration
    ctx = ssl.create_default_context(cafile=conf.ssl_ca_cert) if conf.ssl_ca_cert else ssl.create_default_context()
    if not conf.verify_ssl:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if conf.cert_file and conf.key_file:
        ctx.load_cert_chain(conf.cert_file, conf.key_file)
    token = None
    # The key's name differs between client versions ("authorization", "BearerToken").
    auth = next(iter(conf.api_key.values()), None) if conf.api_key else None
    if conf.refresh_api_key_hook is not None:
        conf.refresh_api_key_hook(conf)
        auth = next(iter(conf.api_key.values()), None) if conf.api_key else auth
    if auth:
        token = auth.split(" ", 1)[1] if auth.lower().startswith("bearer ") else auth
    return _ApiTarget(conf.host.rstrip("/"), token, ctx)


class StatusPatcher:
    """Merge-patches the FineTuneJob's status subresource, at most every `interval` seconds."""

    def __init__(self, job: JobRef, interval: float, target: _ApiTarget | None = None):
        self.job = job
        self.interval = interval
        self._target = target
        self._resolved = target is not None
        self._last: float | None = None
        self._lock = threading.Lock()
        self.failures = 0
        self.sent = 0

    def _resolve(self) -> _ApiTarget | None:
        if not self._resolved:
            self._resolved = True
            kubeconfig = os.environ.get("FINETUNE_KUBECONFIG")
            try:
                self._target = _kubeconfig_target(kubeconfig) if kubeconfig else _in_cluster_target()
            except Exception as exc:  # noqa: BLE001 - reporting must not stop training
                log.warning("status patching disabled: cannot read credentials: %s", exc)
            if self._target is None:
                log.warning("status patching disabled: no in-cluster credentials and no FINETUNE_KUBECONFIG")
        return self._target

    @property
    def url_path(self) -> str:
        return (f"/apis/{GROUP_VERSION}/namespaces/{self.job.namespace}"
                f"/finetunejobs/{self.job.name}/status")

    def maybe_patch(self, body: dict[str, Any], *, force: bool = False) -> bool:
        now = time.monotonic()
        if not force and self._last is not None and now - self._last < self.interval:
            return False
        with self._lock:
            self._last = now
            return self.patch(body)

    def patch(self, body: dict[str, Any]) -> bool:
        target = self._resolve()
        if target is None:
            return False
        request = urllib.request.Request(
            target.base_url + self.url_path,
            data=json.dumps(body).encode(),
            method="PATCH",
            headers={"Content-Type": "application/merge-patch+json", "Accept": "application/json"},
        )
        if target.token:
            request.add_header("Authorization", f"Bearer {target.token}")
        try:
            with urllib.request.urlopen(request, timeout=10, context=target.ssl_context) as response:
                response.read()
            self.sent += 1
            return True
        except Exception as exc:  # noqa: BLE001 - a failed patch never stops training
            self.failures += 1
            detail = exc.read().decode(errors="replace")[:300] if isinstance(exc, urllib.error.HTTPError) else ""
            log.warning("status patch of %s/%s failed (training goes on): %s %s",
                        self.job.namespace, self.job.name, exc, detail)
            return False


class Reporter:
    """Fan-out of progress to the metrics gauges and the status patcher (rank 0 only)."""

    def __init__(self, reporting: ReportingConfig, job: JobRef, *, serve_metrics: bool = True):
        self.progress = Progress()
        self.metrics = Metrics(reporting.metrics_port if serve_metrics else None)
        self.patcher = StatusPatcher(job, reporting.status_interval) if reporting.status_patch else None
        self.tracking = None  # tracking.Tracking, set by train.run when spec.tracking is given

    def log_step(self, logs: dict[str, Any], step: int) -> None:
        """One logging step's metrics to the experiment trackers."""
        if self.tracking is not None:
            self.tracking.log(logs, step)
            self.progress.tracking = self.tracking.status()

    def publish(self, *, force: bool = False) -> None:
        self.metrics.update(self.progress)
        if self.patcher is not None:
            self.patcher.maybe_patch(self.progress.status_patch(), force=force)

    def close(self) -> None:
        self.metrics.close()
