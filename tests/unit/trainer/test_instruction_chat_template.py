"""Instruction and completion records through the model's chat template (issue 16 item 8).

An adapter served through /v1/chat/completions is asked through the chat template; it must
have been trained through it too. With a template, an instruction record is the conversation
user = instruction (and input, after a blank line), assistant = output, rendered and masked as
chat records are; a completion record user = prompt, assistant = completion. A base model
without any template keeps the Alpaca prompt (instruction) and the raw prompt (completion).

The Llama-3.1-style model is the tiny model with Llama 3.1's special tokens and a template
written for the tests (tests/fixtures/llama31.py); no hub.
"""

from __future__ import annotations

import json
import re

import pytest

from finetune_api.models import ChatTemplate
from finetune_api.prompts import INSTRUCTION_TEMPLATE, INSTRUCTION_WITH_INPUT_TEMPLATE
from finetune_trainer.config import DatasetConfig, DedupConfig, TrainerConfig
from finetune_trainer.data import inspect_dataset
from finetune_trainer.data.command import validate_cli
from tests.fixtures.llama31 import llama31_model  # noqa: F401 - a fixture
from tests.fixtures.ml import write_jsonl

IGNORE = -100
EOT = "<|eot_id|>"

TRANSLATE = {"instruction": "Translate to French", "input": "cheese", "output": "fromage"}
COLOUR = {"instruction": "Name a colour", "input": "", "output": "blue"}


@pytest.fixture(scope="module")
def tokenizer(llama31_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(llama31_model)


@pytest.fixture(scope="module")
def base_tokenizer(llama31_model):
    """The same tokenizer as a base model's: no chat template at all."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(llama31_model)
    tokenizer.chat_template = None
    return tokenizer


@pytest.fixture(scope="module")
def model(llama31_model):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(llama31_model)


def prepare(tmp_path, tokenizer, records, fmt, *, max_len=512, policy="truncate"):
    cfg = DatasetConfig(source=str(write_jsonl(tmp_path / f"{fmt}.jsonl", records)), format=fmt,
                        eval_fraction=0.0, min_examples=1, max_invalid_fraction=0.5,
                        length_policy=policy, dedup=DedupConfig(exact=True, near_threshold=0))
    return inspect_dataset(cfg, seed=0, max_seq_length=max_len, tokenizer=tokenizer)


def trained_rows(tmp_path, model_dir, model, tokenizer, records):
    """The rows SFTTrainer trains on (input_ids and labels), through its own collator."""
    from finetune_trainer.model import Precision
    from finetune_trainer.objectives.sft import build_sft_config, data_kind, make_sft_trainer

    cfg = TrainerConfig.from_dict({
        "model": {"source": str(model_dir)}, "method": {"type": "full"},
        "dataset": {"source": "unused.jsonl", "format": "instruction"},
        "training": {"maxSeqLength": 512, "precision": "fp32", "perDeviceBatchSize": 2},
        "paths": {"root": str(tmp_path)},
    })
    args = build_sft_config(cfg, Precision("fp32", "fp32"), has_eval=False, kind=data_kind(records),
                            tokenizer=tokenizer, packing=False)
    trainer = make_sft_trainer(model, args, tokenizer, records, [])
    rows = [trainer.train_dataset[i] for i in range(len(records))]
    batch = trainer.data_collator(rows)
    out = []
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        out.append({"input_ids": batch["input_ids"][i][:n].tolist(), "labels": batch["labels"][i][:n].tolist()})
    return out


def trained_spans(tokenizer, row) -> list[str]:
    spans, run = [], []
    for token, label in zip(row["input_ids"], row["labels"]):
        if label != IGNORE:
            run.append(token)
        elif run:
            spans.append(tokenizer.decode(run))
            run = []
    if run:
        spans.append(tokenizer.decode(run))
    return spans


def test_an_instruction_record_is_rendered_as_the_templates_user_assistant_turns(
        tmp_path, llama31_model, model, tokenizer):
    prepared = prepare(tmp_path, tokenizer, [TRANSLATE, COLOUR], "instruction")

    assert prepared.report.usable and prepared.report.prompt_format == "chat-template"
    conversation = [{"role": "user", "content": "Translate to French\n\ncheese"},
                    {"role": "assistant", "content": "fromage"}]
    assert prepared.train == [
        {"messages": conversation},
        {"messages": [{"role": "user", "content": "Name a colour"}, {"role": "assistant", "content": "blue"}]},
    ]

    rows = trained_rows(tmp_path, llama31_model, model, tokenizer, prepared.train)

    rendered = tokenizer.apply_chat_template(conversation, tokenize=False)
    assert "### Instruction" not in rendered
    assert rows[0]["input_ids"] == tokenizer(rendered, add_special_tokens=False)["input_ids"]
    # The loss is on the assistant turn and its end-of-turn token only: not on the date
    # header, the user turn or the assistant header.
    assert trained_spans(tokenizer, rows[0]) == ["fromage" + EOT]
    assert trained_spans(tokenizer, rows[1]) == ["blue" + EOT]
    assert rows[0]["labels"][-1] == tokenizer.convert_tokens_to_ids(EOT)
    # Lengths are those of the rendering (the report's percentiles).
    assert prepared.report.token_length_percentiles["max"] == len(rows[0]["input_ids"])


def test_a_completion_record_is_the_user_prompt_and_the_assistant_completion(
        tmp_path, llama31_model, model, tokenizer):
    records = [{"prompt": "2 + 2 =", "completion": "4"}, {"prompt": "", "completion": "a whole poem"}]

    prepared = prepare(tmp_path, tokenizer, records, "completion")

    assert prepared.report.prompt_format == "chat-template"
    assert prepared.train == [
        {"messages": [{"role": "user", "content": "2 + 2 ="}, {"role": "assistant", "content": "4"}]},
        # No prompt: an empty user turn (transformers renders no conversation without one).
        {"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "a whole poem"}]},
    ]
    rows = trained_rows(tmp_path, llama31_model, model, tokenizer, prepared.train)
    assert trained_spans(tokenizer, rows[0]) == ["4" + EOT]
    assert trained_spans(tokenizer, rows[1]) == ["a whole poem" + EOT]


def test_a_record_too_long_as_rendered_is_reported_with_its_line(tmp_path, tokenizer):
    from finetune_trainer.chat_templates import ChatRenderer

    long = {"instruction": "Summarise", "output": " ".join(f"word{i}" for i in range(120))}
    renderer = ChatRenderer(tokenizer)
    short_tokens = renderer.count({"messages": [{"role": "user", "content": "Name a colour"},
                                                {"role": "assistant", "content": "blue"}]})
    long_tokens = renderer.count({"messages": [{"role": "user", "content": "Summarise"},
                                               {"role": "assistant", "content": long["output"]}]})
    limit = short_tokens + 10  # the short record fits as rendered; the long one does not
    assert long_tokens > limit

    dropped = prepare(tmp_path, tokenizer, [COLOUR, long], "instruction", max_len=limit, policy="drop")

    assert dropped.report.dropped_too_long == 1 and len(dropped.train) == 1
    assert f"1 record over training.maxSeqLength ({limit} tokens as rendered with the chat template) " \
           f"dropped (lengthPolicy drop): line 2 ({long_tokens} tokens)" in dropped.report.warnings

    truncated = prepare(tmp_path, tokenizer, [COLOUR, long], "instruction", max_len=limit)

    assert truncated.report.truncated == 1
    assert any("line 2" in w and "truncated" in w for w in truncated.report.warnings), truncated.report.warnings
    cut = renderer.render(truncated.train[1])
    assert len(cut.input_ids) <= limit
    assert cut.input_ids[-1] == tokenizer.convert_tokens_to_ids(EOT)  # the turn keeps its end


def test_a_base_model_without_a_template_keeps_the_alpaca_prompt(tmp_path, base_tokenizer):
    prepared = prepare(tmp_path, base_tokenizer, [TRANSLATE, COLOUR], "instruction")

    assert prepared.report.usable and prepared.report.prompt_format == "alpaca"
    assert prepared.train == [
        {"prompt": INSTRUCTION_WITH_INPUT_TEMPLATE.format(instruction="Translate to French", input="cheese"),
         "completion": "fromage"},
        {"prompt": INSTRUCTION_TEMPLATE.format(instruction="Name a colour"), "completion": "blue"},
    ]
    raw = prepare(tmp_path, base_tokenizer, [{"prompt": "2 + 2 =", "completion": " 4"}], "completion")
    assert raw.report.prompt_format == "raw"
    assert raw.train == [{"prompt": "2 + 2 =", "completion": " 4"}]


def test_a_template_chosen_by_dataset_chat_template_renders_instruction_records(tmp_path, llama31_model):
    """A base model without a template, given one by dataset.chatTemplate.name."""
    from transformers import AutoTokenizer

    from finetune_trainer.chat_templates import select

    tokenizer = AutoTokenizer.from_pretrained(llama31_model)
    tokenizer.chat_template = None
    select(tokenizer, ChatTemplate(name="llama-3.1"))

    prepared = prepare(tmp_path, tokenizer, [COLOUR], "instruction")

    assert prepared.report.prompt_format == "chat-template"
    assert prepared.train[0]["messages"][0] == {"role": "user", "content": "Name a colour"}


def test_with_a_template_chat_data_mixes_into_an_instruction_dataset(tmp_path, tokenizer):
    """Both are conversations once instruction records go through the template; without a
    template, prompt/completion and chat records still cannot be mixed."""
    from finetune_trainer.config import MixConfig

    mix = write_jsonl(tmp_path / "mix.jsonl", [
        {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
        for i in range(4)])
    cfg = DatasetConfig(source=str(write_jsonl(tmp_path / "main.jsonl", [TRANSLATE, COLOUR])),
                        format="instruction", eval_fraction=0.0, min_examples=1,
                        mix=MixConfig(source=str(mix), ratio=1.0, format="chat"))

    mixed = inspect_dataset(cfg, seed=0, max_seq_length=512, tokenizer=tokenizer)

    assert mixed.report.usable and mixed.report.mix_examples == 2
    assert all("messages" in r for r in mixed.train) and len(mixed.train) == 4
    # No tokenizer, no template: Alpaca prompt/completion records and chat records do not mix.
    refused = inspect_dataset(cfg, seed=0, max_seq_length=512).report
    assert not refused.usable
    assert refused.problems == ["dataset.mix.format chat makes messages records, which cannot be mixed "
                                "with the prompt-completion records of format instruction"]


def test_validate_data_says_which_prompt_format_it_rendered(tmp_path, llama31_model, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", [TRANSLATE, COLOUR])
    common = [str(data), "--format", "instruction", "--min-examples", "1", "--eval-fraction", "0"]

    assert validate_cli(common + ["--tokenizer", str(llama31_model), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["promptFormat"] == "chat-template"
    assert validate_cli(common) == 0  # no tokenizer: no template to render with
    assert re.search(r"prompt format +alpaca\n", capsys.readouterr().out)


# --- evaluation and comparison ask the way training rendered -----------------------------------


def config(tmp_path, fmt="instruction") -> TrainerConfig:
    return TrainerConfig.from_dict({
        "model": {"source": "unused"}, "method": {"type": "lora"},
        "dataset": {"source": "unused.jsonl", "format": fmt},
        "evaluation": {"prompts": [{"prompt": "Say hi", "reference": "hi"}]},
        "paths": {"root": str(tmp_path)},
    })


def test_evaluation_prompts_are_rendered_in_the_trained_format(tmp_path, tokenizer, base_tokenizer):
    from finetune_trainer.evaluate import format_prompt, trained_prompt_format

    cfg = config(tmp_path)
    assert trained_prompt_format(cfg) == "alpaca"  # recorded none: trained before, with Alpaca
    cfg.paths.reports.mkdir(parents=True)
    (cfg.paths.reports / "dataset.json").write_text(json.dumps({"promptFormat": "chat-template"}))
    assert trained_prompt_format(cfg) == "chat-template"
    assert format_prompt(cfg, tokenizer, "Say hi", "alpaca") == INSTRUCTION_TEMPLATE.format(instruction="Say hi")

    assert format_prompt(cfg, tokenizer, "Say hi") == tokenizer.apply_chat_template(
        [{"role": "user", "content": "Say hi"}], add_generation_prompt=True, tokenize=False)
    assert format_prompt(cfg, base_tokenizer, "Say hi") == INSTRUCTION_TEMPLATE.format(instruction="Say hi")
    assert format_prompt(config(tmp_path, "completion"), base_tokenizer, "Say hi") == "Say hi"


@pytest.mark.parametrize("recorded, asked_as", [("chat-template", "messages"), ("alpaca", "alpaca"),
                                                ("raw", "raw")])
def test_the_comparison_asks_in_the_format_training_recorded(tmp_path, recorded, asked_as):
    from finetune_trainer.compare import items_for

    cfg = config(tmp_path)
    cfg.paths.reports.mkdir(parents=True)
    (cfg.paths.reports / "dataset.json").write_text(json.dumps({"promptFormat": recorded}))

    [item] = items_for(cfg, [], sample_size=0, seed=0)

    if asked_as == "messages":  # through /v1/chat/completions: vLLM renders the template
        assert item.messages == [{"role": "user", "content": "Say hi"}] and item.prompt is None
    else:
        assert item.messages is None
        assert item.prompt == (INSTRUCTION_TEMPLATE.format(instruction="Say hi") if asked_as == "alpaca" else "Say hi")


def test_the_comparison_of_a_run_that_recorded_no_format_asks_as_such_runs_trained(tmp_path):
    """Before the prompt format was recorded, instruction records were trained with the Alpaca
    prompt even when the tokenizer had a template (and wrote it to the artifacts)."""
    from finetune_trainer.chat_templates import ARTIFACT
    from finetune_trainer.compare import items_for

    cfg = config(tmp_path)
    cfg.paths.artifacts.mkdir(parents=True)
    (cfg.paths.artifacts / ARTIFACT).write_text("{{ messages }}")

    assert items_for(cfg, [], sample_size=0, seed=0)[0].prompt == INSTRUCTION_TEMPLATE.format(instruction="Say hi")
    assert items_for(config(tmp_path, "chat"), [], sample_size=0, seed=0)[0].messages == [
        {"role": "user", "content": "Say hi"}]


@pytest.mark.slow
def test_the_comparisons_eval_loss_of_a_chat_sample_is_the_trained_loss(tiny_model):
    """vLLM (CPU build) renders an instruction record's conversation with the tiny model's
    (ChatML) template; the loss it measures on the answer is the loss training computes: the
    answer and its <|im_end|>, not the template's newline after it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune_trainer.chat_templates import ChatRenderer
    from finetune_trainer.compare import _free_port, answer_loss, server_command, serving

    pytest.importorskip("vllm")
    messages = [{"role": "user", "content": "Repeat the word red 2 times."}]
    answer = "red red"
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, torch_dtype=torch.float32)
    rendered = ChatRenderer(tokenizer).render({"messages": messages + [{"role": "assistant", "content": answer}]})
    ids = torch.tensor([rendered.input_ids])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
    trained = [-logprobs[i - 1, rendered.input_ids[i]].item()
               for i, m in enumerate(rendered.assistant_masks) if m and i > 0]
    expected = sum(trained) / len(trained)

    port = _free_port()
    argv = server_command(str(tiny_model), "tiny", port, max_model_len=256) + ["--dtype", "float32"]
    with serving(argv, port, cpu=True) as url:
        measured = answer_loss(url, "tiny", messages, answer)

    assert measured == pytest.approx(expected, rel=1e-3)
