"""validate-data's report on fixed inputs does not change when the pipeline is made faster.

The golden reports in golden/validate_report_*.json were written by the pipeline before the
speed work of issue 16 item 9 (per-record conversion and length policy); the fast paths
(block reading, bulk conversion, lengths measured in bulk, kept records copied as bytes)
must remove the same duplicates, keep the same split, give the same content hash and the
same line-numbered errors. Regenerate only for an intended change of the report:
UPDATE_GOLDEN=1 pytest tests/unit/trainer/test_data_report_stable.py.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
from pathlib import Path

import pytest

from finetune_trainer.data import load, prepare, validate_cli

GOLDEN = Path(__file__).parent / "golden"
VOCAB = [f"w{i}" for i in range(800)] + ["Straße", "naïve", "東京", "café", "ǅemal"]


def _words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(VOCAB) for _ in range(n))


def _lines(fmt: str, n: int = 3000, seed: int = 7) -> list[bytes]:
    """Records of `fmt` with exact, case/space-changed and near copies, long records (for the
    length policy), non-ASCII text and, every so often, a broken line or record."""
    rng = random.Random(seed)
    made: list[dict] = []
    out: list[bytes] = []
    for i in range(n):
        kind = i % 37
        if kind == 5 and made:
            record = dict(rng.choice(made))  # an exact copy
        elif kind == 9 and made:  # a near copy: one word changed
            record = json.loads(json.dumps(rng.choice(made)))
            key = {"instruction": "output", "completion": "completion", "text": "text"}.get(fmt)
            if key:
                words = record[key].split()
                words[rng.randrange(len(words))] = "changed"
                record[key] = " ".join(words)
            else:
                words = record["messages"][-1]["content"].split()
                words[-1] = "changed"
                record["messages"][-1]["content"] = " ".join(words)
        else:
            size = rng.choice([5, 20, 40, 60]) if kind != 11 else 700  # 11: too long
            if fmt == "instruction":
                record = {"instruction": _words(rng, 10), "output": _words(rng, size)}
                if kind % 3 == 0:
                    record["input"] = _words(rng, 8)
                elif kind % 3 == 1:
                    record["input"] = ""
            elif fmt == "completion":
                record = {"prompt": _words(rng, 10) if kind != 13 else "", "completion": _words(rng, size)}
            elif fmt == "text":
                record = {"text": _words(rng, size + 10)}
            else:
                messages = [{"role": "user", "content": _words(rng, 10)},
                            {"role": "assistant", "content": _words(rng, size)}]
                if kind % 4 == 0:
                    messages.insert(0, {"role": "system", "content": "You are helpful. " * 20})
                record = {"messages": messages}
            if kind % 6 == 0:
                record["topic"] = rng.choice(["a", "b", "c"])
            made.append(record)
        line = json.dumps(record, ensure_ascii=rng.random() < 0.5).encode()
        if kind == 17 and i % 2:
            line = line.upper().replace(b"\\U", b"\\u")  # case changed: still an exact copy
        if i % 211 == 3:
            line = line[:-2]  # broken JSON
        elif i % 223 == 4:
            line = b"[1, 2]"
        elif i % 227 == 5:
            line = b"   "  # a blank line: skipped, not counted
        elif i % 229 == 6:
            line = json.dumps({"instruction": 3, "output": None, "prompt": 1, "text": "",
                               "messages": "x"}).encode()
        elif i % 233 == 7:
            line = b'{"a": 1} {"b": 2}'
        out.append(line)
    return out


CASES = {
    "instruction": ["--format", "instruction"],
    "instruction-drop": ["--format", "instruction", "--length-policy", "drop", "--max-seq-length", "300"],
    "instruction-category": ["--format", "instruction", "--category-field", "topic",
                             "--max-invalid-fraction", "0.5", "--eval-fraction", "0.1"],
    "completion": ["--format", "completion", "--max-seq-length", "200"],
    "text": ["--format", "text", "--no-exact-dedup", "--max-seq-length", "400"],
    "chat": ["--format", "chat", "--near-threshold", "0.7", "--max-seq-length", "300"],
}


@pytest.mark.parametrize("variant", ["4MiB-blocks", "2KiB-blocks-spilled-midway", "spilled-to-disk"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_the_report_on_a_fixed_input_is_unchanged(tmp_path, monkeypatch, case, variant):
    """Small read blocks and batches: most blocks hold no broken line and take the fast
    paths, and batch edges fall inside runs of duplicates. Spills kept in memory, moved to
    disk when the memory for them runs out midway, or on disk from the start. The report
    is the same."""
    small_blocks = variant.startswith("2KiB")
    if small_blocks:
        monkeypatch.setattr(load, "_BLOCK_BYTES", 2048)
        monkeypatch.setattr(prepare, "BATCH_RECORDS", 100)
        monkeypatch.setattr(prepare, "SPILL_MEMORY_BYTES", 300_000)
    elif variant == "spilled-to-disk":
        monkeypatch.setattr(prepare, "SPILL_MEMORY_BYTES", 0)
    argv = CASES[case]
    fmt = argv[1]
    path = tmp_path / "data.jsonl"
    path.write_bytes(b"\n".join(_lines(fmt)) + b"\n")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = validate_cli([*argv, "--json", str(path)])
    report = json.loads(out.getvalue())
    report["exitCode"] = code
    golden = GOLDEN / f"validate_report_{case}.json"
    if os.environ.get("UPDATE_GOLDEN") and variant == "4MiB-blocks":
        golden.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    assert report == json.loads(golden.read_text())


def _report(argv: list[str], path: Path) -> dict:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = validate_cli([*argv, "--json", str(path)])
    return {**json.loads(out.getvalue()), "exitCode": code}


@pytest.mark.parametrize("case", ["instruction-category", "completion", "chat"])
def test_a_folder_of_shards_gives_the_report_of_record_by_record_reading(tmp_path, monkeypatch, case):
    """Shards read in blocks (errors named by shard and line) give exactly the report of
    reading and converting every record on its own, the way other file types are read."""
    argv = CASES[case]
    lines = _lines(argv[1])
    folder = tmp_path / "shards"
    folder.mkdir()
    for i, part in enumerate((lines[:1000], lines[1000:1100], lines[1100:])):
        (folder / f"part-{i}.jsonl").write_bytes(b"\n".join(part) + b"\n")
    monkeypatch.setattr(load, "_BLOCK_BYTES", 4096)
    fast = _report(argv, folder)
    monkeypatch.setattr(prepare, "read_batches",
                        lambda source, split=None: load.read_records(source, split=split))
    one_by_one = _report(argv, folder)

    assert fast == one_by_one
    assert fast["firstErrors"][0].startswith("part-0.jsonl line ")
    assert fast["trainExamples"] > 2000
