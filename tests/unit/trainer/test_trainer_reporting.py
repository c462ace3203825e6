"""Progress reaches Prometheus and the FineTuneJob status; a broken API never stops training.

The status-patch tests here talk to a recording stand-in for the API server (to see the exact
request); tests/e2e/test_operator_realrun.py checks the same patches against the real one.
"""

from __future__ import annotations

import json
import urllib.request

import pytest

from finetune_trainer.config import JobRef, ReportingConfig
from finetune_trainer.reporting import (
    Progress,
    Reporter,
    StatusPatcher,
    _ApiTarget,
    write_termination_message,
)
from tests.fixtures.ml import recording_api_server


@pytest.fixture
def fake_api():
    """A stand-in for the status endpoint that records PATCH requests (path, headers, body)."""
    with recording_api_server() as (url, received):
        yield url, received


def test_status_patch_has_progress_metrics_and_checkpoints():
    progress = Progress(step=50, total_steps=200, epoch=0.5, train_loss=1.25, eval_loss=1.0,
                        learning_rate=1e-4, tokens_per_second=900.0, latest_checkpoint="checkpoint-50",
                        checkpoint_count=2)

    status = progress.status_patch()["status"]

    assert status["progress"]["step"] == 50
    assert status["progress"]["totalSteps"] == 200
    assert status["progress"]["percent"] == 25
    assert status["metrics"]["trainLoss"] == 1.25
    assert status["metrics"]["perplexity"] == pytest.approx(2.718281, rel=1e-5)
    assert status["checkpoints"] == {"latest": "checkpoint-50", "count": 2}
    assert "tokensSeen" not in status["progress"]


def test_status_patch_reports_tokens_seen_and_every_kept_checkpoint():
    kept = [{"step": 25, "trainLoss": 1.5}, {"step": 50, "trainLoss": float("nan"), "evalLoss": 1.0}]
    progress = Progress(step=50, total_steps=200, tokens_seen=12345, latest_checkpoint="checkpoint-50",
                        checkpoint_count=2, kept_checkpoints=kept)

    status = progress.status_patch()["status"]

    assert status["progress"]["tokensSeen"] == 12345
    assert status["checkpoints"]["kept"] == [{"step": 25, "trainLoss": 1.5}, {"step": 50, "evalLoss": 1.0}]


def test_status_patch_is_a_merge_patch_on_the_status_subresource(fake_api):
    url, received = fake_api
    patcher = StatusPatcher(JobRef(name="tune", namespace="team-a"), interval=0,
                            target=_ApiTarget(url, "sa-token", None))

    assert patcher.patch(Progress(step=3, total_steps=10).status_patch())

    path, headers, body = received[0]
    assert path == "/apis/finetune.dev/v1alpha1/namespaces/team-a/finetunejobs/tune/status"
    assert headers["Content-Type"] == "application/merge-patch+json"
    assert headers["Authorization"] == "Bearer sa-token"
    assert body["status"]["progress"]["step"] == 3


def test_status_patches_are_throttled(fake_api):
    url, received = fake_api
    patcher = StatusPatcher(JobRef(), interval=3600, target=_ApiTarget(url, None, None))

    for step in range(5):
        patcher.maybe_patch(Progress(step=step).status_patch())
    patcher.maybe_patch(Progress(step=9).status_patch(), force=True)

    assert [body["status"]["progress"]["step"] for _, _, body in received] == [0, 9]


def test_unreachable_api_is_logged_not_raised(caplog):
    patcher = StatusPatcher(JobRef(), interval=0, target=_ApiTarget("http://127.0.0.1:9", None, None))

    assert patcher.patch({"status": {}}) is False
    assert patcher.failures == 1
    assert "training goes on" in caplog.text


def test_non_finite_metrics_do_not_break_the_patch():
    status = Progress(train_loss=float("nan")).status_patch()
    json.dumps(status, allow_nan=False)


def test_metrics_are_served_for_prometheus():
    reporter = Reporter(ReportingConfig(metrics_port=0), JobRef())
    try:
        reporter.progress.step, reporter.progress.train_loss = 7, 0.5
        reporter.publish()
        port = reporter.metrics.server[0].server_port
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
    finally:
        reporter.close()
    assert "finetune_trainer_step 7.0" in text
    assert "finetune_trainer_loss 0.5" in text
    for name in ("total_steps", "eval_loss", "learning_rate", "tokens_per_second", "epoch"):
        assert f"finetune_trainer_{name}" in text


def test_termination_message_goes_where_the_env_says(tmp_path, monkeypatch):
    monkeypatch.setenv("FINETUNE_TERMINATION_LOG", str(tmp_path / "term"))
    write_termination_message({"reason": "InvalidData", "message": "x" * 10000, "step": 3})
    data = json.loads((tmp_path / "term").read_text())
    assert data["reason"] == "InvalidData" and len(json.dumps(data)) < 4096


def test_tokens_per_second_is_the_rate_between_training_logs_not_zeroed_by_an_eval_log(tmp_path, monkeypatch):
    """Issue 14: the evaluation log at the last step (same token count as the training log
    before it) set tokensPerSecond to 0, and status kept that 0."""
    from types import SimpleNamespace

    from finetune_trainer import callbacks
    from finetune_trainer.config import TrainerConfig

    cfg = TrainerConfig.from_dict({"model": {"source": "/m"}, "dataset": {"source": "x.jsonl"},
                                   "training": {"precision": "fp32"}, "paths": {"root": str(tmp_path)}})
    reporter = SimpleNamespace(progress=Progress(), publish=lambda force=False: None,
                               log_step=lambda logs, step: None)
    report = next(c for c in callbacks.make_callbacks(cfg, reporter, has_eval=True, guard=callbacks.SignalGuard())
                  if type(c).__name__ == "ReportCallback")
    clock = iter([100.0, 102.0, 104.0, 104.5])
    monkeypatch.setattr(callbacks.time, "monotonic", lambda: next(clock))
    state = SimpleNamespace(global_step=2, epoch=0.5, num_input_tokens_seen=1000)
    report.on_log(None, state, None, logs={"loss": 2.0})
    state.global_step, state.num_input_tokens_seen = 4, 1400
    report.on_log(None, state, None, logs={"loss": 1.5})
    assert reporter.progress.tokens_per_second == 200.0  # 400 tokens in 2 s
    state.global_step, state.num_input_tokens_seen = 6, 2000
    report.on_log(None, state, None, logs={"loss": 1.2})
    report.on_log(None, state, None, logs={"eval_loss": 1.3})  # the evaluation at the same step
    assert reporter.progress.tokens_per_second == 300.0 and reporter.progress.tokens_seen == 2000
