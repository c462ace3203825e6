"""Load, validate, clean, split and mix a dataset: everything before any GPU time.

The records stream through in batches and never all sit in memory at once:

1. read and convert each record (errors keep their line numbers), drop exact duplicates
   (a 128-bit key per record in a set), index each batch for near-duplicates (MinHash
   digests, 512 bytes a record), and append the survivors to a spill;
2. verify the near-duplicate candidates, reading only their texts back;
3. apply the length policy: lengths are measured in the first step; only the records that
   do not fit (or have nothing to learn from) are read back, cut or dropped, and written to
   a second spill;
4. split by position, hash the kept records' bytes, and read the records back only when the
   caller wants them (`prepare_dataset`; `validate-data` wants only the report).

The spills stay in memory up to SPILL_MEMORY_BYTES (all of them together); past that they
are files in `work_dir` (the trainer passes a folder on the job's claim), or in a temporary
folder, removed at the end. A record that fits the length policy is never copied: the kept
records are references into the first spill.
"""

from __future__ import annotations

import gc
import hashlib
import os
import random
import tempfile
from array import array
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from ..config import DatasetConfig
from . import dedup
from .formats import (ConvertedBlock, Example, RecordError, conversational_pair, convert, convert_block,
                      output_kind)
from .length import TokenCounter, apply_length_policy, make_counter, measure_block, percentiles
from .load import Block, SourceError, is_tabular, read_batches
from .report import MAX_ERRORS, DatasetReport, DataValidationError

# Warn when the largest category has more than this many times the examples of the smallest.
IMBALANCE_RATIO = 10
# Records per batch, and the most characters of text in one (a few huge records).
BATCH_RECORDS = 4096
BATCH_CHARS = 4_000_000
# Spilled records kept in memory (by all of a run's spills together) before they go to disk:
# all of 200,000 records of the benchmark, the first fifth of 1,000,000.
SPILL_MEMORY_BYTES = 150 << 20

_encode = msgspec.json.Encoder(order="sorted").encode
_encode_lines = msgspec.json.Encoder(order="sorted").encode_lines
_decode = msgspec.json.Decoder().decode


@dataclass
class PreparedDataset:
    train: list[dict]
    eval: list[dict]
    report: DatasetReport


def prepare_dataset(cfg: DatasetConfig, *, seed: int, max_seq_length: int, tokenizer: Any = None,
                    resolve: Callable[[str], str] = lambda s: s,
                    max_prompt_length: int | None = None,
                    max_completion_length: int | None = None,
                    work_dir: str | Path | None = None) -> PreparedDataset:
    """The cleaned train/eval records; raises DataValidationError when the data is unusable.

    `max_prompt_length` / `max_completion_length` (preference pairs, DPO) cut prompts to
    their last and answers to their first so many tokens.
    """
    prepared = inspect_dataset(cfg, seed=seed, max_seq_length=max_seq_length,
                               tokenizer=tokenizer, resolve=resolve,
                               max_prompt_length=max_prompt_length,
                               max_completion_length=max_completion_length, work_dir=work_dir)
    if not prepared.report.usable:
        raise DataValidationError(prepared.report)
    return prepared


# Records over the length limit named in the report's warning (the rest are counted).
TOO_LONG_SHOWN = 5


@contextmanager
def _no_cyclic_gc() -> Iterator[None]:
    """The pipeline makes millions of small acyclic objects; the cyclic collector would
    rescan them again and again (a third of the run time) and free nothing."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def inspect_dataset(cfg: DatasetConfig, *, seed: int, max_seq_length: int, tokenizer: Any = None,
                    resolve: Callable[[str], str] = lambda s: s,
                    max_prompt_length: int | None = None,
                    max_completion_length: int | None = None,
                    work_dir: str | Path | None = None,
                    keep_records: bool = True) -> PreparedDataset:
    """Like prepare_dataset, but an unusable dataset is only marked so in the report.

    With `keep_records=False` (validate-data) the records are not read back into memory:
    train and eval come back empty and only the report is filled in.
    """
    from finetune_api.prompts import prompt_format

    from .. import chat_templates

    counter = make_counter(tokenizer)
    report = DatasetReport(token_lengths_approximate=counter.approximate)
    renderer = chat_templates.dataset_renderer(tokenizer, cfg.chat_template)
    report.prompt_format = prompt_format(cfg.format, renderer is not None)
    problem = chat_templates.missing_template_problem(
        tokenizer, [cfg.format] + ([cfg.mix.format] if cfg.mix and cfg.mix.format else []))
    if problem:
        report.fail(problem)
        return PreparedDataset([], [], report)
    with tempfile.TemporaryDirectory(prefix=".prepare-", dir=work_dir) as tmp, _no_cyclic_gc():
        pipeline = _Pipeline(cfg, report, counter, max_seq_length, Path(tmp),
                             pair_limits={"max_prompt_length": max_prompt_length,
                                          "max_completion_length": max_completion_length},
                             renderer=renderer)
        try:
            return pipeline.run(seed, resolve, keep_records)
        finally:
            pipeline.close()


def split(n: int, eval_fraction: float, seed: int,
          max_eval: int | None = None) -> tuple[list[int], list[int]]:
    """Positions of a seeded random hold-out of at most `max_eval` of `n` records, and of
    the rest; both in the file's order."""
    n_eval = round(n * eval_fraction)
    if eval_fraction > 0 and n_eval == 0 and n >= 2:
        n_eval = 1
    if max_eval is not None:
        n_eval = min(n_eval, max_eval)
    held_out = set(random.Random(seed).sample(range(n), n_eval))
    return [i for i in range(n) if i not in held_out], sorted(held_out)


def category_balance(categories: list[str | None], field_name: str,
                     report: DatasetReport) -> dict[str, Any] | None:
    counts = Counter(categories)
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


class _Spill:
    """Records appended one JSON line (or text) each, read back by position once writing is
    done. They stay in memory while the pipeline's `memory` budget (shared by its spills)
    lasts; past it, the spill goes to its file (on the claim in the trainer). Writing to
    disk costs CPU too (a quarter of validate-data's at 200k records on ext4)."""

    def __init__(self, path: Path, memory: list[int] | None = None) -> None:
        self.path = path
        self.memory = memory if memory is not None else [0]
        self.chunks: list[bytes] | None = []  # None: on disk
        self.file = None
        self.ends = array("q")
        self.size = 0
        self.view: bytes | None = None

    def _to_disk(self) -> None:
        self.file = self.path.open("w+b")
        for chunk in self.chunks:
            self.file.write(chunk)
        self.memory[0] += sum(map(len, self.chunks))
        self.chunks = None

    def _append(self, data: bytes, ends: np.ndarray) -> None:
        if self.chunks is not None:
            if self.memory[0] >= len(data):
                self.memory[0] -= len(data)
                self.chunks.append(data)
            else:
                self._to_disk()
        if self.chunks is None:
            self.file.write(data)
        self.ends.frombytes((np.asarray(ends, dtype=np.int64) + self.size).tobytes())
        self.size += len(data)

    def append_lines(self, items: list) -> None:
        if items:
            data = _encode_lines(items)
            # Encoded JSON has no raw newline: each one ends a record.
            self._append(data, np.flatnonzero(np.frombuffer(data, dtype=np.uint8) == 10) + 1)

    def append_texts(self, texts: list[str]) -> None:
        """Plain UTF-8 texts, for get_text()."""
        if texts:
            joined = "".join(texts)
            if joined.isascii():  # a byte a character
                self._append(joined.encode("ascii"),
                             np.cumsum(np.fromiter(map(len, texts), dtype=np.int64, count=len(texts))))
                return
            encoded = [t.encode("utf-8", "surrogatepass") for t in texts]
            self._append(b"".join(encoded), np.cumsum([len(e) for e in encoded]))

    def __len__(self) -> int:
        return len(self.ends)

    def _read(self, start: int, stop: int) -> bytes | memoryview:
        """Bytes start..stop-1: a slice of the joined chunks, or read from the file (not
        mapped: pages read back do not count in the process's memory)."""
        if self.chunks is not None:
            if self.view is None:
                self.view = b"".join(self.chunks)
                self.chunks = []
            return memoryview(self.view)[start:stop]
        if self.view is None:
            self.file.flush()
            self.view = b""  # flushed
        return os.pread(self.file.fileno(), stop - start, start)

    def get(self, i: int) -> bytes:
        return bytes(self._read(self.ends[i - 1] if i else 0, self.ends[i]))

    def digest_run(self, digest: Any, first: int, last: int) -> None:
        """Feed the records first..last (inclusive) to `digest`, 16 MiB at a time."""
        start, stop = self.ends[first - 1] if first else 0, self.ends[last]
        for at in range(start, stop, 16 << 20):
            digest.update(self._read(at, min(stop, at + (16 << 20))))

    def get_text(self, i: int) -> str:
        return self.get(i).decode("utf-8", "surrogatepass")

    def decode(self, positions: list[int]) -> list:
        return [_decode(self.get(i)) for i in positions]

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        self.view = None
        if self.chunks:
            self.memory[0] += sum(map(len, self.chunks))
        self.chunks = None if self.file is not None else []


class _Kept:
    """The records kept after the length policy, by position: most are lines of the
    survivors' spill, unchanged (`at[i] >= 0`: that line); a record the policy changed is
    line -at[i]-1 of a spill of its own. Nothing is copied for the records kept as they are."""

    def __init__(self, source: _Spill, changed: _Spill) -> None:
        self.source = source
        self.changed = changed
        self.at = array("q")

    def __len__(self) -> int:
        return len(self.at)

    def get(self, i: int) -> bytes:
        where = self.at[i]
        return self.source.get(where) if where >= 0 else self.changed.get(-where - 1)

    def decode(self, positions: list[int]) -> list:
        return [_decode(self.get(i)) for i in positions]

    def digest_ranges(self, digest: Any, positions: list[int]) -> None:
        """Feed the records at `positions` to `digest` in order, unchanged neighbours in
        the survivors' spill in one call."""
        at = np.frombuffer(self.at, dtype=np.int64)[np.asarray(positions, dtype=np.int64)]
        if not len(at):
            return
        # A run ends where the next record is not the next line of the survivors' spill.
        ends = np.flatnonzero((np.diff(at) != 1) | (at[1:] < 0) | (at[:-1] < 0)).tolist() + [len(at) - 1]
        first = 0
        for last in ends:
            if at[first] < 0:
                digest.update(self.changed.get(-int(at[first]) - 1))
            else:
                self.source.digest_run(digest, int(at[first]), int(at[last]))
            first = last + 1


def _columns(examples: list[Example]) -> ConvertedBlock:
    near = [e.near_text for e in examples]
    rendered = [e.rendered_tokens for e in examples]
    return ConvertedBlock([e.record for e in examples], [e.dedup_text for e in examples],
                          None if all(t is None for t in near) else near,
                          [e.category for e in examples],
                          None if all(t is None for t in rendered) else rendered)


def _with_where(examples: list[Example]) -> tuple[ConvertedBlock, Callable[[int], str]]:
    wheres = [e.where for e in examples]
    return _columns(examples), wheres.__getitem__


def _sliced(block: ConvertedBlock, size: int) -> Iterator[tuple[int, ConvertedBlock]]:
    """The block in pieces of at most `size` records, each with its first record's offset."""
    if len(block.records) <= size:
        yield 0, block
        return
    for start in range(0, len(block.records), size):
        part = slice(start, start + size)
        yield start, ConvertedBlock(block.records[part], block.dedup_texts[part],
                             None if block.near_texts is None else block.near_texts[part],
                             block.categories[part],
                             None if block.rendered_tokens is None else block.rendered_tokens[part])


def _pick(values: list | None, at: list[int] | None) -> list | None:
    return values if values is None or at is None else [values[i] for i in at]


@dataclass
class _Survivors:
    """The records left after exact-duplicate removal, in a spill (canonical JSON, one a
    line), with what the length policy and the report need, by position. `total` is -1
    where the record was not measured in bulk (a preference pair)."""

    records: _Spill
    keys: list[int]
    categories: list[str | None]
    total: array
    trainable: array
    rendered: array  # -1: None
    # Where each record that may be over the length limit is (by position), for the warning.
    where: dict[int, str] = field(default_factory=dict)


def _example(record: dict, category: str | None, rendered: int, where: str = "") -> Example:
    """An Example back from the survivors' spill; its dedup text is not needed any more."""
    return Example(where, record, "", category, rendered_tokens=None if rendered < 0 else rendered)


@dataclass
class _Cleaned:
    """A source after cleaning: its kept records in a spill, with their tokens, categories
    and exact-duplicate keys, by position."""

    records: _Kept
    tokens: array
    categories: list[str | None]
    keys: list[int]
    conversational: bool = False  # a preference pair with a message-list prompt is among them

    def __len__(self) -> int:
        return len(self.records)


class _Pipeline:
    def __init__(self, cfg: DatasetConfig, report: DatasetReport, counter: TokenCounter,
                 max_seq_length: int, work_dir: Path,
                 pair_limits: dict[str, int | None] | None = None, renderer: Any = None) -> None:
        self.pair_limits = pair_limits or {}
        self.renderer = renderer  # chat records are rendered with the chat template
        self.cfg = cfg
        self.report = report
        self.counter = counter
        self.max_seq_length = max_seq_length
        self.work_dir = work_dir
        self.spills: list[_Spill] = []
        self.memory = [SPILL_MEMORY_BYTES]  # what the spills may still keep in memory
        self.preference = cfg.format == "preference"

    def _spill(self, name: str) -> _Spill:
        spill = _Spill(self.work_dir / f"{len(self.spills)}-{name}.jsonl", self.memory)
        self.spills.append(spill)
        return spill

    def close(self) -> None:
        for spill in self.spills:
            spill.close()

    def run(self, seed: int, resolve: Callable[[str], str], keep_records: bool) -> PreparedDataset:
        cfg, report = self.cfg, self.report
        empty = PreparedDataset([], [], report)
        evals: _Cleaned | None = None
        if cfg.eval_source:
            evals = self.clean_source(resolve(cfg.eval_source), cfg.format, cfg.field_map,
                                      label=f"eval source {cfg.eval_source}: ")
            if evals is None:
                return empty
        main = self.clean_source(resolve(cfg.source), cfg.format, cfg.field_map,
                                 leaked=set(evals.keys) if evals else frozenset())
        if main is None:
            return empty

        if evals is not None:
            parts = [(main, list(range(len(main))))], [(evals, list(range(len(evals))))]
        else:
            train_at, eval_at = split(len(main), cfg.eval_fraction, seed,
                                      max_eval=cfg.max_eval_examples)
            wanted = round(len(main) * cfg.eval_fraction)
            if cfg.max_eval_examples is not None and wanted > cfg.max_eval_examples:
                report.warnings.append(f"evalFraction {cfg.eval_fraction} would hold out "
                                       f"{wanted} records; held out "
                                       f"dataset.maxEvalExamples ({cfg.max_eval_examples})")
            if cfg.eval_fraction > 0 and len(main) == 1:
                report.warnings.append("too few examples to hold any out for evaluation")
            parts = [(main, train_at)], [(main, eval_at)]
        train_parts, eval_parts = parts

        own = sum(len(at) for _, at in train_parts + eval_parts)
        if cfg.category_field:
            report.category_balance = category_balance(
                [c.categories[i] for c, at in train_parts + eval_parts for i in at],
                cfg.category_field, report)
        if own < cfg.min_examples and report.usable:
            report.fail(f"only {own} usable examples, fewer than dataset.minExamples "
                        f"({cfg.min_examples})")

        if cfg.mix is not None and report.usable:
            own_keys = {c.keys[i] for c, at in train_parts + eval_parts for i in at}
            mixed = self.mix_in(cfg, sum(len(at) for _, at in train_parts), own_keys, seed,
                                resolve)
            if mixed is not None:
                report.mix_examples = len(mixed[1])
                train_parts.append(mixed)

        conversational = self.preference and any(
            c.conversational for c, _ in train_parts + eval_parts)
        report.train_examples = sum(len(at) for _, at in train_parts)
        report.eval_examples = sum(len(at) for _, at in eval_parts)
        report.token_length_percentiles = percentiles(
            [c.tokens[i] for c, at in train_parts + eval_parts for i in at])
        digest = hashlib.sha256()
        for part, at in train_parts + eval_parts:
            if not conversational:
                part.records.digest_ranges(digest, at)
                continue
            for i in at:
                digest.update(_encode(conversational_pair(_decode(part.records.get(i)))) + b"\n")
        report.content_hash = digest.hexdigest()
        if not keep_records:
            return empty

        def records(parts: list[tuple[_Cleaned, list[int]]]) -> list[dict]:
            out = [r for part, at in parts for r in part.records.decode(at)]
            return [conversational_pair(r) for r in out] if conversational else out

        return PreparedDataset(records(train_parts), records(eval_parts), report)

    def _blocks(self, source: str, fmt: str, field_map: dict[str, str], label: str,
                errors: list[str], counts: list[int]) -> Iterator[tuple[ConvertedBlock, Callable[[int], str]]]:
        """The valid records as columns, in file order; the first errors appended to
        `errors`, records read and rejected counted in counts[0] and counts[1]. A block of
        good JSONL lines is converted in bulk; when any of its records is bad, it is
        converted record by record, as everything else is, so errors stay those of convert().
        Each block comes with where(i): where its record i is ("line N", the shard too),
        worked out only for the few records a warning names."""
        tabular = is_tabular(source)
        category_field = self.cfg.category_field
        render = self.renderer.count if self.renderer else None
        batch: list[Example] = []
        chars = 0

        def one(where: str, raw: Any, error: str | None) -> None:
            nonlocal chars
            counts[0] += 1
            if error is None:
                try:
                    example = convert(raw, fmt, field_map, where, category_field,
                                      parse_json_strings=tabular, render=render)
                except RecordError as exc:
                    error = f"{where}: {exc}"
                else:
                    batch.append(example)
                    chars += len(example.dedup_text)
                    return
            counts[1] += 1
            if len(errors) < MAX_ERRORS:
                errors.append(label + error)

        for item in read_batches(source, split=self.cfg.split):
            if isinstance(item, Block):
                converted = None if tabular else convert_block(
                    item.records, fmt, field_map, category_field, render=render)
                if converted is not None:
                    if batch:
                        yield _with_where(batch)
                        batch, chars = [], 0
                    counts[0] += len(item.records)
                    for offset, part in _sliced(converted, BATCH_RECORDS):
                        yield part, (lambda i, item=item, offset=offset: item.where(offset + i))
                    continue
                for i, raw in enumerate(item.records):
                    one(item.where(i), raw, None)
                    if len(batch) >= BATCH_RECORDS or chars >= BATCH_CHARS:
                        yield _with_where(batch)
                        batch, chars = [], 0
                continue
            one(*item)
            if len(batch) >= BATCH_RECORDS or chars >= BATCH_CHARS:
                yield _with_where(batch)
                batch, chars = [], 0
        if batch:
            yield _with_where(batch)

    def clean_source(self, source: str, fmt: str, field_map: dict[str, str], *,
                     label: str = "", leaked: set[int] | frozenset = frozenset(),
                     count: bool = True) -> _Cleaned | None:
        """Read, validate, deduplicate and length-check `source`; None: unusable. With
        count=False (a mix source) its numbers stay out of the report, and its invalid
        records are only a warning."""
        cfg, report = self.cfg, self.report
        errors: list[str] = []
        counts = [0, 0]  # records read, rejected
        exact = cfg.dedup.exact
        near = (dedup.NearDuplicateIndex(cfg.dedup.near_threshold, str(self.work_dir))
                if 0 < cfg.dedup.near_threshold < 1 else None)  # 1: off
        seen: set[int] = set(leaked)
        survivors = _Survivors(self._spill("read"), [], [], array("q"), array("q"), array("q"))
        texts = self._spill("texts")  # what near-duplicates are judged on, by position
        exact_removed = 0
        try:
            for block, where in self._blocks(source, fmt, field_map, label, errors, counts):
                words = dedup.word_hashes(block.dedup_texts)
                keys = dedup.exact_keys_of(*words)
                kept_at: list[int] | None = None  # None: all of them
                if exact or leaked:
                    # Kept: not seen before, and (exact) the first of its key in the batch.
                    keep = ~np.fromiter(map(seen.__contains__, keys), dtype=bool, count=len(keys))
                    if exact:
                        first = dict(zip(reversed(keys), range(len(keys) - 1, -1, -1)))
                        if len(first) < len(keys):
                            once = np.zeros(len(keys), dtype=bool)
                            once[np.fromiter(first.values(), dtype=np.int64, count=len(first))] = True
                            keep &= once
                        seen.update(first)
                    if not keep.all():
                        kept_at = np.flatnonzero(keep).tolist()
                        exact_removed += len(keys) - len(kept_at)
                records = _pick(block.records, kept_at)
                if not records:
                    continue
                near_texts = _pick(block.near_texts, kept_at)
                if near is not None:
                    # Judged on what the model learns from: a shared system prompt is no likeness.
                    if near_texts is None:
                        near.add_words(*(words if kept_at is None
                                         else dedup.select_rows(*words, kept_at)))
                        texts.append_texts(_pick(block.dedup_texts, kept_at))
                    else:
                        similar = [t if n is None else n for t, n in
                                   zip(_pick(block.dedup_texts, kept_at), near_texts)]
                        near.add(similar)
                        texts.append_texts(similar)
                rendered = _pick(block.rendered_tokens, kept_at)
                measured = measure_block(records, self.counter, renderer=self.renderer,
                                         rendered_tokens=rendered)
                # Where the records that may be too long are, for the report's warning.
                first = len(survivors.keys)
                if measured is None:
                    over = range(len(records))
                else:
                    over = np.flatnonzero(measured[0] > self.max_seq_length).tolist()
                for i in over:
                    survivors.where[first + i] = where(i if kept_at is None else kept_at[i])
                if measured is None:
                    survivors.total.extend([-1] * len(records))
                    survivors.trainable.extend([0] * len(records))
                else:
                    survivors.total.frombytes(measured[0].astype(np.int64).tobytes())
                    survivors.trainable.frombytes(measured[1].astype(np.int64).tobytes())
                survivors.rendered.extend([-1] * len(records) if rendered is None
                                          else [-1 if r is None else r for r in rendered])
                survivors.keys.extend(keys if kept_at is None else [keys[i] for i in kept_at])
                survivors.categories.extend(_pick(block.categories, kept_at))
                survivors.records.append_lines(records)
        except SourceError as exc:
            report.fail(f"{label}{exc}")
            return None
        if not self._check_read(source, label, errors, *counts, count):
            return None
        near_removed: set[int] = set()
        if near is not None:
            near_removed = set(near.duplicates(
                lambda positions: [texts.get_text(i) for i in positions]))
        if count:
            report.duplicates_removed += exact_removed
            report.near_duplicates_removed += len(near_removed)
        return self._apply_length(survivors, near_removed, count, label)

    def _check_read(self, source: str, label: str, errors: list[str], read: int,
                    rejected: int, count: bool) -> bool:
        """Count what was read and rejected; False: the source is unusable."""
        report, cfg = self.report, self.cfg
        if not count:
            if rejected:
                report.warnings.append(f"{label}{rejected} invalid records skipped "
                                       f"(first: {errors[0].removeprefix(label)})")
            return True
        report.examples_read += read
        report.rejected += rejected
        for error in errors:
            report.add_error(error)
        if read == 0:
            report.fail(f"{label}{source}: no records")
            return False
        fraction = rejected / read
        if fraction > cfg.max_invalid_fraction:
            report.fail(
                f"{label}{rejected} of {read} records are invalid ({fraction:.1%}); "
                f"dataset.maxInvalidFraction allows {cfg.max_invalid_fraction:.1%}"
            )
        elif rejected:
            report.warnings.append(
                f"{label}{rejected} invalid records dropped ({fraction:.1%}, "
                f"dataset.maxInvalidFraction allows {cfg.max_invalid_fraction:.1%})"
            )
        return True

    def _apply_length(self, survivors: _Survivors, removed: set[int], count: bool,
                      label: str = "") -> _Cleaned:
        """The length policy over the survivors that are no near-duplicates, in batches.

        A record measured in bulk that fits and has trainable tokens is kept as it is (a
        reference to its line in the survivors' spill). Only the others (too long, nothing
        trainable, preference pairs) are read back and given to apply_length_policy."""
        report = self.report
        spill = survivors.records
        cleaned = _Cleaned(_Kept(spill, self._spill("changed")), array("q"), [], [])
        total = np.frombuffer(survivors.total, dtype=np.int64)
        trainable = np.frombuffer(survivors.trainable, dtype=np.int64)
        gone = np.zeros(len(spill), dtype=bool)
        if removed:
            gone[np.fromiter(removed, dtype=np.int64, count=len(removed))] = True
        fits = (total >= 0) & (total <= self.max_seq_length) & (trainable > 0)
        keep = fits & ~gone
        look = np.flatnonzero(~fits & ~gone)
        # Those that need the policy, a batch at a time, in the file's order.
        changed: dict[int, Example] = {}
        too_long: list[tuple[str, int]] = []
        too_long_count = 0
        for start in range(0, len(look), BATCH_RECORDS):
            looked = look[start:start + BATCH_RECORDS].tolist()
            examples = [_example(record, survivors.categories[i], survivors.rendered[i],
                                 survivors.where.get(i, ""))
                        for record, i in zip(spill.decode(looked), looked)]
            where = {id(e): i for e, i in zip(examples, looked)}
            result = apply_length_policy(examples, self.counter, self.max_seq_length,
                                         self.cfg.length_policy, renderer=self.renderer,
                                         **self.pair_limits)
            too_long_count += len(result.too_long)
            too_long += result.too_long[:TOO_LONG_SHOWN - len(too_long)]
            if count:
                report.truncated += result.truncated
                report.dropped_too_long += result.dropped_too_long
                report.dropped_no_trainable_tokens += result.dropped_no_trainable
            for example in result.kept:
                changed[where[id(example)]] = example
            if self.preference and not cleaned.conversational:
                cleaned.conversational = any(isinstance(e.record.get("prompt"), list)
                                             for e in result.kept)
        tokens = total.copy()
        if changed:
            keep[list(changed)] = True
            positions = sorted(changed)
            cleaned.records.changed.append_lines([changed[i].record for i in positions])
            tokens[positions] = [changed[i].tokens for i in positions]
        at = np.flatnonzero(keep)
        refs = at.copy()
        if changed:
            refs[np.searchsorted(at, positions)] = -1 - np.arange(len(positions))
        cleaned.records.at.frombytes(refs.tobytes())
        cleaned.tokens.frombytes(tokens[at].tobytes())
        kept_at = at.tolist()
        cleaned.categories.extend([survivors.categories[i] for i in kept_at])
        cleaned.keys.extend([survivors.keys[i] for i in kept_at])
        if count and too_long:
            report.warnings.append(self._too_long_warning(too_long, too_long_count, label))
        return cleaned

    def _too_long_warning(self, shown: list[tuple[str, int]], count: int, label: str) -> str:
        """Which records were over training.maxSeqLength, by line (the first few)."""
        policy = self.cfg.length_policy
        where = ", ".join(f"{at} ({tokens} tokens)" for at, tokens in shown)
        more = f" and {count - len(shown)} more" if count > len(shown) else ""
        how = " as rendered with the chat template" if self.renderer is not None else ""
        done = "dropped" if policy == "drop" else "truncated"
        return (f"{label}{count} record{'s' if count > 1 else ''} over training.maxSeqLength "
                f"({self.max_seq_length} tokens{how}) {done} (lengthPolicy {policy}): {where}{more}")

    def mix_in(self, cfg: DatasetConfig, train_size: int, own_keys: set[int], seed: int,
               resolve: Callable[[str], str]) -> tuple[_Cleaned, list[int]] | None:
        """A seeded sample of the mix source, mix.ratio times the size of train."""
        mix, report = cfg.mix, self.report
        fmt = mix.format or cfg.format
        templated = self.renderer is not None
        if output_kind(fmt, templated) != output_kind(cfg.format, templated):
            report.fail(f"dataset.mix.format {fmt} makes {output_kind(fmt, templated)} records, which "
                        f"cannot be mixed with the {output_kind(cfg.format, templated)} records of "
                        f"format {cfg.format}")
            return None
        # The field map describes the main source; it applies to the mix only in the same format.
        field_map = cfg.field_map if fmt == cfg.format else {}
        label = f"mix source {mix.source}: "
        cleaned = self.clean_source(resolve(mix.source), fmt, field_map, label=label,
                                    leaked=own_keys, count=False)
        if cleaned is None:
            return None
        wanted = round(mix.ratio * train_size)
        if wanted > len(cleaned):
            report.warnings.append(f"{label}asked for {wanted} records "
                                   f"(mix.ratio {mix.ratio}), only {len(cleaned)} usable")
            wanted = len(cleaned)
        return cleaned, sorted(random.Random(seed).sample(range(len(cleaned)), wanted))
