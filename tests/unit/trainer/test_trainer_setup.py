"""Pieces of a run decided before training: the tiny model, model sources, callbacks."""

from __future__ import annotations

import pytest

from finetune_devcluster.tiny_model import HASH_FILE, build_tiny_model, tiny_model_hash
from finetune_trainer.config import ConfigError, MethodConfig, ModelConfig, TrainerConfig
from finetune_trainer.model import check_method_supported, model_location


def test_tiny_model_build_is_idempotent(tmp_path, tiny_model):
    out = tmp_path / "tiny"
    build_tiny_model(out)
    stamp = (out / "model.safetensors").stat().st_mtime_ns

    assert build_tiny_model(out) == out
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp
    assert (out / HASH_FILE).read_text().strip() == tiny_model_hash()
    assert (tiny_model / HASH_FILE).read_text().strip() == tiny_model_hash()


def test_tiny_model_is_a_small_llama_with_a_generation_tagged_template(tiny_model):
    import json

    from transformers import AutoTokenizer

    config = json.loads((tiny_model / "config.json").read_text())
    assert (config["model_type"], config["hidden_size"], config["head_dim"]) == ("llama", 128, 64)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    assert len(tokenizer) == 512
    assert "{%- generation %}" in tokenizer.chat_template


def test_hub_sources_take_revision_and_token_from_env(monkeypatch):
    monkeypatch.setenv("HF_TOKEN_FOR_JOB", "secret")
    name, kwargs = model_location(ModelConfig(source="hf://org/model", revision="abc123",
                                              token_env="HF_TOKEN_FOR_JOB", trust_remote_code=True))
    assert name == "org/model"
    assert kwargs == {"trust_remote_code": True, "revision": "abc123", "token": "secret"}


def test_local_sources_are_used_as_is(tiny_model):
    name, kwargs = model_location(ModelConfig(source=str(tiny_model), revision="ignored"))
    assert name == str(tiny_model) and "revision" not in kwargs


def test_lora_targets_vllm_cannot_serve_are_refused():
    method = MethodConfig(type="lora")
    method.validate("method")
    method.lora.target_modules = ["q_proj", "lm_head"]
    with pytest.raises(ConfigError, match="lm_head cannot be served by vLLM"):
        check_method_supported(method)


def test_early_stopping_and_guards_are_installed(tiny_model, tmp_path):
    from transformers import EarlyStoppingCallback

    from finetune_trainer.train import SignalGuard, _callbacks

    cfg = TrainerConfig.from_dict({
        "model": {"source": str(tiny_model)}, "dataset": {"source": "x.jsonl"},
        "training": {"earlyStopping": {"patience": 2, "threshold": 0.01}},
        "paths": {"root": str(tmp_path)},
    })
    names = [type(c).__name__ for c in _callbacks(cfg, None, True, SignalGuard())]
    assert names[:3] == ["DivergenceGuard", "StopOnSignal", "CheckpointCallback"]
    early = [c for c in _callbacks(cfg, None, True, SignalGuard()) if isinstance(c, EarlyStoppingCallback)]
    assert early and early[0].early_stopping_patience == 2
    assert not any(isinstance(c, EarlyStoppingCallback) for c in _callbacks(cfg, None, False, SignalGuard()))
