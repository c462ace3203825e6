"""Fields that were accepted and then ignored (issue 17), each with its effect: nearThreshold 1
turns near-duplicate removal off, a mix without a format uses the dataset's format."""

from __future__ import annotations

import random

from finetune_trainer.config import DedupConfig, MixConfig
from finetune_trainer.data import prepare_dataset
from tests.unit.trainer.test_data_clean import random_text, text_config, write_jsonl


def near_pair(tmp_path):
    text = random_text(random.Random(1))
    words = text.split()
    words[-1] = "keep"  # Jaccard 37/39 = 0.95 with the original
    return write_jsonl(tmp_path / "d.jsonl", [{"text": text}, {"text": " ".join(words)}])


def test_near_threshold_one_disables_near_dedup(tmp_path):
    source = near_pair(tmp_path)
    on = prepare_dataset(text_config(source, dedup=DedupConfig(exact=True, near_threshold=0.9)),
                         seed=0, max_seq_length=4096)
    off = prepare_dataset(text_config(source, dedup=DedupConfig(exact=True, near_threshold=1)),
                          seed=0, max_seq_length=4096)

    assert on.report.near_duplicates_removed == 1
    assert off.report.near_duplicates_removed == 0 and len(off.train) == 2


def test_a_mix_without_format_takes_the_datasets_format(tmp_path):
    main = write_jsonl(tmp_path / "main.jsonl", [{"text": f"main text number {i}"} for i in range(20)])
    general = write_jsonl(tmp_path / "general.jsonl", [{"text": f"general text {i}"} for i in range(20)])

    prepared = prepare_dataset(text_config(main, mix=MixConfig(source=str(general), ratio=0.5)),
                               seed=0, max_seq_length=512)

    assert prepared.report.mix_examples == 10
    assert sum(r["text"].startswith("general") for r in prepared.train) == 10


def test_perplexity_picks_the_best_checkpoint_as_the_lowest_eval_loss(tmp_path):
    from finetune_trainer.config import TrainerConfig
    from finetune_trainer.model import resolve_precision
    from finetune_trainer.objectives.common import training_kwargs

    def kwargs(metric):
        cfg = TrainerConfig.from_dict({"model": {"source": "/m"}, "dataset": {"source": "x.jsonl"},
                                       "training": {"metricForBestModel": metric, "precision": "fp32"},
                                       "paths": {"root": str(tmp_path)}})
        return training_kwargs(cfg, resolve_precision("fp32"), has_eval=True)

    for metric in ("perplexity", "eval_loss"):
        args = kwargs(metric)
        assert args["metric_for_best_model"] == "eval_loss" and args["greater_is_better"] is False


def test_evaluation_metrics_score_the_eval_set_not_only_prompts(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune_trainer.config import TrainerConfig
    from finetune_trainer.evaluate import evaluate_run
    from finetune_trainer.train import evaluation_status

    cfg = TrainerConfig.from_dict({
        "model": {"source": str(tiny_model)}, "dataset": {"source": "x.jsonl", "format": "instruction"},
        "evaluation": {"metrics": ["exactMatch", "rouge"], "maxNewTokens": 4},
        "paths": {"root": str(tmp_path)}})
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    records = [{"prompt": f"### Instruction:\nSay {w}\n\n### Response:\n", "completion": w}
               for w in ("arr", "ahoy", "matey")] + [{"text": "no answer to score"}]

    report = evaluate_run(cfg, model, tokenizer, eval_metrics={"eval_loss": 2.0},
                          base_loader=lambda: model, eval_records=records)

    scores = report["evalSetScores"]
    assert scores["examples"] == 3
    assert set(scores["finetuned"]) == {"exactMatch", "rouge1", "rouge2", "rougeL"} == set(scores["base"])
    assert "scores" not in report  # no prompts were given
    assert evaluation_status(report)["evalSetScores"]["examples"] == 3


def test_training_hyperparameters_reach_the_training_arguments(tmp_path):
    from finetune_trainer.config import TrainerConfig
    from finetune_trainer.model import resolve_precision
    from finetune_trainer.objectives.common import training_kwargs

    cfg = TrainerConfig.from_dict({
        "model": {"source": "/m"}, "dataset": {"source": "x.jsonl"},
        "training": {"epochs": 2.5, "perDeviceBatchSize": 3, "gradientAccumulationSteps": 5,
                     "lrScheduler": "linear", "warmupSteps": 7, "weightDecay": 0.03,
                     "optimizer": "adamw_torch", "maxGradNorm": 0.7, "gradientCheckpointing": True,
                     "loggingSteps": 9, "evalSteps": 20, "saveSteps": 40, "precision": "fp32"},
        "paths": {"root": str(tmp_path)}})

    args = training_kwargs(cfg, resolve_precision("fp32"), has_eval=True)

    assert {k: args[k] for k in ("num_train_epochs", "per_device_train_batch_size",
                                 "gradient_accumulation_steps", "lr_scheduler_type", "warmup_steps",
                                 "weight_decay", "optim", "max_grad_norm", "gradient_checkpointing",
                                 "logging_steps", "eval_steps", "save_steps")} == {
        "num_train_epochs": 2.5, "per_device_train_batch_size": 3, "gradient_accumulation_steps": 5,
        "lr_scheduler_type": "linear", "warmup_steps": 7, "weight_decay": 0.03, "optim": "adamw_torch",
        "max_grad_norm": 0.7, "gradient_checkpointing": True, "logging_steps": 9, "eval_steps": 20,
        "save_steps": 40}
    ratio = TrainerConfig.from_dict({"model": {"source": "/m"}, "dataset": {"source": "x.jsonl"},
                                     "training": {"warmupRatio": 0.1, "precision": "fp32"},
                                     "paths": {"root": str(tmp_path)}})
    assert training_kwargs(ratio, resolve_precision("fp32"), has_eval=False)["warmup_steps"] == 0.1


def test_evaluation_prompts_are_answered_by_both_models_within_max_new_tokens(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune_trainer.config import TrainerConfig
    from finetune_trainer.evaluate import evaluate_run

    def run(max_new_tokens):
        cfg = TrainerConfig.from_dict({
            "model": {"source": str(tiny_model)}, "dataset": {"source": "x.jsonl", "format": "text"},
            "evaluation": {"metrics": ["exactMatch"], "maxNewTokens": max_new_tokens,
                           "prompts": [{"prompt": "Describe a teapot.", "reference": "Arr"},
                                       {"prompt": "Say hi."}]},
            "paths": {"root": str(tmp_path)}})
        return evaluate_run(cfg, model, tokenizer, eval_metrics={}, base_loader=lambda: model)

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    short, longer = run(1), run(6)

    assert [g["prompt"] for g in short["generations"]] == ["Describe a teapot.", "Say hi."]
    assert [g["reference"] for g in short["generations"]] == ["Arr", None]
    assert set(short["scores"]["finetuned"]) == {"exactMatch"}  # scored on the prompt with a reference
    for g in short["generations"]:
        assert len(tokenizer(g["finetuned"], add_special_tokens=False)["input_ids"]) <= 1
    assert max(len(tokenizer(g["finetuned"], add_special_tokens=False)["input_ids"])
               for g in longer["generations"]) > 1


def test_lora_alpha_and_dropout_shape_the_adapter_and_early_stopping_takes_its_threshold(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM, EarlyStoppingCallback

    from finetune_trainer.config import TrainerConfig
    from finetune_trainer.model import adapter_config, model_location
    from finetune_trainer.train import SignalGuard, _callbacks

    cfg = TrainerConfig.from_dict({
        "model": {"source": str(tiny_model), "trustRemoteCode": True},
        "method": {"type": "lora", "lora": {"r": 4, "alpha": 24, "dropout": 0.2}},
        "dataset": {"source": "x.jsonl"},
        "training": {"earlyStopping": {"patience": 2, "threshold": 0.05}},
        "paths": {"root": str(tmp_path)}})

    lora = adapter_config(cfg, AutoModelForCausalLM.from_pretrained(tiny_model))
    assert (lora.r, lora.lora_alpha, lora.lora_dropout) == (4, 24, 0.2)
    early = [c for c in _callbacks(cfg, None, True, SignalGuard()) if isinstance(c, EarlyStoppingCallback)]
    assert early[0].early_stopping_threshold == 0.05
    assert model_location(cfg.model)[1]["trust_remote_code"] is True
