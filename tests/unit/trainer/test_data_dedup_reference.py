"""The batched, streaming duplicate removal agrees with a plain reference implementation.

The reference is the definition written out in Python: normalise with casefold() and split(),
a record is an exact duplicate when its normalised text appeared before, and a near-duplicate
when the Jaccard similarity of its word 3-gram shingle set with an earlier kept record is at
least the threshold (compared with every earlier kept record, no hashing, no LSH).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from finetune_trainer.config import DatasetConfig, DedupConfig
from finetune_trainer.data import dedup, prepare, prepare_dataset
from finetune_trainer.data.dedup import exact_keys, near_duplicates, normalise

VOCAB = [f"w{i}" for i in range(3000)] + ["Straße", "naïve", "東京", "café"]
THRESHOLD = 0.8


def shingles(text: str) -> set[str]:
    words = text.casefold().split()
    if len(words) < 3:
        return {" ".join(words)}
    return {" ".join(words[i:i + 3]) for i in range(len(words) - 2)}


def reference_dedup(texts: list[str], threshold: float) -> tuple[set[int], set[int]]:
    """Positions removed as exact and as near-duplicates, by the definition."""
    seen: set[str] = set()
    exact: set[int] = set()
    kept: list[set[str]] = []
    near: set[int] = set()
    for i, text in enumerate(texts):
        key = normalise(text)
        if key in seen:
            exact.add(i)
            continue
        seen.add(key)
        mine = shingles(text)
        if any(len(mine & theirs) / len(mine | theirs) >= threshold for theirs in kept):
            near.add(i)
        else:
            kept.append(mine)
    return exact, near


def planted_dataset(rng: random.Random) -> list[str]:
    """Distinct texts with exact copies (other case and spacing), near copies (one word
    changed: Jaccard about 0.9), far copies (Jaccard about 0.5) and short texts."""
    texts = [" ".join(rng.choice(VOCAB) for _ in range(rng.randint(25, 45))) for _ in range(400)]
    out = list(texts)
    for i in rng.sample(range(400), 60):
        words = texts[i].split()
        kind = rng.choice(["exact", "near", "far"])
        if kind == "exact":
            out.append("  " + "\t".join(words).upper() + " ")
        elif kind == "near":
            words[rng.randrange(len(words))] = "changed"
            out.append(" ".join(words))
        else:
            half = len(words) // 2
            out.append(" ".join(words[:half] + [rng.choice(VOCAB) for _ in words[half:]]))
    out += ["hi", "HI", "hi there", "one two three"]
    rng.shuffle(out)
    return out


@pytest.mark.parametrize("kept_digests", [None, 0, 3 * 37 * 512],
                         ids=["all-digests-kept", "all-hashed-again", "three-batches-kept"])
def test_streaming_dedup_removes_exactly_what_the_reference_removes(tmp_path, monkeypatch,
                                                                   kept_digests):
    """The second pass finds the same partners from digest matrices kept in memory and from
    shingles read back from disk and hashed again (what is past KEEP_DIGEST_BYTES)."""
    if kept_digests is not None:
        monkeypatch.setattr(dedup, "KEEP_DIGEST_BYTES", kept_digests)
    texts = planted_dataset(random.Random(11))
    exact, near = reference_dedup(texts, THRESHOLD)
    assert len(exact) > 10 and len(near) > 10, "the data plants both kinds"
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    # Small batches, so records and their duplicates fall into different batches.
    monkeypatch.setattr(prepare, "BATCH_RECORDS", 37)
    cfg = DatasetConfig(source=str(path), format="text", eval_fraction=0.0, min_examples=1,
                        dedup=DedupConfig(exact=True, near_threshold=THRESHOLD))

    prepared = prepare_dataset(cfg, seed=0, max_seq_length=4096, work_dir=tmp_path)

    assert prepared.report.duplicates_removed == len(exact)
    assert prepared.report.near_duplicates_removed == len(near)
    assert [r["text"] for r in prepared.train] == [
        t for i, t in enumerate(texts) if i not in exact and i not in near]
    assert [p.name for p in tmp_path.iterdir()] == ["d.jsonl"], "the spill files are removed"


@pytest.mark.parametrize("pairs_listed", [True, False], ids=["pairs", "buckets"])
def test_near_duplicates_agree_with_the_reference_without_exact_dedup(monkeypatch, pairs_listed):
    """Candidates are verified from the listed pairs that share a band, or (huge buckets)
    bucket by bucket; both agree with the reference."""
    if not pairs_listed:
        monkeypatch.setattr(dedup, "_MAX_PAIRS_PER_CANDIDATE", 0)
    texts = planted_dataset(random.Random(5))
    flags = near_duplicates(texts, THRESHOLD)

    # Without exact dedup, an exact copy is a near-duplicate (Jaccard 1).
    _, near = reference_dedup_without_exact(texts, THRESHOLD)
    assert {i for i, f in enumerate(flags) if f} == near


def reference_dedup_without_exact(texts: list[str], threshold: float) -> tuple[set, set[int]]:
    kept: list[set[str]] = []
    near: set[int] = set()
    for i, text in enumerate(texts):
        mine = shingles(text)
        if any(len(mine & theirs) / len(mine | theirs) >= threshold for theirs in kept):
            near.add(i)
        else:
            kept.append(mine)
    return set(), near


def test_exact_keys_follow_casefold_and_whitespace_in_any_batch():
    """Word hashes come from ASCII-only batches and from batches with other scripts by two
    code paths; the same words must give the same key in both."""
    ascii_batch = exact_keys(["hello   world", "STRASSE", "a\x1cb"])
    mixed_batch = exact_keys(["Hello\u00a0World", "straße", "A B", "东京"])

    assert ascii_batch[0] == mixed_batch[0], "a no-break space splits words like str.split()"
    assert ascii_batch[1] == mixed_batch[1], "casefold: ß is ss"
    assert ascii_batch[2] == mixed_batch[2], "\\x1c is whitespace to str.split()"
    assert len({*ascii_batch, *mixed_batch}) == 4
    assert exact_keys(["", " "])[0] == exact_keys(["\n"])[0] != exact_keys(["a"])[0]


def test_a_lone_surrogate_escape_is_an_error_with_its_line_not_a_crash(tmp_path):
    """json.loads accepts "\\ud800", but such text cannot be hashed as UTF-8 or spilled to disk."""
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "fine text"}\n{"text": "bad \\ud800 text"}\n')
    cfg = DatasetConfig(source=str(path), format="text", eval_fraction=0.0, min_examples=1,
                        max_invalid_fraction=0.5)

    prepared = prepare_dataset(cfg, seed=0, max_seq_length=4096)

    assert prepared.report.first_errors == [
        "line 2: text holds an unpaired surrogate \\ud800 (a JSON escape that is not valid Unicode)"]
    assert prepared.train == [{"text": "fine text"}]


def test_the_trainer_spills_to_the_data_cache_and_clears_what_a_killed_pod_left(tmp_path):
    from finetune_trainer.config import TrainerConfig
    from finetune_trainer.prepared import prepare_data

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"record number {i}"}) + "\n" for i in range(20)))
    cfg = TrainerConfig.from_dict({"model": {"source": "/models/x"},
                                   "dataset": {"source": str(data), "format": "text", "minExamples": 1},
                                   "paths": {"root": str(tmp_path / "claim")}})
    stale = cfg.paths.data_cache / ".prepare-killed"
    stale.mkdir(parents=True)
    (stale / "1-read.jsonl").write_text("left by a SIGKILLed pod\n")

    prepared = prepare_data(cfg, None, is_main=True)

    assert len(prepared.train) + len(prepared.eval) == 20
    assert [p.name for p in cfg.paths.data_cache.iterdir()] == [prepared.digest]
