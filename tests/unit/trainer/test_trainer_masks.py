"""Loss is computed only on what the model should learn to write.

prompt/completion: prompt tokens are masked (-100), completion tokens are trained.
chat: with a template that has {% generation %} tags, only the assistant's turns train.
text: every real token trains, padding never does.
"""

from __future__ import annotations

import pytest

from finetune_trainer.config import TrainerConfig
from finetune_trainer.model import Precision
from finetune_trainer.train import build_sft_config, choose_packing, data_kind, make_trainer

IGNORE = -100


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.fixture(scope="module")
def model(tiny_model):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model)


def collated(tmp_path, tiny_model, model, tokenizer, records, fmt):
    cfg = TrainerConfig.from_dict({
        "model": {"source": str(tiny_model)},
        "method": {"type": "full"},
        "dataset": {"source": "unused.jsonl", "format": fmt},
        "training": {"maxSeqLength": 128, "precision": "fp32", "perDeviceBatchSize": 2},
        "paths": {"root": str(tmp_path)},
    })
    args = build_sft_config(cfg, Precision("fp32", "fp32"), has_eval=False, kind=data_kind(records),
                            tokenizer=tokenizer, packing=False)
    trainer = make_trainer(model, args, tokenizer, records, [])
    rows = [trainer.train_dataset[i] for i in range(len(records))]
    return trainer.data_collator(rows)


def trained_text(tokenizer, batch, row):
    ids, labels = batch["input_ids"][row].tolist(), batch["labels"][row].tolist()
    return tokenizer.decode([i for i, label in zip(ids, labels) if label != IGNORE])


def test_prompt_tokens_are_masked_and_completion_tokens_train(tmp_path, tiny_model, model, tokenizer):
    records = [{"prompt": "What is two plus two?", "completion": " four"},
               {"prompt": "Name a color, please, any color at all:", "completion": " blue"}]

    batch = collated(tmp_path, tiny_model, model, tokenizer, records, "instruction")

    prompt_len = len(tokenizer(records[0]["prompt"], add_special_tokens=False)["input_ids"])
    assert set(batch["labels"][0][:prompt_len].tolist()) == {IGNORE}
    assert trained_text(tokenizer, batch, 0) == " four" + tokenizer.eos_token
    assert trained_text(tokenizer, batch, 1) == " blue" + tokenizer.eos_token


def test_chat_trains_only_the_assistant_turns(tmp_path, tiny_model, model, tokenizer):
    records = [{"messages": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Say hi"},
        {"role": "assistant", "content": "hi"},
        {"role": "user", "content": "Say bye"},
        {"role": "assistant", "content": "bye"},
    ]}]

    batch = collated(tmp_path, tiny_model, model, tokenizer, records, "chat")

    assert trained_text(tokenizer, batch, 0) == "hi<|im_end|>bye<|im_end|>"


def test_text_trains_every_token_but_padding(tmp_path, tiny_model, model, tokenizer):
    records = [{"text": "The cat sat on the mat."}, {"text": "A dog."}]

    batch = collated(tmp_path, tiny_model, model, tokenizer, records, "text")

    short = batch["labels"][1].tolist()
    real = int(batch["attention_mask"][1].sum())
    assert all(label != IGNORE for label in short[:real])
    assert all(label == IGNORE for label in short[real:])
    assert trained_text(tokenizer, batch, 1) == "A dog." + tokenizer.eos_token


def test_packing_auto_packs_only_with_cuda():
    assert choose_packing("auto", cuda=False) is False
    # #16 item 5: CUDA alone is not enough; without a variable-length kernel packing is dearer.
    assert choose_packing("auto", cuda=True) is False
    assert choose_packing("auto", cuda=True, varlen=True) is True
    assert choose_packing("auto", cuda=False, varlen=True) is False
    assert choose_packing("on", cuda=False) is True
    assert choose_packing("off", cuda=True) is False


def test_bf16_on_a_cpu_without_bf16_falls_back_to_fp32(monkeypatch, caplog):
    import torch

    from finetune_trainer import model as model_module

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(model_module, "cpu_supports_bf16", lambda: False)

    precision = model_module.resolve_precision("bf16")

    assert precision.effective == "fp32"
    assert "training in fp32" in caplog.text
