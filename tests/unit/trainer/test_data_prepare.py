"""prepare_dataset: loading each file type, the split, eval sources, mix-in, balance, the report."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from finetune_trainer.config import ConfigError, DatasetConfig, MixConfig
from finetune_trainer.data import DataValidationError, prepare_dataset, write_report
from finetune_trainer.data.load import is_hub_source

RECORDS = [{"instruction": f"Explain item {i} of the list in detail", "output": f"Item {i} is {i * i}",
            "topic": "math" if i % 3 else "poetry"} for i in range(60)]


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def config(path: Path, **overrides) -> DatasetConfig:
    values = dict(source=str(path), format="instruction", min_examples=1, max_invalid_fraction=0.0)
    values.update(overrides)
    return DatasetConfig(**values)


def test_split_is_deterministic_for_a_seed_and_changes_with_it(tmp_path):
    cfg = config(write_jsonl(tmp_path / "d.jsonl", RECORDS), eval_fraction=0.2)

    first = prepare_dataset(cfg, seed=42, max_seq_length=512)
    again = prepare_dataset(cfg, seed=42, max_seq_length=512)
    other = prepare_dataset(cfg, seed=7, max_seq_length=512)

    assert (first.train, first.eval) == (again.train, again.eval)
    assert first.report.content_hash == again.report.content_hash
    assert len(first.eval) == 12 and len(first.train) == 48
    assert first.eval != other.eval
    assert first.report.content_hash != other.report.content_hash
    all_records = {json.dumps(r, sort_keys=True) for r in first.train + first.eval}
    assert len(all_records) == 60


def test_the_held_out_set_is_capped_by_max_eval_examples(tmp_path):
    """Issue 16 item 7: evalFraction had no cap (50,000 evaluations every saveSteps at a
    million records); the rest of the records train."""
    cfg = config(write_jsonl(tmp_path / "d.jsonl", RECORDS), eval_fraction=0.5, max_eval_examples=7)

    prepared = prepare_dataset(cfg, seed=42, max_seq_length=512)

    assert len(prepared.eval) == 7 and len(prepared.train) == 53
    assert any("maxEvalExamples (7)" in w for w in prepared.report.warnings)
    uncapped = prepare_dataset(config(write_jsonl(tmp_path / "e.jsonl", RECORDS), eval_fraction=0.5),
                               seed=42, max_seq_length=512)
    assert len(uncapped.eval) == 30, "the default cap (1000) leaves small sets alone"


def test_eval_source_is_used_and_leaked_records_leave_train(tmp_path):
    train_path = write_jsonl(tmp_path / "train.jsonl", RECORDS[:40])
    eval_path = write_jsonl(tmp_path / "eval.jsonl", RECORDS[35:45])
    cfg = config(train_path, eval_source=str(eval_path))

    prepared = prepare_dataset(cfg, seed=1, max_seq_length=512)

    assert len(prepared.eval) == 10
    assert len(prepared.train) == 35  # records 35..39 are in eval too
    assert prepared.report.duplicates_removed == 5


def test_mix_in_is_appended_to_train_deterministically(tmp_path):
    main = write_jsonl(tmp_path / "main.jsonl", RECORDS[:40])
    general = write_jsonl(tmp_path / "general.jsonl",
                          [{"prompt": f"General question {i}", "completion": f"General answer {i}"}
                           for i in range(100)])
    cfg = config(main, eval_fraction=0.0, mix=MixConfig(source=str(general), ratio=0.25,
                                                        format="completion"))

    first = prepare_dataset(cfg, seed=3, max_seq_length=512)
    again = prepare_dataset(cfg, seed=3, max_seq_length=512)

    assert first.report.mix_examples == 10
    assert len(first.train) == 50
    assert all(r["prompt"].startswith("General") for r in first.train[40:])
    assert first.train == again.train


def test_mix_of_another_record_kind_is_refused(tmp_path):
    main = write_jsonl(tmp_path / "main.jsonl", RECORDS[:20])
    texts = write_jsonl(tmp_path / "texts.jsonl", [{"text": f"t {i}"} for i in range(20)])
    cfg = config(main, mix=MixConfig(source=str(texts), ratio=0.1, format="text"))

    with pytest.raises(DataValidationError, match="cannot be mixed"):
        prepare_dataset(cfg, seed=3, max_seq_length=512)


def test_category_balance_is_reported_and_imbalance_warned(tmp_path):
    records = [dict(r, topic="common") for r in RECORDS[:55]]
    records += [dict(r, topic="rare") for r in RECORDS[55:]]
    cfg = config(write_jsonl(tmp_path / "d.jsonl", records), category_field="topic",
                 eval_fraction=0.0)

    report = prepare_dataset(cfg, seed=0, max_seq_length=512).report

    assert report.category_balance == {
        "field": "topic",
        "counts": {"common": 55, "rare": 5},
        "shares": {"common": round(55 / 60, 4), "rare": round(5 / 60, 4)},
    }
    assert any('category "common" has 55 examples, 11x the smallest' in w for w in report.warnings)


def test_balanced_categories_raise_no_warning(tmp_path):
    cfg = config(write_jsonl(tmp_path / "d.jsonl", RECORDS), category_field="topic")

    report = prepare_dataset(cfg, seed=0, max_seq_length=512).report

    assert report.category_balance["counts"] == {"math": 40, "poetry": 20}
    assert report.warnings == []


def test_csv_is_loaded_with_line_numbers(tmp_path):
    path = tmp_path / "d.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["instruction", "output"])
        writer.writeheader()
        writer.writerow({"instruction": "Multi\nline question", "output": "yes"})
        writer.writerow({"instruction": "Second", "output": ""})
        writer.writerow({"instruction": "Third", "output": "no"})
    cfg = config(path, eval_fraction=0.0, max_invalid_fraction=0.5)

    prepared = prepare_dataset(cfg, seed=0, max_seq_length=512)

    assert [r["completion"] for r in prepared.train] == ["yes", "no"]
    assert prepared.report.first_errors == [
        'line 4: field "output" is an empty string (format: instruction)'
    ]


def test_csv_chat_messages_are_parsed_from_json_cells(tmp_path):
    path = tmp_path / "chat.csv"
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["messages"])
        writer.writerow([json.dumps(messages)])
    cfg = config(path, format="chat", eval_fraction=0.0)

    assert prepare_dataset(cfg, seed=0, max_seq_length=512).train == [{"messages": messages}]


def test_json_list_is_loaded_with_record_numbers(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([RECORDS[0], {"instruction": "x"}, RECORDS[1]]))
    cfg = config(path, eval_fraction=0.0, max_invalid_fraction=0.5)

    prepared = prepare_dataset(cfg, seed=0, max_seq_length=512)

    assert len(prepared.train) == 2
    assert prepared.report.first_errors == ['record 2: field "output" is missing (format: instruction)']


def test_json_lines_under_a_json_name_are_read_as_jsonl(tmp_path):
    path = write_jsonl(tmp_path / "d.json", RECORDS[:5])

    assert len(prepare_dataset(config(path, eval_fraction=0.0), seed=0, max_seq_length=512).train) == 5


def test_parquet_is_loaded_with_row_numbers(tmp_path):
    path = tmp_path / "d.parquet"
    rows = [{"messages": [{"role": "user", "content": f"q{i}"},
                          {"role": "assistant", "content": f"a{i}"}]} for i in range(4)]
    rows[2] = {"messages": [{"role": "user", "content": "q2"}, {"role": "user", "content": "again"}]}
    pq.write_table(pa.Table.from_pylist(rows), path)
    cfg = config(path, format="chat", eval_fraction=0.0, max_invalid_fraction=0.5)

    prepared = prepare_dataset(cfg, seed=0, max_seq_length=512)

    assert prepared.train[0] == {"messages": rows[0]["messages"]}
    assert len(prepared.train) == 3
    assert prepared.report.first_errors[0].startswith("row 3: the last message is from 'user'")


def test_unusable_data_raises_a_config_error_with_the_report(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "x"}] + RECORDS[:10])

    with pytest.raises(ConfigError) as caught:
        prepare_dataset(config(path), seed=0, max_seq_length=512)

    assert isinstance(caught.value, DataValidationError)
    assert caught.value.report.usable is False
    assert "line 1: field \"output\" is missing" in str(caught.value)


def test_resolve_maps_volume_sources_to_paths(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", RECORDS[:10])
    cfg = config(Path("pvc://claim/d.jsonl"), eval_fraction=0.0)

    prepared = prepare_dataset(cfg, seed=0, max_seq_length=512,
                               resolve=lambda s: str(tmp_path / s.rsplit("/", 1)[1]))

    assert len(prepared.train) == 10


def test_report_is_written_with_camel_case_fields(tmp_path):
    prepared = prepare_dataset(config(write_jsonl(tmp_path / "d.jsonl", RECORDS)), seed=0,
                               max_seq_length=512)
    path = tmp_path / "reports" / "dataset.json"

    write_report(prepared.report, path)

    data = json.loads(path.read_text())
    for key in ("examplesRead", "rejected", "duplicatesRemoved", "nearDuplicatesRemoved",
                "truncated", "droppedTooLong", "droppedNoTrainableTokens", "trainExamples",
                "evalExamples", "tokenLengthPercentiles", "contentHash", "categoryBalance",
                "firstErrors", "warnings", "usable"):
        assert key in data
    assert data["examplesRead"] == 60 and data["usable"] is True


@pytest.mark.parametrize("source, hub", [
    ("hf://org/name", True), ("org/name", True), ("data/train.jsonl", False),
    ("/abs/path.parquet", False),
])
def test_hub_ids_are_told_apart_from_paths(source, hub):
    assert is_hub_source(source) is hub
