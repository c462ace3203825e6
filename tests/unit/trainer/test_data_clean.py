"""Cleaning: exact and near-duplicate removal, the length policy, no-trainable-token removal."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit

from finetune_trainer.config import DatasetConfig, DedupConfig
from finetune_trainer.data import CHAT_MESSAGE_OVERHEAD, prepare_dataset
from finetune_trainer.data.dedup import near_duplicates

VOCAB = [f"w{i}" for i in range(5000)]


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def word_tokenizer() -> Tokenizer:
    """A real tokenizer where every whitespace-separated word is one token."""
    words = set(VOCAB) | {"keep", "cut", "q", "a", "p", "c", "user", "said", "reply"}
    vocab = {"[UNK]": 0, **{w: i for i, w in enumerate(sorted(words), 1)}}
    tokenizer = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = WhitespaceSplit()
    return tokenizer


def random_text(rng: random.Random, words: int = 40) -> str:
    return " ".join(rng.choice(VOCAB) for _ in range(words))


def text_config(path: Path, **overrides) -> DatasetConfig:
    values = dict(source=str(path), format="text", eval_fraction=0.0, min_examples=1)
    values.update(overrides)
    return DatasetConfig(**values)


def test_exact_duplicates_are_removed_on_normalised_text(tmp_path):
    records = [{"text": "Hello world"}, {"text": "  hello   WORLD "}, {"text": "Hello world!"},
               {"text": "another one"}, {"text": "another one"}]
    cfg = text_config(write_jsonl(tmp_path / "d.jsonl", records),
                      dedup=DedupConfig(exact=True, near_threshold=0))

    prepared = prepare_dataset(cfg, seed=0, max_seq_length=512)

    assert prepared.report.duplicates_removed == 2
    assert prepared.train == [{"text": "Hello world"}, {"text": "Hello world!"},
                              {"text": "another one"}]


def test_near_duplicates_are_removed_and_distinct_records_kept(tmp_path):
    rng = random.Random(7)
    base = [random_text(rng) for _ in range(300)]
    near_copies, far_copies = [], []
    for i in range(0, 60, 2):
        words = base[i].split()
        words[-1] = "keep"  # one of 38 shingles changes: Jaccard 37/39 = 0.95
        near_copies.append(" ".join(words))
    for i in range(1, 60, 2):
        words = base[i].split()
        words[::4] = ["cut"] * len(words[::4])  # every shingle changes
        far_copies.append(" ".join(words))
    records = [{"text": t} for t in base + near_copies + far_copies]
    cfg = text_config(write_jsonl(tmp_path / "d.jsonl", records),
                      dedup=DedupConfig(exact=True, near_threshold=0.9))

    prepared = prepare_dataset(cfg, seed=0, max_seq_length=4096)

    assert prepared.report.near_duplicates_removed == len(near_copies)
    kept = {r["text"] for r in prepared.train}
    assert kept == set(base) | set(far_copies)


def test_near_threshold_above_the_similarity_keeps_the_pair():
    rng = random.Random(3)
    original = random_text(rng)
    words = original.split()
    words[-1] = "keep"
    copy = " ".join(words)  # Jaccard 37/39 = 0.949

    assert near_duplicates([original, copy], 0.94) == [False, True]
    assert near_duplicates([original, copy], 0.95) == [False, False]


def test_near_threshold_zero_disables_near_dedup(tmp_path):
    rng = random.Random(1)
    text = random_text(rng)
    records = [{"text": text}, {"text": text + " keep"}]
    cfg = text_config(write_jsonl(tmp_path / "d.jsonl", records),
                      dedup=DedupConfig(exact=True, near_threshold=0))

    prepared = prepare_dataset(cfg, seed=0, max_seq_length=4096)

    assert prepared.report.near_duplicates_removed == 0
    assert len(prepared.train) == 2


def completion_records() -> list[dict]:
    return [
        {"prompt": "p p p p", "completion": "c c c c c c c c c c"},  # 14 tokens: too long
        {"prompt": "p p p p p p p p p p p p", "completion": "c"},    # prompt alone too long
        {"prompt": "p p", "completion": "c c"},                        # fits
    ]


def test_truncate_policy_cuts_the_completion_to_max_length(tmp_path):
    cfg = DatasetConfig(source=str(write_jsonl(tmp_path / "d.jsonl", completion_records())),
                        format="completion", eval_fraction=0.0, min_examples=1,
                        length_policy="truncate")

    prepared = prepare_dataset(cfg, seed=0, max_seq_length=10, tokenizer=word_tokenizer())

    report = prepared.report
    assert prepared.train == [{"prompt": "p p p p", "completion": "c c c c c c"},
                              {"prompt": "p p", "completion": "c c"}]
    assert (report.truncated, report.dropped_too_long, report.dropped_no_trainable_tokens) == (1, 0, 1)
    assert report.token_length_percentiles["max"] == 10
    assert report.token_lengths_approximate is False


def test_drop_policy_drops_what_is_too_long(tmp_path):
    cfg = DatasetConfig(source=str(write_jsonl(tmp_path / "d.jsonl", completion_records())),
                        format="completion", eval_fraction=0.0, min_examples=1,
                        length_policy="drop")

    prepared = prepare_dataset(cfg, seed=0, max_seq_length=10, tokenizer=word_tokenizer())

    assert prepared.train == [{"prompt": "p p", "completion": "c c"}]
    assert prepared.report.dropped_too_long == 2
    assert prepared.report.truncated == 0


def test_chat_truncation_cuts_the_last_assistant_turn_and_drops_unanswered_turns(tmp_path):
    long_reply = " ".join(["reply"] * 30)
    records = [
        {"messages": [{"role": "user", "content": "q q q"},
                      {"role": "assistant", "content": long_reply}]},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                      {"role": "user", "content": " ".join(["said"] * 30)},
                      {"role": "assistant", "content": "a"}]},
        {"messages": [{"role": "user", "content": " ".join(["said"] * 30)},
                      {"role": "assistant", "content": "a"}]},
    ]
    cfg = DatasetConfig(source=str(write_jsonl(tmp_path / "d.jsonl", records)), format="chat",
                        eval_fraction=0.0, min_examples=1)
    max_len = 20

    prepared = prepare_dataset(cfg, seed=0, max_seq_length=max_len, tokenizer=word_tokenizer())

    room = max_len - (3 + CHAT_MESSAGE_OVERHEAD) - CHAT_MESSAGE_OVERHEAD
    assert prepared.train == [
        {"messages": [{"role": "user", "content": "q q q"},
                      {"role": "assistant", "content": " ".join(["reply"] * room)}]},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
    ]
    assert prepared.report.truncated == 2
    assert prepared.report.dropped_no_trainable_tokens == 1


def test_whitespace_approximation_without_a_tokenizer(tmp_path):
    records = [{"text": " ".join(["word"] * 30)}, {"text": "short text here"}]
    cfg = text_config(write_jsonl(tmp_path / "d.jsonl", records))

    prepared = prepare_dataset(cfg, seed=0, max_seq_length=20)

    # 4/3 tokens a word: 15 words are 20 approximate tokens.
    assert prepared.train[0] == {"text": " ".join(["word"] * 15)}
    assert prepared.report.truncated == 1
    assert prepared.report.token_lengths_approximate is True
    assert prepared.report.token_length_percentiles == {"p50": 4, "p90": 20, "p99": 20, "max": 20}


@pytest.mark.parametrize("policy", ["truncate", "drop"])
def test_everything_removed_makes_the_dataset_unusable(tmp_path, policy):
    records = [{"prompt": " ".join(["p"] * 50), "completion": "c"} for _ in range(3)]
    cfg = DatasetConfig(source=str(write_jsonl(tmp_path / "d.jsonl", records)),
                        format="completion", min_examples=1, length_policy=policy,
                        dedup=DedupConfig(exact=False, near_threshold=0))

    from finetune_trainer.data import DataValidationError

    with pytest.raises(DataValidationError, match="only 0 usable examples"):
        prepare_dataset(cfg, seed=0, max_seq_length=10, tokenizer=word_tokenizer())


def test_a_shared_system_prompt_does_not_make_conversations_near_duplicates(tmp_path):
    """Issue 16 item 8: 200 distinct conversations sharing one 600-word system prompt lost 199
    of them to near-dedup. Likeness is judged on the user and assistant turns; a real near-copy
    of one conversation is still removed, and the system prompt still counts for exact dedup."""
    rng = random.Random(3)
    system = random_text(rng, 600)
    turns = [(random_text(rng, 12), random_text(rng, 12)) for _ in range(200)]

    def conversation(user: str, answer: str, system_text: str = system) -> dict:
        return {"messages": [{"role": "system", "content": system_text}, {"role": "user", "content": user},
                             {"role": "assistant", "content": answer}]}

    near_copy = conversation(turns[0][0], turns[0][1].rsplit(" ", 1)[0] + " keep")
    other_system = conversation(*turns[1], system_text="be brief")
    records = [conversation(u, a) for u, a in turns] + [near_copy, other_system]
    cfg = DatasetConfig(source=str(write_jsonl(tmp_path / "d.jsonl", records)), format="chat",
                        eval_fraction=0.0, min_examples=1, dedup=DedupConfig(exact=True, near_threshold=0.8))

    prepared = prepare_dataset(cfg, seed=0, max_seq_length=8192)

    assert prepared.report.near_duplicates_removed == 2, "the near-copy, and the same turns under another system prompt"
    assert len(prepared.train) == 200
    assert prepared.report.duplicates_removed == 0
