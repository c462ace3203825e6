"""Load, validate, clean, split and mix a dataset: everything before any GPU time."""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..config import DatasetConfig
from . import dedup
from .formats import OUTPUT_KIND, Example, RecordError, convert, unify_preference_records
from .length import TokenCounter, apply_length_policy, make_counter, percentiles
from .load import SourceError, is_tabular, read_records
from .report import DatasetReport, DataValidationError

# Warn when the largest category has more than this many times the examples of the smallest.
IMBALANCE_RATIO = 10
_CANONICAL_JSON = json.JSONEncoder(sort_keys=True, ensure_ascii=False, separators=(",", ":"))


@dataclass
class PreparedDataset:
    train: list[dict]
    eval: list[dict]
    report: DatasetReport


def prepare_dataset(cfg: DatasetConfig, *, seed: int, max_seq_length: int, tokenizer: Any = None,
                    resolve: Callable[[str], str] = lambda s: s,
                    max_prompt_length: int | None = None,
                    max_completion_length: int | None = None) -> PreparedDataset:
    """The cleaned train/eval records; raises DataValidationError when the data is unusable.

    `max_prompt_length` / `max_completion_length` (preference pairs, DPO) cut prompts to
    their last and answers to their first so many tokens.
    """
    prepared = inspect_dataset(cfg, seed=seed, max_seq_length=max_seq_length,
                               tokenizer=tokenizer, resolve=resolve,
                               max_prompt_length=max_prompt_length,
                               max_completion_length=max_completion_length)
    if not prepared.report.usable:
        raise DataValidationError(prepared.report)
    return prepared


def inspect_dataset(cfg: DatasetConfig, *, seed: int, max_seq_length: int, tokenizer: Any = None,
                    resolve: Callable[[str], str] = lambda s: s,
                    max_prompt_length: int | None = None,
                    max_completion_length: int | None = None) -> PreparedDataset:
    """Like prepare_dataset, but an unusable dataset is only marked so in the report."""
    from .. import chat_templates

    counter = make_counter(tokenizer)
    report = DatasetReport(token_lengths_approximate=counter.approximate)
    pipeline = _Pipeline(cfg, report, counter, max_seq_length,
                         pair_limits={"max_prompt_length": max_prompt_length,
                                      "max_completion_length": max_completion_length},
                         renderer=chat_templates.dataset_renderer(tokenizer, cfg.chat_template))
    problem = chat_templates.missing_template_problem(
        tokenizer, [cfg.format] + ([cfg.mix.format] if cfg.mix and cfg.mix.format else []))
    if problem:
        report.fail(problem)
        return PreparedDataset([], [], report)

    eval_examples: list[Example] = []
    eval_keys: set[bytes] = set()
    if cfg.eval_source:
        loaded = pipeline.read(resolve(cfg.eval_source), label=f"eval source {cfg.eval_source}: ")
        if loaded is None:
            return PreparedDataset([], [], report)
        eval_examples = pipeline.clean(loaded)
        eval_keys = {dedup.exact_key(e.dedup_text) for e in eval_examples}

    loaded = pipeline.read(resolve(cfg.source))
    if loaded is None:
        return PreparedDataset([], [], report)
    examples = pipeline.clean(loaded, leaked=eval_keys)

    if cfg.eval_source:
        train_examples = examples
    else:
        train_examples, eval_examples = split(examples, cfg.eval_fraction, seed,
                                              max_eval=cfg.max_eval_examples)
        if cfg.max_eval_examples is not None and round(len(examples) * cfg.eval_fraction) > cfg.max_eval_examples:
            report.warnings.append(f"evalFraction {cfg.eval_fraction} would hold out "
                                   f"{round(len(examples) * cfg.eval_fraction)} records; held out "
                                   f"dataset.maxEvalExamples ({cfg.max_eval_examples})")
        if cfg.eval_fraction > 0 and len(examples) == 1:
            report.warnings.append("too few examples to hold any out for evaluation")

    own = train_examples + eval_examples
    if cfg.category_field:
        report.category_balance = category_balance(own, cfg.category_field, report)
    if len(own) < cfg.min_examples and report.usable:
        report.fail(f"only {len(own)} usable examples, fewer than dataset.minExamples "
                    f"({cfg.min_examples})")

    if cfg.mix is not None and report.usable:
        mixed = pipeline.mix_in(cfg, train_examples, eval_examples, seed, resolve)
        report.mix_examples = len(mixed)
        train_examples = train_examples + mixed

    train = [e.record for e in train_examples]
    evals = [e.record for e in eval_examples]
    if cfg.format == "preference":
        both = unify_preference_records(train + evals)
        train, evals = both[:len(train)], both[len(train):]
    report.train_examples = len(train)
    report.eval_examples = len(evals)
    report.token_length_percentiles = percentiles(
        [e.tokens for e in train_examples] + [e.tokens for e in eval_examples]
    )
    report.content_hash = content_hash(train, evals)
    return PreparedDataset(train, evals, report)


def split(examples: list[Example], eval_fraction: float, seed: int,
          max_eval: int | None = None) -> tuple[list[Example], list[Example]]:
    """A seeded random hold-out of at most `max_eval` records; both parts keep the file's order."""
    n = len(examples)
    n_eval = round(n * eval_fraction)
    if eval_fraction > 0 and n_eval == 0 and n >= 2:
        n_eval = 1
    if max_eval is not None:
        n_eval = min(n_eval, max_eval)
    held_out = set(random.Random(seed).sample(range(n), n_eval))
    train = [e for i, e in enumerate(examples) if i not in held_out]
    evals = [e for i, e in enumerate(examples) if i in held_out]
    return train, evals


def content_hash(train: list[dict], evals: list[dict]) -> str:
    digest = hashlib.sha256()
    encode = _CANONICAL_JSON.encode
    for record in (*train, *evals):
        digest.update(encode(record).encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()


def category_balance(examples: list[Example], field_name: str,
                     report: DatasetReport) -> dict[str, Any] | None:
    counts = Counter(e.category for e in examples)
    if not counts:
        return None
    if set(counts) == {"(missing)"}:
        report.warnings.append(f'dataset.categoryField "{field_name}" is in no record')
    ordered = dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
    total = sum(ordered.values())
    (largest, most), (smallest, fewest) = next(iter(ordered.items())), list(ordered.items())[-1]
    if most > IMBALANCE_RATIO * fewest:
        report.warnings.append(
            f'category "{largest}" has {most} examples, {most / fewest:.0f}x the smallest '
            f'("{smallest}", {fewest}): consider rebalancing'
        )
    return {
        "field": field_name,
        "counts": ordered,
        "shares": {k: round(v / total, 4) for k, v in ordered.items()},
    }


class _Pipeline:
    def __init__(self, cfg: DatasetConfig, report: DatasetReport, counter: TokenCounter,
                 max_seq_length: int, pair_limits: dict[str, int | None] | None = None,
                 renderer: Any = None) -> None:
        self.pair_limits = pair_limits or {}
        self.renderer = renderer  # chat records are rendered with the chat template
        self.cfg = cfg
        self.report = report
        self.counter = counter
        self.max_seq_length = max_seq_length

    def _convert_all(self, source: str, fmt: str, field_map: dict[str, str], label: str,
                     errors: list[str]) -> tuple[list[Example], int]:
        """Examples and the number of records read; errors appended to `errors`."""
        examples: list[Example] = []
        read = 0
        tabular = is_tabular(source)
        category_field = self.cfg.category_field
        for where, raw, error in read_records(source, split=self.cfg.split):
            read += 1
            if error is None:
                try:
                    examples.append(convert(raw, fmt, field_map, where, category_field,
                                            parse_json_strings=tabular,
                                            render=self.renderer.count if self.renderer else None))
                    continue
                except RecordError as exc:
                    error = f"{where}: {exc}"
            errors.append(label + error)
        return examples, read

    def read(self, source: str, label: str = "") -> list[Example] | None:
        """Valid examples of `source`, counting what was read and rejected; None: unusable."""
        report, cfg = self.report, self.cfg
        errors: list[str] = []
        try:
            examples, read = self._convert_all(source, cfg.format, cfg.field_map, label, errors)
        except SourceError as exc:
            report.fail(f"{label}{exc}")
            return None
        report.examples_read += read
        report.rejected += len(errors)
        for error in errors[:20]:
            report.add_error(error)
        if read == 0:
            report.fail(f"{label}{source}: no records")
            return None
        fraction = len(errors) / read
        if fraction > cfg.max_invalid_fraction:
            report.fail(
                f"{label}{len(errors)} of {read} records are invalid ({fraction:.1%}); "
                f"dataset.maxInvalidFraction allows {cfg.max_invalid_fraction:.1%}"
            )
        elif errors:
            report.warnings.append(
                f"{label}{len(errors)} invalid records dropped ({fraction:.1%}, "
                f"dataset.maxInvalidFraction allows {cfg.max_invalid_fraction:.1%})"
            )
        return examples

    def clean(self, examples: list[Example], *, leaked: set[bytes] = frozenset(),
              count: bool = True) -> list[Example]:
        """Deduplicate and apply the length policy; `leaked` keys (eval records) are removed."""
        cfg, report = self.cfg, self.report
        texts = [e.dedup_text for e in examples]
        if cfg.dedup.exact or leaked:
            if cfg.dedup.exact:
                flags = dedup.exact_duplicates(texts, seen=set(leaked))
            else:
                flags = [dedup.exact_key(t) in leaked for t in texts]
            if count:
                report.duplicates_removed += sum(flags)
            examples = [e for e, dup in zip(examples, flags) if not dup]
            texts = [e.dedup_text for e in examples]
        if cfg.dedup.near_threshold and 0 < cfg.dedup.near_threshold < 1:  # 1: off
            # Judged on what the model learns from: a shared system prompt is no likeness.
            flags = dedup.near_duplicates([e.similarity_text for e in examples], cfg.dedup.near_threshold)
            if count:
                report.near_duplicates_removed += sum(flags)
            examples = [e for e, dup in zip(examples, flags) if not dup]
        result = apply_length_policy(examples, self.counter, self.max_seq_length,
                                     cfg.length_policy, renderer=self.renderer, **self.pair_limits)
        if count:
            report.truncated += result.truncated
            report.dropped_too_long += result.dropped_too_long
            report.dropped_no_trainable_tokens += result.dropped_no_trainable
        return result.kept

    def mix_in(self, cfg: DatasetConfig, train: list[Example], evals: list[Example], seed: int,
               resolve: Callable[[str], str]) -> list[Example]:
        """A seeded sample of the mix source, mix.ratio times the size of train."""
        mix, report = cfg.mix, self.report
        fmt = mix.format or cfg.format
        if OUTPUT_KIND[fmt] != OUTPUT_KIND[cfg.format]:
            report.fail(f"dataset.mix.format {fmt} makes {OUTPUT_KIND[fmt]} records, which "
                        f"cannot be mixed with the {OUTPUT_KIND[cfg.format]} records of "
                        f"format {cfg.format}")
            return []
        # The field map describes the main source; it applies to the mix only in the same format.
        field_map = cfg.field_map if fmt == cfg.format else {}
        label = f"mix source {mix.source}: "
        errors: list[str] = []
        try:
            examples, _ = self._convert_all(resolve(mix.source), fmt, field_map, label, errors)
        except SourceError as exc:
            report.fail(f"{label}{exc}")
            return []
        if errors:
            report.warnings.append(f"{label}{len(errors)} invalid records skipped "
                                   f"(first: {errors[0].removeprefix(label)})")
        own_keys = {dedup.exact_key(e.dedup_text) for e in (*train, *evals)}
        examples = self.clean(examples, leaked=own_keys, count=False)
        wanted = round(mix.ratio * len(train))
        if wanted > len(examples):
            report.warnings.append(f"{label}asked for {wanted} records "
                                   f"(mix.ratio {mix.ratio}), only {len(examples)} usable")
            wanted = len(examples)
        chosen = sorted(random.Random(seed).sample(range(len(examples)), wanted))
        return [examples[i] for i in chosen]
