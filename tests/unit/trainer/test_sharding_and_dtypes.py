"""Pure choices of the trainer for several GPUs and for what it keeps: whether training is
sharded (training.sharding), the dtype artifacts are saved in, and where a model that only
runs forward passes (merge, evaluation) is placed."""

from __future__ import annotations

import pytest
import torch

from finetune_trainer.config import ConfigError
from finetune_trainer.model import (SHARDING_MEMORY_FRACTION, artifact_dtype, choose_sharding,
                                    fsdp_arguments, inference_placement)

GIB = 1 << 30
H100 = 80 * GIB


def shard(mode="auto", method="full", objective="sft", world_size=8, gpu_memory=H100, parameters=8_000_000_000):
    return choose_sharding(mode, method=method, objective=objective, world_size=world_size,
                           gpu_memory=gpu_memory, parameters=parameters)


def test_auto_shards_full_fine_tuning_of_an_8b_model_and_not_of_a_small_one():
    assert shard(parameters=8_000_000_000)  # 128 GB of fp32 weights, gradients, AdamW moments
    assert not shard(parameters=1_000_000_000)  # 16 GB: replicated fits beside activations
    boundary = int(SHARDING_MEMORY_FRACTION * H100 / 16)
    assert not shard(parameters=boundary) and shard(parameters=boundary + 1)


def test_auto_never_shards_adapters():
    assert not shard(method="lora", parameters=70_000_000_000)


def test_auto_never_shards_one_process_a_cpu_qlora_or_dpo():
    assert not shard(world_size=1)
    assert not shard(gpu_memory=None)  # CPU processes: nothing measured, nothing sharded
    assert not shard(method="qlora", parameters=70_000_000_000)
    assert not shard(objective="dpo")


def test_none_never_shards_and_fsdp_always_does_where_it_can():
    assert not shard("none", parameters=70_000_000_000)
    assert shard("fsdp", world_size=2, parameters=1000, gpu_memory=None)


@pytest.mark.parametrize("kwargs, field", [
    ({"world_size": 1}, "at least 2 training processes"),
    ({"method": "lora"}, "method.type full"),
    ({"method": "qlora"}, "method.type full"),
    ({"objective": "dpo"}, "method.type full"),
])
def test_fsdp_where_it_cannot_shard_is_refused_naming_the_field(kwargs, field):
    with pytest.raises(ConfigError, match="training.sharding fsdp") as err:
        shard("fsdp", **kwargs)
    assert field in str(err.value)


def test_fsdp_arguments_are_fsdp2_with_sharded_checkpoints_and_fsdps_own_activation_checkpointing():
    args = fsdp_arguments(gradient_checkpointing=True)
    assert args["fsdp"] is True and args["gradient_checkpointing"] is False
    assert args["fsdp_config"]["version"] == 2
    assert args["fsdp_config"]["state_dict_type"] == "SHARDED_STATE_DICT"
    assert args["fsdp_config"]["activation_checkpointing"] is True


def test_artifacts_keep_the_models_own_dtype_not_the_fp32_master_weights():
    assert artifact_dtype("bfloat16", torch.float32) == torch.bfloat16
    assert artifact_dtype(torch.float16, torch.float32) == torch.float16
    assert artifact_dtype(None, torch.bfloat16) == torch.bfloat16  # unknown: the training precision
    assert artifact_dtype("int8", torch.float32) == torch.float32


def test_merge_and_evaluation_run_on_the_gpu_in_the_models_dtype():
    assert inference_placement(torch.bfloat16, cuda=True, cpu_bf16=False) == ("cuda", torch.bfloat16)
    assert inference_placement(torch.bfloat16, cuda=False, cpu_bf16=True) == ("cpu", torch.bfloat16)
    # A CPU without native bf16 (emulated: slower than fp32), or fp16 on any CPU.
    assert inference_placement(torch.bfloat16, cuda=False, cpu_bf16=False) == ("cpu", torch.float32)
    assert inference_placement(torch.float16, cuda=False, cpu_bf16=True) == ("cpu", torch.float32)


def bf16_copy(tiny_model, tmp_path):
    """The tiny model stored in bf16, as today's models are."""
    import shutil

    from transformers import AutoModelForCausalLM

    target = tmp_path / "bf16-model"
    AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.bfloat16).save_pretrained(target)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (tiny_model / name).is_file():
            shutil.copy(tiny_model / name, target / name)
    return target


def saved_dtype(folder):
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return {f.get_tensor(k).dtype for k in f.keys()}


@pytest.mark.slow  # loads, saves and merges models
def test_full_fine_tuning_and_merges_save_the_models_dtype_and_merge_where_evaluation_runs(
        trainer_config, tiny_model, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune_trainer import artifacts
    from finetune_trainer.config import TrainerConfig
    from finetune_trainer.model import cpu_supports_bf16, load_base_for_inference

    source = bf16_copy(tiny_model, tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(source)
    full = TrainerConfig.load(trainer_config(name="full.json", model={"source": str(source)},
                                             method={"type": "full", "lora": None}, training={"precision": "fp32"}))
    trained = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)  # fp32 master weights
    merged = artifacts.save(full, trained, tokenizer)["merged"]
    assert saved_dtype(merged) == {torch.bfloat16}

    lora = TrainerConfig.load(trainer_config(name="lora.json", model={"source": str(source)},
                                             output={"merge": True}, training={"precision": "fp32"}))
    base = load_base_for_inference(lora)
    assert base.dtype == (torch.bfloat16 if cpu_supports_bf16() else torch.float32)
    adapter = get_peft_model(AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32),
                             LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    paths = artifacts.save(lora, adapter, tokenizer)
    assert saved_dtype(paths["merged"]) == {torch.bfloat16}


def test_evaluation_after_full_fine_tuning_frees_the_optimizer_and_reuses_the_trained_model():
    from types import SimpleNamespace

    from finetune_trainer.evaluate import evaluation_model

    model = torch.nn.Linear(2, 2)
    trainer = SimpleNamespace(model=model, model_wrapped=model, optimizer=object(), lr_scheduler=object())
    full = SimpleNamespace(method=SimpleNamespace(type="full"))
    assert evaluation_model(full, trainer, {}, sharded=False) is model
    assert trainer.optimizer is None and trainer.lr_scheduler is None
