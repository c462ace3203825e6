"""The trainer's tracking pieces that need no training run: which trackers a config starts,
W&B's online/offline choice (mode and baseUrl), parameters, and what may be shown of a URI.
The trackers' effect on a real run: tests/unit/trainer/test_trainer_tracking.py."""

from __future__ import annotations

import socket

import pytest

from finetune_trainer.config import ConfigError, TrainerConfig
from finetune_trainer.tracking import Tracking, WandbTracker, _redact, _without_userinfo, flatten_params


def config(tracking: dict | None) -> TrainerConfig:
    data = {"model": {"source": "/m"}, "dataset": {"source": "volume://d.jsonl"},
            "training": {"learningRate": 1e-4, "maxSteps": 5}, "paths": {"root": "/tmp/ws"}}
    if tracking is not None:
        data["tracking"] = tracking
    return TrainerConfig.from_dict(data)


def test_only_the_named_and_enabled_trackers_start():
    assert [t.name for t in Tracking(config(None)).trackers] == []
    assert [t.name for t in Tracking(config({"tensorboard": {"enabled": False}})).trackers] == []
    names = [t.name for t in Tracking(config({"mlflow": {"trackingUri": "http://m"}, "tensorboard": {},
                                              "wandb": {"project": "p"}})).trackers]
    assert names == ["mlflow", "tensorboard", "wandb"]


def test_a_bad_tracking_field_is_named():
    with pytest.raises(ConfigError, match=r"tracking.wandb.mode: 'sometimes'"):
        config({"wandb": {"project": "p", "mode": "sometimes"}})
    with pytest.raises(ConfigError, match=r"tracking.mlflow.trackingUri"):
        config({"mlflow": {"experiment": "x"}})


@pytest.fixture
def listening_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def test_wandb_auto_mode_goes_online_only_with_a_key_and_a_reachable_base_url(monkeypatch, listening_port):
    reachable = f"http://127.0.0.1:{listening_port}"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"  # bound, not listening: refused

    def mode(base_url: str, **wandb) -> str:
        return WandbTracker(config({"wandb": {"project": "p", "baseUrl": base_url, **wandb}})).resolve_mode()

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert mode(reachable) == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert mode(reachable) == "online"
    assert mode(closed) == "offline"
    assert mode(reachable, mode="offline") == "offline"
    assert mode(closed, mode="online") == "online"


def test_parameters_are_the_training_sections_flattened():
    params = flatten_params(config({"mlflow": {"trackingUri": "http://m"}}))
    assert params["training.learningRate"] == "0.0001" and params["training.maxSteps"] == "5"
    assert params["model.source"] == "/m"
    assert not any(k.startswith(("paths.", "tracking.", "reporting.", "job.")) for k in params)


def test_credentials_never_show_in_uris_or_messages():
    assert _without_userinfo("https://bob:hunter2@mlflow.example.com:5000/x") == "https://mlflow.example.com:5000/x"
    assert _without_userinfo("http://mlflow:5000") == "http://mlflow:5000"
    text = _redact("GET https://bob:hunter2@h/api failed; token=abc123 Authorization: Bearer-xyz")
    assert "hunter2" not in text and "abc123" not in text and "Bearer-xyz" not in text
