"""Trainer fields the issue 17 audit had not tied to an effect: method.quantization (the
BitsAndBytesConfig the 4-bit base is loaded with), dataset.split (the split asked of a hub
dataset) and training.maxSeqLength (TRL's max_length)."""

from __future__ import annotations

import pytest

from finetune_trainer.config import ConfigError, TrainerConfig


def config(tmp_path, **spec) -> TrainerConfig:
    return TrainerConfig.from_dict({"model": {"source": "/m"}, "dataset": {"source": "x.jsonl"},
                                    "paths": {"root": str(tmp_path)}, **spec})


def test_quantization_fields_shape_the_bitsandbytes_config(tmp_path):
    import torch

    from finetune_trainer.model import quantization_config

    default = quantization_config(config(tmp_path, method={"type": "qlora"}).method.quantization)
    assert (default.load_in_4bit, default.bnb_4bit_quant_type, default.bnb_4bit_use_double_quant,
            default.bnb_4bit_compute_dtype) == (True, "nf4", True, torch.bfloat16)
    quant = config(tmp_path, method={"type": "qlora", "quantization": {
        "bits": 4, "quantType": "fp4", "doubleQuant": False, "computeDtype": "fp16"}}).method.quantization
    chosen = quantization_config(quant)
    assert (chosen.load_in_4bit, chosen.load_in_8bit, chosen.bnb_4bit_quant_type,
            chosen.bnb_4bit_use_double_quant, chosen.bnb_4bit_compute_dtype,
            chosen.bnb_4bit_quant_storage) == (True, False, "fp4", False, torch.float16, torch.float16)
    quant.bits = 8  # the CRD admits only 4; a hand-written config is refused, naming the field
    with pytest.raises(ConfigError, match="method.quantization.bits"):
        quantization_config(quant)


def test_dataset_split_is_the_split_asked_of_a_hub_dataset(tmp_path, monkeypatch):
    """The Hugging Face Hub is the internet: `datasets.load_dataset` is replaced by a stand-in
    that records what it was asked and returns rows of that split."""
    import datasets

    from finetune_trainer.data import prepare_dataset
    from tests.unit.trainer.test_data_clean import text_config

    asked = []

    def load_dataset(name, split=None, **kwargs):
        asked.append((name, split))
        return [{"text": f"{split} row {i} with some words"} for i in range(4)]

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    prepared = prepare_dataset(text_config("hf://org/corpus", split="validation"), seed=0, max_seq_length=512)
    assert asked == [("org/corpus", "validation")]
    assert all(r["text"].startswith("validation row") for r in prepared.train) and len(prepared.train) == 4


def test_max_seq_length_is_trls_max_length(tmp_path):
    from finetune_trainer.model import resolve_precision
    from finetune_trainer.objectives.sft import build_sft_config

    for length in (128, 3072):
        cfg = config(tmp_path, training={"maxSeqLength": length, "precision": "fp32"})
        args = build_sft_config(cfg, resolve_precision("fp32"), has_eval=False, kind="prompt-completion",
                                tokenizer=None, packing=False)
        assert args.max_length == length
