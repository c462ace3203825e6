"""`validate-data` prints line-numbered errors and exits 2 on unusable data, 0 on good data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from finetune_trainer.data import MAX_RECORD_BYTES, validate_cli

GOOD = [{"instruction": f"Question number {i} about topic {i * 7}", "output": f"Answer {i}"}
        for i in range(20)]


def write_lines(path: Path, lines: list[bytes]) -> Path:
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return path


def good_lines() -> list[bytes]:
    return [json.dumps(r).encode() for r in GOOD]


def run(capsys, *argv: str) -> tuple[int, str]:
    code = validate_cli(list(argv))
    return code, capsys.readouterr().out


def test_good_data_exits_0_with_a_table(tmp_path, capsys):
    path = write_lines(tmp_path / "good.jsonl", good_lines())

    code, out = run(capsys, "--format", "instruction", str(path))

    assert code == 0
    assert "examples read" in out and "result: usable" in out


def test_leading_subcommand_name_is_accepted(tmp_path, capsys):
    path = write_lines(tmp_path / "good.jsonl", good_lines())

    assert run(capsys, "validate-data", "--format", "instruction", str(path))[0] == 0


def test_json_output_is_the_report(tmp_path, capsys):
    path = write_lines(tmp_path / "good.jsonl", good_lines())

    code, out = run(capsys, "--format", "instruction", "--json", str(path))

    report = json.loads(out)
    assert code == 0 and report["usable"] is True
    assert report["examplesRead"] == 20
    assert report["trainExamples"] + report["evalExamples"] == 20
    assert set(report["tokenLengthPercentiles"]) == {"p50", "p90", "p99", "max"}
    assert len(report["contentHash"]) == 64


@pytest.mark.parametrize("bad_line, expected", [
    (b'{"instruction": "x", "output": "y"', 'line 4: not valid JSON: Expecting \',\' delimiter at column 35'),
    (b'{"instruction": "x"}', 'line 4: field "output" is missing (format: instruction)'),
    (b'{"instruction": "x", "output": 42}', 'line 4: field "output" must be a string, got int'),
    (b'{"instruction": "x", "output": "  "}', 'line 4: field "output" is an empty string'),
    (b'["instruction", "output"]', "line 4: expected a JSON object, got list"),
    (b'{"instruction": "caf\xe9", "output": "y"}', "line 4: not valid UTF-8: byte 0xe9 at column 21"),
])
def test_bad_record_is_reported_by_line_and_exits_2(tmp_path, capsys, bad_line, expected):
    lines = good_lines()
    lines.insert(3, bad_line)
    path = write_lines(tmp_path / "bad.jsonl", lines)

    code, out = run(capsys, "--format", "instruction", str(path))

    assert code == 2
    assert expected in out
    assert "1 of 21 records are invalid" in out


def test_bad_records_within_max_invalid_fraction_are_dropped(tmp_path, capsys):
    lines = good_lines()
    lines.insert(3, b'{"instruction": "x"}')
    path = write_lines(tmp_path / "bad.jsonl", lines)

    code, out = run(capsys, "--format", "instruction", "--max-invalid-fraction", "0.1", "--json",
                    str(path))

    report = json.loads(out)
    assert code == 0
    assert report["rejected"] == 1 and report["examplesRead"] == 21
    assert report["firstErrors"] == ['line 4: field "output" is missing (format: instruction)']
    assert any("1 invalid records dropped" in w for w in report["warnings"])


def test_wrong_type_for_messages(tmp_path, capsys):
    records = [{"messages": [{"role": "user", "content": f"q{i}"},
                             {"role": "assistant", "content": f"a{i}"}]} for i in range(12)]
    records[6] = {"messages": "hello"}
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))

    code, out = run(capsys, "--format", "chat", str(path))

    assert code == 2
    assert 'line 7: field "messages" must be a list, got str' in out


def test_empty_file_exits_2(tmp_path, capsys):
    path = tmp_path / "empty.jsonl"
    path.write_bytes(b"")

    code, out = run(capsys, "--format", "instruction", str(path))

    assert code == 2
    assert "file is empty" in out


def test_blank_lines_only_exits_2(tmp_path, capsys):
    path = tmp_path / "blank.jsonl"
    path.write_bytes(b"\n\n  \n")

    code, out = run(capsys, "--format", "instruction", str(path))

    assert code == 2
    assert "no records" in out


def test_binary_junk_exits_2(tmp_path, capsys):
    path = tmp_path / "junk.jsonl"
    path.write_bytes(bytes(range(256)) * 40)

    code, out = run(capsys, "--format", "instruction", str(path))

    assert code == 2
    assert "looks like a binary file" in out and "NUL byte at line 1, byte 1" in out


def test_non_utf8_file_names_line_and_byte(tmp_path, capsys):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes("\n".join(json.dumps(r, ensure_ascii=False) for r in GOOD[:3]).encode()
                     + "\n{\"instruction\": \"Größe\", \"output\": \"x\"}\n".encode("latin-1"))

    code, out = run(capsys, "--format", "instruction", str(path))

    assert code == 2
    assert "line 4: not valid UTF-8: byte 0xf6 at column 20" in out


def test_gigantic_record_is_rejected_with_its_size(tmp_path, capsys):
    lines = good_lines()
    lines.append(json.dumps({"instruction": "x", "output": "y" * (MAX_RECORD_BYTES + 10)}).encode())
    path = write_lines(tmp_path / "big.jsonl", lines)

    code, out = run(capsys, "--format", "instruction", str(path))

    assert code == 2
    assert "line 21: record is 1.0 MB, over the 1 MB limit per record" in out


def test_too_few_examples_exits_2(tmp_path, capsys):
    path = write_lines(tmp_path / "few.jsonl", good_lines()[:3])

    code, out = run(capsys, "--format", "instruction", "--min-examples", "5", str(path))

    assert code == 2
    assert "only 3 usable examples, fewer than dataset.minExamples (5)" in out


def test_missing_file_exits_2(tmp_path, capsys):
    code, out = run(capsys, "--format", "instruction", str(tmp_path / "nope.jsonl"))

    assert code == 2
    assert "file not found" in out


def test_bad_field_map_is_a_usage_error(tmp_path, capsys):
    path = write_lines(tmp_path / "good.jsonl", good_lines())

    assert validate_cli(["--format", "chat", "--field-map", "nonsense", str(path)]) == 2


def test_report_file_is_written(tmp_path, capsys):
    path = write_lines(tmp_path / "good.jsonl", good_lines())
    report_path = tmp_path / "reports" / "dataset.json"

    run(capsys, "--format", "instruction", "--report", str(report_path), str(path))

    assert json.loads(report_path.read_text())["examplesRead"] == 20


def test_sharegpt_field_map_before_the_path(tmp_path, capsys):
    records = [{"conversations": [{"from": "human", "value": f"question {i}"},
                                  {"from": "gpt", "value": f"answer {i}"}]} for i in range(12)]
    path = tmp_path / "sharegpt.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))

    code, out = run(capsys, "--format", "chat", "--field-map", "conversations=messages",
                    "from=role", "value=content", "human=user", "gpt=assistant", str(path))

    assert code == 0, out


def test_missing_path_is_a_usage_error(capsys):
    assert validate_cli(["--format", "chat"]) == 2
