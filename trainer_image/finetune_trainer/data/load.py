"""Read raw records from a local file (JSONL, JSON, CSV, Parquet), a folder of such files
(shards, read in name order) or a Hugging Face dataset.

`read_records` yields `(where, record, error)` triples: `where` names the record the way a
person finds it in the file ("line 41" in JSONL and CSV, "record 3" in a JSON list, "row 7"
in Parquet or a hub dataset; prefixed with the shard's name in a folder); exactly one of `record` and `error` is set. Problems with the
source as a whole (missing, empty, binary) raise SourceError.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from .formats import MAX_RECORD_BYTES

Item = tuple[str, Any, str | None]

FILE_TYPES = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".tsv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_BOM = b"\xef\xbb\xbf"


class SourceError(ValueError):
    """The source cannot be read at all."""


def is_hub_source(source: str) -> bool:
    if source.startswith("hf://"):
        return True
    path = Path(source)
    return not path.exists() and path.suffix.lower() not in FILE_TYPES and bool(_HUB_ID.match(source))


def read_records(source: str, *, split: str | None = None) -> Iterator[Item]:
    if is_hub_source(source):
        yield from _read_hub(source, split)
        return
    path = Path(source)
    if not path.exists():
        raise SourceError(f"{source}: file not found")
    if path.is_dir():
        yield from _read_shards(path)
        return
    file_type = FILE_TYPES.get(path.suffix.lower()) or _sniff(path)
    if path.stat().st_size == 0:
        raise SourceError(f"{source}: file is empty")
    if file_type == "parquet":
        yield from _read_parquet(path)
        return
    _refuse_binary(path)
    if file_type == "jsonl":
        yield from _read_jsonl(path)
    elif file_type == "json":
        yield from _read_json(path)
    else:
        yield from _read_csv(path, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")


def _shards(folder: Path) -> list[Path]:
    """Every data file under `folder` (by the suffixes of FILE_TYPES), in name order; hidden
    files and other files are skipped."""
    shards = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in FILE_TYPES
                    and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    if not shards:
        raise SourceError(f"{folder}: folder holds no .jsonl, .json, .csv or .parquet file")
    return shards


def _read_shards(folder: Path) -> Iterator[Item]:
    for shard in _shards(folder):
        name = shard.relative_to(folder)
        for where, record, error in read_records(str(shard)):
            # The error names its line; the shard's name goes in front of both.
            yield f"{name} {where}", record, error and f"{name} {error}"


def _sniff(path: Path) -> str:
    with path.open("rb") as f:
        head = f.read(4096)
    if head.startswith(b"PAR1"):
        return "parquet"
    stripped = head.removeprefix(_BOM).lstrip()
    if stripped.startswith(b"["):
        return "json"
    if stripped.startswith(b"{"):
        return "jsonl"
    raise SourceError(
        f"{path}: cannot tell the file type; name it .jsonl, .json, .csv or .parquet"
    )


def _refuse_binary(path: Path) -> None:
    with path.open("rb") as f:
        head = f.read(8192)
    nul = head.find(b"\x00")
    if nul >= 0:
        line = head.count(b"\n", 0, nul) + 1
        raise SourceError(
            f"{path}: looks like a binary file, not text (NUL byte at line {line}, byte {nul + 1})"
        )


def _decode(raw: bytes, lineno: int) -> tuple[str | None, str | None]:
    try:
        return raw.decode("utf-8"), None
    except UnicodeDecodeError as exc:
        bad = raw[exc.start]
        return None, f"line {lineno}: not valid UTF-8: byte 0x{bad:02x} at column {exc.start + 1}"


def _read_jsonl(path: Path) -> Iterator[Item]:
    for batch in _jsonl_batches(path):
        if isinstance(batch, Block):
            yield from ((batch.where(i), record, None) for i, record in enumerate(batch.records))
        else:
            yield batch


class Block:
    """Records of consecutive lines parsed in one call, none with a reading error; `where(i)`
    names records[i] the way read_records would."""

    __slots__ = ("records", "prefix", "first")

    def __init__(self, records: list, prefix: str, first: int) -> None:
        self.records, self.prefix, self.first = records, prefix, first

    def where(self, i: int) -> str:
        return f"{self.prefix}line {self.first + i}"


def read_batches(source: str, *, split: str | None = None) -> Iterator[Block | Item]:
    """The items of read_records, in the same order, with runs of good JSONL lines given as
    Blocks (no per-record `where` string is made unless a record turns out bad)."""
    if is_hub_source(source):
        yield from read_records(source, split=split)
        return
    path = Path(source)
    if path.is_dir():
        yield from _shard_batches(path)
        return
    if path.exists() and path.stat().st_size and (FILE_TYPES.get(path.suffix.lower()) == "jsonl" or (
            path.suffix.lower() not in FILE_TYPES and _sniff(path) == "jsonl")):
        _refuse_binary(path)
        yield from _jsonl_batches(path)
        return
    yield from read_records(source, split=split)


def _shard_batches(folder: Path) -> Iterator[Block | Item]:
    for shard in _shards(folder):
        name = shard.relative_to(folder)
        for batch in read_batches(str(shard)):
            if isinstance(batch, Block):
                yield Block(batch.records, f"{name} {batch.prefix}", batch.first)
            else:
                where, record, error = batch
                yield f"{name} {where}", record, error and f"{name} {error}"


def _jsonl_batches(path: Path) -> Iterator[Block | Item]:
    lineno = 0
    for block in _line_blocks(path):
        records = _parse_block(block)
        if records is not None:
            yield Block(records, "", lineno + 1)
            lineno += len(records)
            continue
        # Something in this block needs a closer look: line by line, with the exact errors.
        for raw in block.split(b"\n"):
            lineno += 1
            item = _jsonl_line(lineno, raw)
            if item is not None:
                yield item


_BLOCK_BYTES = 1 << 22
# The bytes that bytes.strip() removes (and the regex class [ \t\r\f\v\n]).
_WHITESPACE = np.zeros(256, dtype=bool)
_WHITESPACE[list(b" \t\n\r\x0b\x0c")] = True
_parse_lines = msgspec.json.Decoder().decode_lines


def _line_blocks(path: Path) -> Iterator[bytes]:
    """The file in blocks of whole lines, without the newline that ends a block (and
    without the file's byte order mark)."""
    with path.open("rb") as f:
        carry: list[bytes] = []  # the start of a line that the next read completes
        chunk = f.read(_BLOCK_BYTES).removeprefix(_BOM)
        while chunk:
            cut = chunk.rfind(b"\n")
            if cut < 0:
                carry.append(chunk)
            else:
                yield b"".join(carry) + chunk[:cut]
                carry = [chunk[cut + 1:]]
            chunk = f.read(_BLOCK_BYTES)
        rest = b"".join(carry)
        if rest:
            yield rest


def _parse_block(block: bytes) -> list | None:
    """Every line of `block` parsed by msgspec in one call, or None when any line needs the
    line-by-line checks (blank, too long, not UTF-8, not JSON, NaN, a lone surrogate...).

    msgspec skips blank lines and takes two values on one line: with no blank line, one
    record per line is exactly `len(records) == lines`."""
    if not block:
        return None
    raw = np.frombuffer(block, dtype=np.uint8)
    ends = np.flatnonzero(raw == 10)
    starts = np.empty(len(ends) + 1, dtype=np.int64)
    starts[0] = 0
    starts[1:] = ends + 1
    lengths = np.append(ends, len(block)) - starts
    if lengths.max() > MAX_RECORD_BYTES or not lengths.min():
        return None
    # A line is blank only when it starts with whitespace: look at those few closely.
    for i in np.flatnonzero(_WHITESPACE[raw[starts]]).tolist():
        if not block[starts[i]:starts[i] + lengths[i]].strip():
            return None
    try:
        records = _parse_lines(block)
    except (msgspec.DecodeError, ValueError):
        return None
    return records if len(records) == len(lengths) else None


def _jsonl_line(lineno: int, raw: bytes) -> Item | None:
    """One JSONL line: (where, record, None), (where, None, error), or None for a blank line."""
    raw = raw.rstrip(b"\r\n")
    where = f"line {lineno}"
    if len(raw) > MAX_RECORD_BYTES:
        return (where, None, f"{where}: record is {len(raw) / 1e6:.1f} MB, over the "
                             f"{MAX_RECORD_BYTES / 1e6:g} MB limit per record")
    if not raw.strip():
        return None
    nul = raw.find(b"\x00")
    if nul >= 0:
        return where, None, f"{where}: binary data (NUL byte at column {nul + 1})"
    text, error = _decode(raw, lineno)
    if error:
        return where, None, error
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        return where, None, f"{where}: not valid JSON: {exc.msg} at column {exc.colno}"
    return (where, *_checked(where, record))


def _read_json(path: Path) -> Iterator[Item]:
    data = path.read_bytes().removeprefix(_BOM)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise SourceError(
            f"{path}: line {line}: not valid UTF-8: byte 0x{data[exc.start]:02x} at column {column}"
        ) from None
    if not text.strip():
        raise SourceError(f"{path}: file is empty")
    try:
        records = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # one object per line under a .json name
            yield from _read_jsonl(path)
            return
        raise SourceError(
            f"{path}: line {exc.lineno}: not valid JSON: {exc.msg} at column {exc.colno}"
        ) from None
    if isinstance(records, dict):
        yield "record 1", *_checked("record 1", records)
        return
    if not isinstance(records, list):
        raise SourceError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
    for i, record in enumerate(records, 1):
        yield f"record {i}", *_checked(f"record {i}", record)


def _checked(where: str, record: Any) -> tuple[Any, str | None]:
    """(record, None), or (None, error) when its text holds an escaped lone surrogate
    ("\\ud800"): json.loads takes it, but it is no Unicode text and cannot be written."""
    try:
        msgspec.json.encode(record)
    except UnicodeEncodeError as exc:
        return None, (f"{where}: text holds an unpaired surrogate \\u{ord(exc.object[exc.start]):04x} "
                      "(a JSON escape that is not valid Unicode)")
    except (TypeError, ValueError):
        pass  # NaN or a huge number: the format checks name the field
    return record, None


def _read_csv(path: Path, delimiter: str) -> Iterator[Item]:
    bad_lines: dict[int, str] = {}

    def lines() -> Iterator[str]:
        with path.open("rb") as f:
            for lineno, raw in enumerate(f, 1):
                if lineno == 1:
                    raw = raw.removeprefix(_BOM)
                text, error = _decode(raw, lineno)
                if error:
                    bad_lines[lineno] = error
                    text = raw.decode("utf-8", errors="replace")
                yield text

    reader = csv.reader(lines(), delimiter=delimiter)
    try:
        header = next(reader)
    except StopIteration:
        raise SourceError(f"{path}: file is empty") from None
    if 1 in bad_lines:
        raise SourceError(f"{path}: {bad_lines[1]} (in the header)")
    start = reader.line_num + 1
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            yield f"line {start}", None, f"line {start}: not valid CSV: {exc}"
            start = reader.line_num + 1
            continue
        end = reader.line_num
        where = f"line {start}"
        errors = [bad_lines.pop(n) for n in range(start, end + 1) if n in bad_lines]
        if errors:
            yield where, None, errors[0]
        elif not any(cell.strip() for cell in row):
            pass  # blank line
        elif len(row) != len(header):
            yield where, None, f"{where}: has {len(row)} columns, the header has {len(header)}"
        else:
            yield where, dict(zip(header, row)), None
        start = end + 1


def _read_parquet(path: Path) -> Iterator[Item]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for a corrupt file
        raise SourceError(f"{path}: cannot read as Parquet: {exc}") from None
    row = 0
    for batch in parquet.iter_batches(batch_size=8192):
        for record in batch.to_pylist():
            row += 1
            yield f"row {row}", record, None


def _read_hub(source: str, split: str | None) -> Iterator[Item]:
    name = source.removeprefix("hf://").removeprefix("datasets/")
    try:
        import datasets
    except ImportError:
        raise SourceError(f"{source}: loading hub datasets needs the `datasets` package") from None
    try:
        dataset = datasets.load_dataset(name, split=split or "train")
    except Exception as exc:  # network, auth, missing split: all worth showing as they are
        raise SourceError(f"{source}: cannot load from the Hugging Face hub: {exc}") from None
    for row, record in enumerate(dataset, 1):
        yield f"row {row}", record, None


def is_tabular(source: str) -> bool:
    """CSV cells are strings; chat messages in them are JSON text to parse."""
    return not is_hub_source(source) and Path(source).suffix.lower() in (".csv", ".tsv")
