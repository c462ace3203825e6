"""The `preference` dataset format: {prompt, chosen, rejected} (strings or chat messages) and
OpenAI's DPO shape, validated with line-numbered errors; duplicates and lengths per pair."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from finetune_trainer.config import DatasetConfig, DedupConfig
from finetune_trainer.data import inspect_dataset, validate_cli
from finetune_trainer.data.formats import RecordError, convert
from finetune_trainer.data.length import WhitespaceCounter

PLAIN = {"prompt": "Tell me about the sea.", "chosen": "Arr matey, the sea be grand!",
         "rejected": "The sea is fine."}
CHAT = {"prompt": [{"role": "system", "content": "Be a pirate."},
                   {"role": "user", "content": "Tell me about the sea."}],
        "chosen": [{"role": "assistant", "content": "Arr matey, the sea be grand!"}],
        "rejected": [{"role": "assistant", "content": "The sea is fine."}]}
OPENAI = {"input": {"messages": [{"role": "user", "content": "Tell me about the sea."}],
                    "tools": [], "parallel_tool_calls": True},
          "preferred_output": [{"role": "assistant", "content": "Arr matey, the sea be grand!"}],
          "non_preferred_output": [{"role": "assistant", "content": "The sea is fine."}]}


def pairs(n: int, shape: str = "plain") -> list[dict]:
    out = []
    for i in range(n):
        topic = f"topic number {i} with words {i * 13} and {i * 7}"
        record = {"prompt": f"Tell me about {topic}.", "chosen": f"Arr matey, {topic} be grand!",
                  "rejected": f"{topic} is fine."}
        if shape == "openai":
            record = {"input": {"messages": [{"role": "user", "content": record["prompt"]}]},
                      "preferred_output": [{"role": "assistant", "content": record["chosen"]}],
                      "non_preferred_output": [{"role": "assistant", "content": record["rejected"]}]}
        out.append(record)
    return out


def write(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def test_plain_pairs_stay_strings():
    example = convert(PLAIN, "preference", {}, "line 1")
    assert example.record == PLAIN
    assert "Arr matey" in example.dedup_text and "The sea is fine" in example.dedup_text


def test_chat_prompt_pairs_are_conversational():
    example = convert(CHAT, "preference", {}, "line 1")
    assert example.record["prompt"][0] == {"role": "system", "content": "Be a pirate."}
    assert example.record["chosen"] == [{"role": "assistant", "content": "Arr matey, the sea be grand!"}]


def test_a_chat_prompt_with_string_answers_gets_assistant_messages():
    record = dict(CHAT, chosen="Arr!", rejected="No.")
    converted = convert(record, "preference", {}, "line 1").record
    assert converted["chosen"] == [{"role": "assistant", "content": "Arr!"}]
    assert converted["rejected"] == [{"role": "assistant", "content": "No."}]


def test_openai_dpo_lines_are_accepted_as_they_are():
    converted = convert(OPENAI, "preference", {}, "line 1").record
    assert converted == {"prompt": OPENAI["input"]["messages"],
                         "chosen": OPENAI["preferred_output"],
                         "rejected": OPENAI["non_preferred_output"], "tools": []}


@pytest.mark.parametrize("record, message", [
    ({"chosen": "a", "rejected": "b"}, 'field "prompt" is missing (format: preference)'),
    ({"prompt": "p", "rejected": "b"}, 'field "chosen" is missing (format: preference)'),
    ({"prompt": "p", "chosen": "a", "rejected": 3},
     'field "rejected" must be a string or a list of assistant messages, got int'),
    ({"prompt": "  ", "chosen": "a", "rejected": "b"}, 'field "prompt" is an empty string'),
    ({"prompt": "p", "chosen": "same  answer", "rejected": "same answer"},
     '"chosen" and "rejected" are the same answer'),
    ({"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
      "chosen": "a", "rejected": "b"}, "prompt: the last message is from 'assistant'"),
    ({"prompt": "p", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"},
     "chosen[0].role is 'user'"),
    ({"prompt": [{"role": "pirate", "content": "q"}], "chosen": "a", "rejected": "b"},
     "prompt[0].role 'pirate' is not one of"),
    ({"input": [], "preferred_output": "a", "non_preferred_output": "b"},
     'field "input" must be an object with "messages", got list'),
    ({"input": {"messages": [{"role": "user", "content": "q"}]},
      "preferred_output": [{"role": "assistant", "content": "a"}]},
     'field "non_preferred_output" is missing'),
    ({"input": {"messages": [{"role": "user"}]}, "preferred_output": "a",
      "non_preferred_output": "b"}, 'input.messages[0]: field "content" is missing'),
])
def test_bad_pairs_are_refused_naming_the_field(record, message):
    with pytest.raises(RecordError) as exc:
        convert(record, "preference", {}, "line 1")
    assert message in str(exc.value)


def test_validate_data_checks_both_shapes_with_line_numbers(tmp_path, capsys):
    lines = pairs(12) + pairs(12, "openai")
    lines[3] = {"prompt": "p", "chosen": "a"}
    lines[15] = {"input": {"messages": []}, "preferred_output": "a", "non_preferred_output": "b"}
    lines.insert(20, '{"prompt": "p", "chosen":')
    path = write(tmp_path / "pairs.jsonl", lines)

    code = validate_cli(["--format", "preference", "--json", str(path)])

    report = json.loads(capsys.readouterr().out)
    assert code == 2  # 3 of 25 invalid, over the default maxInvalidFraction 0
    assert report["firstErrors"] == [
        'line 4: field "rejected" is missing (format: preference)',
        'line 16: field "input.messages" is an empty list (format: preference)',
        "line 21: not valid JSON: Expecting value at column 26",
    ]


def test_validate_data_accepts_good_pairs_of_both_shapes(tmp_path, capsys):
    path = write(tmp_path / "pairs.jsonl", pairs(20)[:10] + pairs(20, "openai")[10:])
    assert validate_cli(["--format", "preference", str(path)]) == 0
    assert "result: usable" in capsys.readouterr().out


def _inspect(path: Path, **kwargs):
    cfg = DatasetConfig(source=str(path), format="preference", eval_fraction=0.0, min_examples=1,
                        dedup=kwargs.pop("dedup", DedupConfig(exact=True, near_threshold=0.9)))
    return inspect_dataset(cfg, seed=0, max_seq_length=kwargs.pop("max_seq_length", 512), **kwargs)


def test_duplicates_are_whole_pairs(tmp_path):
    base = pairs(6)
    same_prompt_other_answers = dict(base[0], chosen="A different pirate answer entirely, matey.",
                                     rejected="A different plain answer, nothing more.")
    exact_copy = dict(base[1])
    near_copy = dict(base[2], rejected=base[2]["rejected"] + " indeed")
    path = write(tmp_path / "pairs.jsonl", base + [same_prompt_other_answers, exact_copy, near_copy])

    prepared = _inspect(path)

    assert prepared.report.duplicates_removed == 1
    assert prepared.report.near_duplicates_removed == 1
    # A prompt asked again with other answers is another pair, kept.
    assert same_prompt_other_answers in prepared.train
    assert len(prepared.train) == 7


def test_mixed_shapes_become_one_conversational_dataset(tmp_path):
    path = write(tmp_path / "pairs.jsonl", pairs(6)[:3] + pairs(6, "openai")[3:])
    prepared = _inspect(path)
    assert len(prepared.train) == 6
    assert all(isinstance(r["prompt"], list) and isinstance(r["chosen"], list) for r in prepared.train)


def test_prompt_and_completion_limits_cut_pairs_and_are_reported(tmp_path):
    long_prompt = "word " * 30 + "the question at the end?"
    record = {"prompt": long_prompt, "chosen": "one two three four five six seven eight nine ten",
              "rejected": "ten nine eight seven six five four three two one"}
    path = write(tmp_path / "pairs.jsonl", [record])
    counter = WhitespaceCounter()

    prepared = _inspect(path, max_prompt_length=8, max_completion_length=4)

    pair = prepared.train[0]
    assert pair["prompt"].endswith("the question at the end?")  # a prompt keeps its end
    assert counter.count([pair["prompt"]])[0] <= 8
    assert pair["chosen"].startswith("one two") and counter.count([pair["chosen"]])[0] <= 4
    assert pair["rejected"].startswith("ten nine")
    assert prepared.report.truncated == 1
    assert prepared.report.token_length_percentiles["max"] <= 12


def test_a_chat_prompt_loses_its_oldest_turns_first(tmp_path):
    record = {"prompt": [{"role": "system", "content": "Be brief."},
                         {"role": "user", "content": "old question " * 10},
                         {"role": "assistant", "content": "old answer " * 10},
                         {"role": "user", "content": "The new question?"}],
              "chosen": "Arr.", "rejected": "No."}
    prepared = _inspect(write(tmp_path / "pairs.jsonl", [record]), max_prompt_length=20)
    assert [m["content"] for m in prepared.train[0]["prompt"]] == ["Be brief.", "The new question?"]


def test_pair_length_is_prompt_plus_the_longer_answer_and_drop_policy_applies(tmp_path):
    record = {"prompt": "a b c d e f", "chosen": "one two three", "rejected": " ".join(["x"] * 30)}
    path = write(tmp_path / "pairs.jsonl", [record, dict(record, prompt="short")])
    cfg = DatasetConfig(source=str(path), format="preference", eval_fraction=0.0, min_examples=1,
                        length_policy="drop", dedup=DedupConfig(exact=False, near_threshold=0))

    prepared = inspect_dataset(cfg, seed=0, max_seq_length=40)

    assert prepared.report.dropped_too_long == 2  # 8 + 40 and 1 + 40 approximate tokens > 40
    truncating = inspect_dataset(DatasetConfig(**{**cfg.__dict__, "length_policy": "truncate"}),
                                 seed=0, max_seq_length=40)
    assert truncating.report.truncated == 2
    assert all(len(r["chosen"].split()) == 3 for r in truncating.train)  # the short answer is whole


def test_prompt_limit_counts_real_tokens_with_a_tokenizer(tmp_path, tiny_model):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    prompt = "An old preamble that goes on and on. " * 6 + "Now the question: where is the sea?"
    record = {"prompt": prompt, "chosen": "Arr matey, the sea be grand!", "rejected": "The sea is fine."}
    cfg = DatasetConfig(source=str(write(tmp_path / "pairs.jsonl", [record])), format="preference",
                        eval_fraction=0.0, min_examples=1)

    prepared = inspect_dataset(cfg, seed=0, max_seq_length=512, tokenizer=tokenizer, max_prompt_length=12)

    kept = prepared.train[0]["prompt"]
    assert len(tokenizer(kept, add_special_tokens=False)["input_ids"]) <= 12
    assert prompt.endswith(kept) and kept.endswith("where is the sea?")
    assert prepared.report.token_lengths_approximate is False
