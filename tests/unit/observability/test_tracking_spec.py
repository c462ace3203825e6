"""spec.tracking in the operator's pure functions: what the trainer's config and
environment get (credentials only as Secret references), what admission checks, and the
TrackingAvailable condition built from the trainer's status.tracking. Its effect on a real
run is in tests/unit/trainer/test_trainer_tracking.py and
tests/cluster/test_tracking_mlflow_cluster.py."""

from __future__ import annotations

import datetime as dt
import json

from finetune_operator.admission import ClusterFacts, check
from finetune_api.models import FineTuneJob
from finetune_operator.builders import trainer_config, trainer_job
from finetune_operator.status import tracking_condition

IMAGE = "ghcr.io/finetune-dev/finetune-trainer:test"
TRACKING = {
    "mlflow": {"trackingUri": "https://mlflow.example.com", "experiment": "support",
               "secretRef": {"name": "mlflow-creds"}},
    "tensorboard": {"enabled": True},
    "wandb": {"project": "bots", "mode": "offline", "apiKeySecretRef": {"name": "wandb", "key": "apiKey"}},
    "logAdapter": True,
}


def make_job(tracking: dict | None = TRACKING, status: dict | None = None) -> FineTuneJob:
    spec = {"model": {"source": "/models/llama"}, "dataset": {"source": "pvc://support-bot-workspace/d.jsonl"}}
    if tracking is not None:
        spec["tracking"] = tracking
    return FineTuneJob.from_resource({
        "apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob",
        "metadata": {"name": "support-bot", "namespace": "ml", "uid": "1234-uid", "generation": 1},
        "spec": spec, "status": status or {}})


def test_trainer_config_carries_the_trackers_but_no_secret_reference():
    text = trainer_config.render_config(make_job())
    config = json.loads(text)
    assert config["tracking"] == {
        "mlflow": {"trackingUri": "https://mlflow.example.com", "experiment": "support"},
        "tensorboard": {"enabled": True},
        "wandb": {"project": "bots", "mode": "offline"},
        "logAdapter": True,
    }
    assert "mlflow-creds" not in text and "apiKey" not in text


def test_no_tracking_section_without_spec_tracking():
    config = json.loads(trainer_config.render_config(make_job(None)))
    assert "tracking" not in config


def test_trainer_gets_tracker_credentials_from_named_secret_keys_only():
    job = trainer_job.build_trainer_job(make_job(), IMAGE)
    env = {e["name"]: e for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    for key in ("MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        assert env[key]["valueFrom"]["secretKeyRef"] == {"name": "mlflow-creds", "key": key, "optional": True}
    assert env["WANDB_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "wandb", "key": "apiKey"}
    assert "envFrom" not in job["spec"]["template"]["spec"]["containers"][0]


def test_admission_names_a_missing_tracking_secret():
    problem = check(make_job(), ClusterFacts(secrets={"wandb": {"apiKey"}}))
    assert problem.reason == "SecretNotFound" and "spec.tracking.mlflow.secretRef" in problem.message
    problem = check(make_job(), ClusterFacts(secrets={"wandb": {"apiKey"}, "mlflow-creds": {"other"}}))
    assert problem.reason == "SecretKeyNotFound" and "MLFLOW_TRACKING_TOKEN" in problem.message
    problem = check(make_job(), ClusterFacts(secrets={"mlflow-creds": {"MLFLOW_TRACKING_TOKEN"}}))
    assert problem.reason == "SecretNotFound" and "spec.tracking.wandb.apiKeySecretRef" in problem.message
    assert check(make_job(), ClusterFacts(secrets={"wandb": {"apiKey"},
                                                   "mlflow-creds": {"MLFLOW_TRACKING_TOKEN"}})) is None


def test_tracking_condition_follows_the_trainers_report():
    assert tracking_condition(make_job()) is None  # nothing reported yet
    down = make_job(status={"tracking": {
        "mlflow": {"state": "Unavailable", "message": "cannot start a run on https://mlflow.example.com: refused"},
        "tensorboard": {"state": "Logging", "logDir": "/workspace/tracking/tensorboard"}}})
    c = tracking_condition(down)
    assert (c.type, c.status, c.reason) == ("TrackingAvailable", "False", "TrackerUnavailable")
    assert c.message.startswith("mlflow: cannot start a run") and "Training goes on" in c.message
    up = make_job(status={"tracking": {"mlflow": {"state": "Logging", "runUrl": "https://x/#/runs/1"}}})
    c = tracking_condition(up)
    assert (c.status, c.reason, c.message) == ("True", "Logging", "logging to mlflow")
    assert tracking_condition(make_job(None, status={"tracking": {"mlflow": {"state": "Logging"}}})) is None


def test_status_patch_writes_the_tracking_condition():
    from finetune_operator.status import Observation, Phase, status_patch

    job = make_job(status={"tracking": {"mlflow": {"state": "Unavailable", "message": "down"}}})
    o = Observation(Phase.TRAINING, "Training", "step 3/10")
    patch = status_patch(job, o, now=dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc), gpu_hour_price=0,
                         existing_conditions=[])
    tracking = [c for c in patch["conditions"] if c["type"] == "TrackingAvailable"]
    assert len(tracking) == 1 and tracking[0]["status"] == "False"
