"""Each dataset format converts to the record shape TRL's SFTTrainer takes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from finetune_trainer.config import DatasetConfig, DedupConfig
from finetune_trainer.data import INSTRUCTION_TEMPLATE, INSTRUCTION_WITH_INPUT_TEMPLATE, prepare_dataset


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def prepare(path: Path, fmt: str, **overrides) -> list[dict]:
    cfg = DatasetConfig(source=str(path), format=fmt, eval_fraction=0.0, min_examples=1,
                        dedup=DedupConfig(exact=False, near_threshold=0), **overrides)
    return prepare_dataset(cfg, seed=1, max_seq_length=4096).train


def test_instruction_becomes_prompt_and_completion(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"instruction": "Name a colour", "output": "blue"},
        {"instruction": "Translate", "input": "hello", "output": "bonjour"},
    ])

    train = prepare(path, "instruction")

    assert train == [
        {"prompt": INSTRUCTION_TEMPLATE.format(instruction="Name a colour"), "completion": "blue"},
        {"prompt": INSTRUCTION_WITH_INPUT_TEMPLATE.format(instruction="Translate", input="hello"),
         "completion": "bonjour"},
    ]
    assert train[1]["prompt"] == "### Instruction:\nTranslate\n\n### Input:\nhello\n\n### Response:\n"


def test_completion_keeps_prompt_and_completion(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "2+2=", "completion": "4", "extra": 1}])

    assert prepare(path, "completion") == [{"prompt": "2+2=", "completion": "4"}]


def test_text_keeps_text(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "some prose", "meta": "x"}])

    assert prepare(path, "text") == [{"text": "some prose"}]


def test_openai_chat_jsonl_becomes_messages(tmp_path):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello.", "weight": 1},
    ]
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": messages}])

    assert prepare(path, "chat") == [{"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
    ]}]


def test_sharegpt_conversations_convert_through_the_field_map(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"conversations": [
        {"from": "human", "value": "What is 2+2?"},
        {"from": "gpt", "value": "4"},
    ]}])
    field_map = {"conversations": "messages", "from": "role", "value": "content",
                 "human": "user", "gpt": "assistant"}

    assert prepare(path, "chat", field_map=field_map) == [{"messages": [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
    ]}]


def test_field_map_renames_instruction_columns(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "Why?", "answer": "Because."}])

    train = prepare(path, "instruction", field_map={"question": "instruction", "answer": "output"})

    assert train == [{"prompt": INSTRUCTION_TEMPLATE.format(instruction="Why?"),
                      "completion": "Because."}]


@pytest.mark.parametrize("record, message", [
    ({"messages": [{"role": "user", "content": "hi"}]}, "not 'assistant'"),
    ({"messages": [{"role": "bot", "content": "hi"}]}, "messages[0].role 'bot' is not one of"),
    ({"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "x"}]},
     "messages[0].content is an empty string"),
    ({"messages": "hi"}, 'field "messages" must be a list, got str'),
    ({"conversations": []}, "ShareGPT data? map it"),
])
def test_chat_records_are_checked(tmp_path, record, message):
    path = write_jsonl(tmp_path / "d.jsonl", [record])
    cfg = DatasetConfig(source=str(path), format="chat", min_examples=0)

    from finetune_trainer.data import inspect_dataset

    report = inspect_dataset(cfg, seed=1, max_seq_length=512).report

    assert not report.usable
    assert report.first_errors[0].startswith("line 1: ")
    assert message in report.first_errors[0]
