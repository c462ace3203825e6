"""The dataset report: what validation and cleaning did, in the FineTuneJob status shape."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import ConfigError

MAX_ERRORS = 20


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.capitalize() for part in rest)


@dataclass
class DatasetReport:
    examples_read: int = 0
    rejected: int = 0
    duplicates_removed: int = 0
    near_duplicates_removed: int = 0
    truncated: int = 0
    dropped_too_long: int = 0
    dropped_no_trainable_tokens: int = 0
    train_examples: int = 0
    eval_examples: int = 0
    # Mix-in records appended to train (already counted in train_examples).
    mix_examples: int = 0
    token_length_percentiles: dict[str, int] = field(
        default_factory=lambda: {"p50": 0, "p90": 0, "p99": 0, "max": 0}
    )
    # Whether token lengths are a whitespace approximation (no tokenizer was given).
    token_lengths_approximate: bool = True
    content_hash: str = ""
    # How prompts were presented (finetune_api.prompts): chat-template, alpaca or raw.
    prompt_format: str | None = None
    # {"field", "counts": {category: n}, "shares": {category: fraction}} or None.
    category_balance: dict[str, Any] | None = None
    first_errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    # Why the data cannot be used; empty when usable.
    problems: list[str] = field(default_factory=list)
    usable: bool = True

    def add_error(self, message: str) -> None:
        if len(self.first_errors) < MAX_ERRORS:
            self.first_errors.append(message)

    def fail(self, problem: str) -> None:
        self.problems.append(problem)
        self.usable = False

    def to_dict(self) -> dict[str, Any]:
        return {_camel(f.name): getattr(self, f.name) for f in dataclasses.fields(self)}


class DataValidationError(ConfigError):
    """The dataset cannot be trained on; the trainer exits with the permanent code."""

    def __init__(self, report: DatasetReport) -> None:
        self.report = report
        message = "dataset is unusable: " + "; ".join(report.problems or ["see the report"])
        if report.first_errors:
            message += " (first error: " + report.first_errors[0] + ")"
        super().__init__(message)


def write_report(report: DatasetReport, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report.to_dict(), indent=2, ensure_ascii=False) + "\n")
    tmp.replace(path)


def render_table(report: DatasetReport, source: str = "") -> str:
    """The report for a person at a terminal."""
    lengths = report.token_length_percentiles
    unit = "approx. tokens" if report.token_lengths_approximate else "tokens"
    rows = [
        ("examples read", report.examples_read),
        ("rejected (invalid)", report.rejected),
        ("exact duplicates removed", report.duplicates_removed),
        ("near-duplicates removed", report.near_duplicates_removed),
        ("truncated", report.truncated),
        ("dropped: too long", report.dropped_too_long),
        ("dropped: no trainable tokens", report.dropped_no_trainable_tokens),
        ("train examples", report.train_examples),
        ("eval examples", report.eval_examples),
    ]
    if report.mix_examples:
        rows.append(("  of train: mixed in", report.mix_examples))
    rows.append((f"length p50/p90/p99/max ({unit})",
                 f"{lengths['p50']} / {lengths['p90']} / {lengths['p99']} / {lengths['max']}"))
    if report.prompt_format:
        rows.append(("prompt format", report.prompt_format))
    rows.append(("content hash", report.content_hash[:16] + "…" if report.content_hash else "-"))
    width = max(len(name) for name, _ in rows)
    lines = [f"dataset {source}".rstrip()]
    lines += [f"  {name:<{width}}  {value}" for name, value in rows]
    if report.category_balance:
        balance = report.category_balance
        lines.append(f'category balance (field "{balance["field"]}"):')
        name_width = max(len(c) for c in balance["counts"])
        for category, count in balance["counts"].items():
            share = balance["shares"][category]
            lines.append(f"  {category:<{name_width}}  {count:>8}  {share:6.1%}")
    if report.first_errors:
        shown = len(report.first_errors)
        lines.append(f"errors (first {shown} of {report.rejected}):" if report.rejected > shown
                     else "errors:")
        lines += [f"  {e}" for e in report.first_errors]
    if report.warnings:
        lines.append("warnings:")
        lines += [f"  {w}" for w in report.warnings]
    if report.usable:
        lines.append("result: usable")
    else:
        lines.append("result: NOT usable")
        lines += [f"  {p}" for p in report.problems]
    return "\n".join(lines)
