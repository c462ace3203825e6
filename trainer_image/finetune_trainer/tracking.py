"""Experiment trackers (spec.tracking): MLflow, TensorBoard, Weights & Biases.

Each tracker gets the resolved training config as parameters, the dataset hash, the
metrics of every logging step, and at the end the model card, the loss plot and (when
`logAdapter` is set) the adapter. A tracker that cannot be reached or fails never stops
training: it is switched off for the rest of the run and its state (`Unavailable`, with
the error) goes to `status.tracking`, where the operator turns it into the
`TrackingAvailable` condition.

A restarted pod (preemption, suspend) continues the same MLflow run and W&B run: their ids
are kept in `<root>/tracking/` on the job volume. Credentials are read by the tracker
libraries from the environment (MLFLOW_TRACKING_TOKEN, MLFLOW_TRACKING_USERNAME/PASSWORD,
WANDB_API_KEY), which the operator fills from Secrets; they are never logged.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import socket
import time
import urllib.parse
from pathlib import Path
from typing import Any

from finetune_api.models import to_dict

from .config import TrackingConfig, TrainerConfig

log = logging.getLogger(__name__)

OK, UNAVAILABLE = "Logging", "Unavailable"
# Sections of the config that describe the training (not where files live or who to report to).
PARAM_SECTIONS = ("model", "method", "dataset", "training", "evaluation", "output")
MAX_PARAM_VALUE = 500


def _redact(text: str) -> str:
    """Error text without anything that looks like a credential (URL userinfo, tokens)."""
    text = re.sub(r"(?i)(://)[^/@\s]+@", r"\1***@", text)
    return re.sub(r"(?i)(token|password|api[_-]?key|authorization)([\"'=: ]+)[^\s,\"']+", r"\1\2***", text)[:300]


def _without_userinfo(uri: str) -> str:
    """A URI as it may be shown (status, logs): without `user:password@`."""
    parts = urllib.parse.urlsplit(uri)
    if parts.username is None and parts.password is None:
        return uri
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def flatten_params(cfg: TrainerConfig) -> dict[str, str]:
    """The resolved training config as flat `section.field` parameters."""
    full = to_dict(cfg)
    out: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}", v)
        else:
            out[prefix] = (json.dumps(value) if isinstance(value, (list, bool)) else str(value))[:MAX_PARAM_VALUE]

    for section in PARAM_SECTIONS:
        if section in full:
            walk(section, full[section])
    return out


def step_metrics(logs: dict[str, Any]) -> dict[str, float]:
    """Finite numeric entries of one HF Trainer log record, with `eval_` kept as a prefix."""
    return {k: float(v) for k, v in logs.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            and k not in ("step", "total_flos")}


class _Tracker:
    name = "tracker"

    def __init__(self) -> None:
        self.state = OK
        self.message = ""
        self.info: dict[str, Any] = {}

    def fail(self, what: str, exc: BaseException) -> None:
        self.state = UNAVAILABLE
        self.message = f"{what}: {_redact(f'{type(exc).__name__}: {exc}')}"
        log.warning("%s tracking off for the rest of the run (training goes on): %s", self.name, self.message)

    def status(self) -> dict[str, Any]:
        out = dict(self.info, state=self.state)
        if self.message:
            out["message"] = self.message
        return out


class MlflowTracker(_Tracker):
    name = "mlflow"

    def __init__(self, cfg: TrainerConfig):
        super().__init__()
        self.cfg = cfg
        self.mcfg = cfg.tracking.mlflow
        self.client = None
        self.run_id: str | None = None
        self.id_file = cfg.paths.tracking / "mlflow-run.json"

    def start(self, params: dict[str, str], dataset_hash: str | None) -> None:
        # A tracker that is down must cost seconds, not the client's minutes of retries.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
        uri = self.mcfg.tracking_uri
        shown = _without_userinfo(uri)
        experiment = self.mcfg.experiment or f"{self.cfg.job.namespace}/{self.cfg.job.name}"
        self.info = {"trackingUri": shown, "experiment": experiment}
        try:
            from mlflow.tracking import MlflowClient

            self.client = MlflowClient(tracking_uri=uri)
            previous = json.loads(self.id_file.read_text()) if self.id_file.is_file() else {}
            if previous.get("trackingUri") == uri and previous.get("runId"):
                run = self.client.get_run(previous["runId"])
                self.run_id, experiment_id = run.info.run_id, run.info.experiment_id
                self.client.update_run(self.run_id, status="RUNNING")
            else:
                found = self.client.get_experiment_by_name(experiment)
                experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
                tags = {"finetune.dev/namespace": self.cfg.job.namespace, "finetune.dev/finetunejob": self.cfg.job.name,
                        "mlflow.runName": self.cfg.job.name}
                if self.cfg.job.uid:
                    tags["finetune.dev/uid"] = self.cfg.job.uid
                if dataset_hash:
                    tags["dataset.hash"] = dataset_hash
                run = self.client.create_run(experiment_id, run_name=self.cfg.job.name, tags=tags)
                self.run_id = run.info.run_id
                self._log_params(dict(params, **({"dataset.hash": dataset_hash} if dataset_hash else {})))
                self.id_file.parent.mkdir(parents=True, exist_ok=True)
                self.id_file.write_text(json.dumps({"trackingUri": uri, "runId": self.run_id}))
            self.info.update(runId=self.run_id,
                             runUrl=f"{shown.rstrip('/')}/#/experiments/{experiment_id}/runs/{self.run_id}")
        except Exception as exc:  # noqa: BLE001 - a tracker never stops training
            self.fail(f"cannot start a run on {shown}", exc)

    def _log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in sorted(params.items())]
        for i in range(0, len(items), 100):  # the server takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self.state != OK or not metrics:
            return
        try:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])
        except Exception as exc:  # noqa: BLE001
            self.fail("cannot log metrics", exc)

    def finish(self, files: list[Path], adapter: Path | None, succeeded: bool) -> None:
        if self.state != OK:
            return
        try:
            for f in files:
                self.client.log_artifact(self.run_id, str(f))
            if adapter is not None:
                self.client.log_artifacts(self.run_id, str(adapter), artifact_path="adapter")
                self.info["adapterArtifact"] = "adapter"
            self.client.set_terminated(self.run_id, status="FINISHED" if succeeded else "FAILED")
        except Exception as exc:  # noqa: BLE001
            self.fail("cannot upload artifacts or end the run", exc)


class TensorboardTracker(_Tracker):
    name = "tensorboard"

    def __init__(self, cfg: TrainerConfig, resume_step: int | None):
        super().__init__()
        self.dir = cfg.paths.tracking / "tensorboard"
        self.resume_step = resume_step
        self.writer = None

    def start(self, params: dict[str, str], dataset_hash: str | None) -> None:
        self.info = {"logDir": str(self.dir)}
        try:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events after the checkpoint a restarted pod resumes from.
            self.writer = SummaryWriter(log_dir=str(self.dir), purge_step=self.resume_step)
            if not self.resume_step:
                table = "\n".join(f"| {k} | {v} |" for k, v in sorted(params.items()))
                self.writer.add_text("config", "| parameter | value |\n| --- | --- |\n" + table, 0)
                if dataset_hash:
                    self.writer.add_text("dataset.hash", dataset_hash, 0)
        except Exception as exc:  # noqa: BLE001
            self.fail("cannot open the event file", exc)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self.state != OK or self.writer is None:
            return
        try:
            for key, value in metrics.items():
                tag = f"eval/{key[len('eval_'):]}" if key.startswith("eval_") else f"train/{key}"
                self.writer.add_scalar(tag, value, step)
            self.writer.flush()
        except Exception as exc:  # noqa: BLE001
            self.fail("cannot write events", exc)

    def finish(self, files: list[Path], adapter: Path | None, succeeded: bool) -> None:
        if self.writer is not None:
            try:
                card = next((f for f in files if f.suffix == ".md"), None)
                if card is not None and self.state == OK:
                    self.writer.add_text("model_card", card.read_text(), 0)
                self.writer.close()
            except Exception as exc:  # noqa: BLE001
                self.fail("cannot close the event file", exc)


def _reachable(url: str, timeout: float = 3.0) -> bool:
    parts = urllib.parse.urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


class WandbTracker(_Tracker):
    name = "wandb"

    def __init__(self, cfg: TrainerConfig):
        super().__init__()
        self.cfg = cfg
        self.wcfg = cfg.tracking.wandb
        self.run = None

    def resolve_mode(self) -> str:
        mode = self.wcfg.mode
        if mode != "auto":
            return mode
        base = self.wcfg.base_url or os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai"
        if os.environ.get("WANDB_API_KEY") and _reachable(base):
            return "online"
        return "offline"

    def start(self, params: dict[str, str], dataset_hash: str | None) -> None:
        mode = self.resolve_mode()
        self.info = {"mode": mode, "project": self.wcfg.project}
        try:
            import wandb

            if self.wcfg.base_url:
                os.environ["WANDB_BASE_URL"] = self.wcfg.base_url
            directory = self.cfg.paths.tracking
            directory.mkdir(parents=True, exist_ok=True)
            # The same id after a restart: the pod continues its run instead of starting one.
            run_id = re.sub(r"[^A-Za-z0-9_-]", "-", self.cfg.job.uid or f"{self.cfg.job.namespace}-{self.cfg.job.name}")
            config = dict(params, **({"dataset.hash": dataset_hash} if dataset_hash else {}))
            self.run = wandb.init(project=self.wcfg.project, entity=self.wcfg.entity, name=self.cfg.job.name,
                                  id=run_id, resume="allow", dir=str(directory), mode=mode, config=config,
                                  settings=wandb.Settings(silent=True, console="off", x_disable_stats=True))
            self.info["runDir"] = str(Path(self.run.dir).parent)
            if mode == "online" and getattr(self.run, "url", None):
                self.info["runUrl"] = self.run.url
        except Exception as exc:  # noqa: BLE001
            self.fail(f"cannot start a {mode} run", exc)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self.state != OK or self.run is None:
            return
        try:
            self.run.log(metrics, step=step)
        except Exception as exc:  # noqa: BLE001
            self.fail("cannot log metrics", exc)

    def finish(self, files: list[Path], adapter: Path | None, succeeded: bool) -> None:
        if self.run is None:
            return
        try:
            if self.state == OK:
                import wandb

                for f in files:
                    self.run.save(str(f), base_path=str(f.parent), policy="now")
                if adapter is not None:
                    artifact = wandb.Artifact(f"{self.cfg.job.name}-adapter", type="model")
                    artifact.add_dir(str(adapter))
                    self.run.log_artifact(artifact)
                    self.info["adapterArtifact"] = f"{self.cfg.job.name}-adapter"
            self.run.finish(exit_code=0 if succeeded else 1)
        except Exception as exc:  # noqa: BLE001
            self.fail("cannot finish the run", exc)


def enabled(t: TrackingConfig | None) -> bool:
    """Whether spec.tracking names any tracker that will run."""
    return bool(t and (t.mlflow or (t.tensorboard and t.tensorboard.enabled) or t.wandb))


class Tracking:
    """Every configured tracker, started once per pod on rank 0."""

    def __init__(self, cfg: TrainerConfig, resume_step: int | None = None):
        self.cfg = cfg
        t = cfg.tracking
        self.trackers: list[_Tracker] = []
        if t is None:
            return
        if t.mlflow:
            self.trackers.append(MlflowTracker(cfg))
        if t.tensorboard and t.tensorboard.enabled:
            self.trackers.append(TensorboardTracker(cfg, resume_step))
        if t.wandb:
            self.trackers.append(WandbTracker(cfg))

    def start(self, dataset_hash: str | None) -> None:
        params = flatten_params(self.cfg)
        for tracker in self.trackers:
            tracker.start(params, dataset_hash)

    def log(self, logs: dict[str, Any], step: int) -> None:
        metrics = step_metrics(logs)
        for tracker in self.trackers:
            tracker.log_metrics(metrics, step)

    def finish(self, files: list[Path], adapter: Path | None, succeeded: bool = True) -> None:
        log_adapter = bool(self.cfg.tracking and self.cfg.tracking.log_adapter)
        for tracker in self.trackers:
            tracker.finish([f for f in files if f.is_file()], adapter if log_adapter and adapter else None, succeeded)

    def status(self) -> dict[str, Any]:
        """`status.tracking` of the FineTuneJob."""
        return {t.name: t.status() for t in self.trackers}
