"""Experiment tracking from the trainer (spec.tracking), with real trackers: the dev
cluster's MLflow server (its own virtualenv, started here without the rest of the cluster),
TensorBoard event files read back with TensorBoard's own reader, and the real wandb package
in offline mode (no network here; nothing stands in for it). The trainer runs as the pod
runs it, on the tiny model; its status patches go to the recording stand-in for the API
server (tests/fixtures/ml.py), as in tests/unit/trainer/test_trainer_run.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from finetune_devcluster.cluster import MLFLOW_SERVER_ENV, free_port, mlflow_server_argv, mlflow_server_venv
from tests.fixtures.ml import trainer_command, trainer_env

pytestmark = [pytest.mark.slow]

STEPS, LOGGING_STEPS = 8, 2
# The trainer logs the first step too (logging_first_step), then every LOGGING_STEPS.
LOGGED_STEPS = [1, *range(LOGGING_STEPS, STEPS + 1, LOGGING_STEPS)]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server on loopback; yields its URL."""
    data = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    log = open(data / "server.log", "wb")
    proc = subprocess.Popen(mlflow_server_argv(mlflow_server_venv(), data, port), stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, **MLFLOW_SERVER_ENV})
    url = f"http://127.0.0.1:{port}"
    # Its database set-up takes seconds, or minutes on a loaded 2-core machine.
    deadline = time.monotonic() + 600
    try:
        while True:
            assert proc.poll() is None, (data / "server.log").read_text()[-3000:]
            try:
                if urllib.request.urlopen(f"{url}/health", timeout=2).status == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "MLflow server not up in 600 s"
            time.sleep(0.3)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        log.close()


def run_trainer(config: Path, tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    tracking_env = {"WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"), "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache"),
                    "WANDB_DATA_DIR": str(tmp_path / "wandb-data")}
    return subprocess.run(trainer_command(config), env=trainer_env(tmp_path, **tracking_env, **env),
                          capture_output=True, text=True, timeout=1200)


def last_status(patches) -> dict:
    return patches[-1][2]["status"]


def test_mlflow_tensorboard_and_wandb_record_params_per_step_loss_and_artifacts(
        trainer_config, tmp_path, fake_kube_api, mlflow_server):
    kubeconfig, patches = fake_kube_api
    config = trainer_config(
        training={"maxSteps": STEPS, "loggingSteps": LOGGING_STEPS, "evalSteps": 4},
        job={"name": "tracked", "namespace": "team-a", "uid": "0b8e4c1e-1111-2222-3333-444455556666"},
        reporting={"statusPatch": True, "statusInterval": 0, "metricsPort": None},
        tracking={"mlflow": {"trackingUri": mlflow_server, "experiment": "team-a/tracked"},
                  "tensorboard": {"enabled": True},
                  "wandb": {"project": "finetune-tests", "entity": "finetune-team", "mode": "auto"},
                  "logAdapter": True},
    )

    result = run_trainer(config, tmp_path, FINETUNE_KUBECONFIG=str(kubeconfig))

    assert result.returncode == 0, result.stderr[-3000:]
    root = Path(json.loads(config.read_text())["paths"]["root"])
    summary = json.loads((root / "reports" / "summary.json").read_text())

    # MLflow: one run with the resolved config, the dataset hash, the loss of every logging step.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server)
    experiment = client.get_experiment_by_name("team-a/tracked")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["training.maxSteps"] == str(STEPS)
    assert float(params["training.learningRate"]) == pytest.approx(3e-3)
    assert params["method.type"] == "lora"
    assert params["dataset.hash"] == summary["datasetHash"]
    assert run.data.tags["finetune.dev/finetunejob"] == "tracked"
    loss = client.get_metric_history(run.info.run_id, "loss")
    assert sorted(m.step for m in loss) == LOGGED_STEPS
    assert {m.step for m in client.get_metric_history(run.info.run_id, "eval_loss")} >= {4, 8}
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"README.md", "loss.png", "summary.json", "adapter"} <= artifacts, artifacts
    assert "adapter_model.safetensors" in {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "adapter")}

    # status.tracking: the run's URL and each tracker's state.
    tracking = last_status(patches)["tracking"]
    assert tracking["mlflow"]["state"] == "Logging"
    assert tracking["mlflow"]["runUrl"] == (
        f"{mlflow_server}/#/experiments/{experiment.experiment_id}/runs/{run.info.run_id}")
    assert tracking["tensorboard"] == {"state": "Logging", "logDir": str(root / "tracking" / "tensorboard")}
    assert tracking["wandb"]["mode"] == "offline"  # no WANDB_API_KEY and no network
    assert tracking["wandb"]["project"] == "finetune-tests"
    assert tracking["wandb"]["state"] == "Logging"

    # TensorBoard: event files on the job volume, holding the per-step loss.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(root / "tracking" / "tensorboard"))
    events.Reload()
    tb_loss = events.Scalars("train/loss")
    assert [e.step for e in tb_loss] == LOGGED_STEPS
    assert [round(e.value, 4) for e in tb_loss] == [round(m.value, 4) for m in sorted(loss, key=lambda m: m.step)]
    assert "eval/loss" in events.Tags()["scalars"]

    # W&B offline: a run folder on the job volume that `wandb sync` can upload later.
    run_dirs = list((root / "tracking" / "wandb").glob("offline-run-*"))
    assert len(run_dirs) == 1 and str(run_dirs[0]) == tracking["wandb"]["runDir"]
    wandb_file = next(run_dirs[0].glob("run-*.wandb"))
    assert wandb_file.stat().st_size > 0
    # Offline, the config and history are records in the .wandb file; saved files are copied.
    records = wandb_file.read_bytes()
    assert b"training.learningRate" in records and summary["datasetHash"].encode() in records
    assert b"finetune-tests" in records and b"finetune-team" in records  # project and entity
    assert {"README.md", "loss.png"} <= {p.name for p in (run_dirs[0] / "files").iterdir()}

    # The loss curve beside the model card, embedded in it.
    assert (root / "artifacts" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![training and evaluation loss, learning rate](loss.png)" in (root / "artifacts" / "README.md").read_text()


def test_a_tracker_that_is_down_never_fails_training_and_shows_in_status(trainer_config, tmp_path, fake_kube_api):
    kubeconfig, patches = fake_kube_api
    dead = f"http://mlflow-user:s3cret-pass@127.0.0.1:{free_port()}"  # nothing listens there
    config = trainer_config(
        training={"maxSteps": 4, "loggingSteps": 2},
        job={"name": "untracked", "namespace": "team-a"},
        reporting={"statusPatch": True, "statusInterval": 0, "metricsPort": None},
        tracking={"mlflow": {"trackingUri": dead}},
    )

    started = time.monotonic()
    result = run_trainer(config, tmp_path, FINETUNE_KUBECONFIG=str(kubeconfig),
                         MLFLOW_TRACKING_TOKEN="tok-never-shown")

    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "termination-log").read_text())["reason"] == "Succeeded"
    mlflow = last_status(patches)["tracking"]["mlflow"]
    assert mlflow["state"] == "Unavailable"
    assert "cannot start a run" in mlflow["message"]
    everything = json.dumps([p[2] for p in patches]) + result.stdout + result.stderr
    assert "s3cret-pass" not in everything and "tok-never-shown" not in everything
    assert time.monotonic() - started < 300
