"""Measure examples in tokens and apply the length policy (truncate or drop).

With a tokenizer (a `tokenizers.Tokenizer` or a transformers tokenizer) lengths are
real token counts of each part, without special tokens. Without one they are an
approximation: whitespace-separated words times APPROX_TOKENS_PER_WORD, since BPE
tokenizers make about four tokens of three English words (code and non-Latin scripts
make more: give a tokenizer when it matters).

Truncation cuts from the end, as the trainer would: the completion of a prompt/completion
record, the last messages of a chat. An example whose trainable part (completion, assistant
messages, text) is gone after truncation is removed: it would only add padding.

Chat records, when the model's chat template renders them (a `renderer`,
chat_templates.ChatRenderer), are measured as rendered: BOS, role headers, the date header,
tools and every end-of-turn token count. Truncation then keeps whole turns, up to the last
assistant turn that fits, so the trainer never cuts off an end-of-turn token; only a first
answer longer than the limit on its own is shortened, and rendered again with its end.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from .formats import Example

APPROX_TOKENS_PER_WORD = 4 / 3
# Tokens a chat template adds around each message (role header, end-of-turn marker).
CHAT_MESSAGE_OVERHEAD = 4
_BATCH = 4096
_WORD = re.compile(r"\S+")


class TokenCounter(Protocol):
    approximate: bool

    def count(self, texts: Sequence[str]) -> list[int]: ...

    def cut(self, text: str, tokens: int) -> str: ...

    def cut_start(self, text: str, tokens: int) -> str: ...


class WhitespaceCounter:
    approximate = True

    @staticmethod
    def _tokens(words: int) -> int:
        return int(words * APPROX_TOKENS_PER_WORD + 0.5)

    def count(self, texts: Sequence[str]) -> list[int]:
        tokens = self._tokens
        return [tokens(len(t.split())) for t in texts]

    def count_array(self, texts: Sequence[str]) -> np.ndarray:
        """count(), as an array, the words counted in bulk (word_counts)."""
        words = word_counts(texts)
        return (words * APPROX_TOKENS_PER_WORD + 0.5).astype(np.int64)

    def cut(self, text: str, tokens: int) -> str:
        words = int(tokens / APPROX_TOKENS_PER_WORD)
        while self._tokens(words + 1) <= tokens:
            words += 1
        if words <= 0:
            return ""
        end = 0
        for i, match in enumerate(_WORD.finditer(text), 1):
            end = match.end()
            if i == words:
                break
        return text[:end]

    def cut_start(self, text: str, tokens: int) -> str:
        """The last `tokens` tokens of `text` (a prompt keeps its end)."""
        words = int(tokens / APPROX_TOKENS_PER_WORD)
        while self._tokens(words + 1) <= tokens:
            words += 1
        if words <= 0:
            return ""
        starts = [m.start() for m in _WORD.finditer(text)]
        return text if len(starts) <= words else text[starts[-words]:]


class TokenizersCounter:
    """A `tokenizers.Tokenizer` (the fast tokenizer library itself)."""

    approximate = False

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def count(self, texts: Sequence[str]) -> list[int]:
        out: list[int] = []
        for start in range(0, len(texts), _BATCH):
            batch = list(texts[start:start + _BATCH])
            encodings = self.tokenizer.encode_batch(batch, add_special_tokens=False)
            out.extend(len(e.ids) for e in encodings)
        return out

    def cut(self, text: str, tokens: int) -> str:
        if tokens <= 0:
            return ""
        offsets = self.tokenizer.encode(text, add_special_tokens=False).offsets
        if len(offsets) <= tokens:
            return text
        return text[:offsets[tokens - 1][1]]

    def cut_start(self, text: str, tokens: int) -> str:
        if tokens <= 0:
            return ""
        offsets = self.tokenizer.encode(text, add_special_tokens=False).offsets
        return text if len(offsets) <= tokens else text[offsets[-tokens][0]:]


class TransformersCounter:
    """A transformers tokenizer (`AutoTokenizer.from_pretrained(...)`)."""

    approximate = False

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def count(self, texts: Sequence[str]) -> list[int]:
        out: list[int] = []
        for start in range(0, len(texts), _BATCH):
            batch = list(texts[start:start + _BATCH])
            ids = self.tokenizer(batch, add_special_tokens=False)["input_ids"]
            out.extend(len(i) for i in ids)
        return out

    def cut(self, text: str, tokens: int) -> str:
        if tokens <= 0:
            return ""
        if getattr(self.tokenizer, "is_fast", False):
            offsets = self.tokenizer(
                text, add_special_tokens=False, return_offsets_mapping=True
            )["offset_mapping"]
            return text if len(offsets) <= tokens else text[:offsets[tokens - 1][1]]
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return text if len(ids) <= tokens else self.tokenizer.decode(ids[:tokens])

    def cut_start(self, text: str, tokens: int) -> str:
        if tokens <= 0:
            return ""
        if getattr(self.tokenizer, "is_fast", False):
            offsets = self.tokenizer(
                text, add_special_tokens=False, return_offsets_mapping=True
            )["offset_mapping"]
            return text if len(offsets) <= tokens else text[offsets[-tokens][0]:]
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return text if len(ids) <= tokens else self.tokenizer.decode(ids[-tokens:])


# The ASCII bytes str.split() splits on map to 0, all others to 1.
_INSIDE_WORD = bytes(0 if b in (9, 10, 11, 12, 13, 28, 29, 30, 31, 32) else 1 for b in range(256))


def word_counts(texts: Sequence[str]) -> np.ndarray:
    """len(text.split()) of each text: ASCII texts together (a word starts where a space
    is followed by a non-space), the others one by one."""
    n = len(texts)
    joined = "\n".join(texts)
    if not joined.isascii():
        return np.fromiter(map(len, map(str.split, texts)), dtype=np.int64, count=n)
    data = joined.encode("ascii")
    inside = np.frombuffer(b"\0" + data.translate(_INSIDE_WORD), dtype=bool)
    word_starts = np.flatnonzero(inside[1:] & ~inside[:-1])
    starts = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.fromiter(map(len, texts), dtype=np.int64, count=n) + 1, out=starts[1:])
    return np.diff(np.searchsorted(word_starts, starts))


def make_counter(tokenizer: Any = None) -> TokenCounter:
    if tokenizer is None:
        return WhitespaceCounter()
    if hasattr(tokenizer, "encode_batch") and hasattr(tokenizer, "get_vocab_size"):
        return TokenizersCounter(tokenizer)
    return TransformersCounter(tokenizer)


def _segments(record: dict) -> list[tuple[str, bool]]:
    """(text, trainable) parts of a converted record."""
    if "messages" in record:
        return [(m["content"], m["role"] == "assistant") for m in record["messages"]]
    if "completion" in record:
        return [(record["prompt"], False), (record["completion"], True)]
    return [(record["text"], True)]


@dataclass
class LengthResult:
    kept: list[Example] = field(default_factory=list)
    truncated: int = 0
    dropped_too_long: int = 0
    dropped_no_trainable: int = 0
    # (where, length) of each record over the limit, truncated or dropped: the report names them.
    too_long: list[tuple[str, int]] = field(default_factory=list)


def _measure(parts: list[tuple[str, bool]], counts: list[int], chat: bool) -> tuple[int, int]:
    overhead = CHAT_MESSAGE_OVERHEAD if chat else 0
    total = sum(counts) + overhead * len(parts)
    trainable = sum(c for (_, t), c in zip(parts, counts) if t)
    return total, trainable


def _truncate(record: dict, counts: list[int], counter: TokenCounter,
              max_len: int) -> dict | None:
    """The record cut to `max_len` tokens, or None when nothing trainable is left."""
    if "messages" in record:
        budget = max_len
        kept: list[dict] = []
        for message, count in zip(record["messages"], counts):
            need = count + CHAT_MESSAGE_OVERHEAD
            if need <= budget:
                kept.append(message)
                budget -= need
                continue
            room = budget - CHAT_MESSAGE_OVERHEAD
            if message["role"] == "assistant" and room > 0:
                content = counter.cut(message["content"], room)
                if content.strip():
                    kept.append({**message, "content": content})
            break
        while kept and kept[-1]["role"] != "assistant":
            kept.pop()
        if not kept:
            return None
        return {**record, "messages": kept}
    if "completion" in record:
        room = max_len - counts[0]
        completion = counter.cut(record["completion"], room) if room > 0 else ""
        if not completion.strip():
            return None
        return {**record, "completion": completion}
    text = counter.cut(record["text"], max_len)
    return {"text": text} if text.strip() else None


def _texts(part: str | list[dict]) -> list[str]:
    return [part] if isinstance(part, str) else [m["content"] for m in part]


def _size(counts: list[int], part: str | list[dict]) -> int:
    return sum(counts) + (0 if isinstance(part, str) else CHAT_MESSAGE_OVERHEAD * len(part))


def _keep_end(part: str | list[dict], counter: TokenCounter, budget: int) -> str | list[dict] | None:
    """A prompt cut to `budget` tokens, keeping its end: a string loses its beginning; a
    message list loses its oldest messages after the system message, then the beginning of
    the oldest message left. None when nothing is left."""
    if isinstance(part, str):
        cut = counter.cut_start(part, budget)
        return cut if cut.strip() else None
    system = [m for m in part[:1] if m["role"] == "system"]
    rest = part[len(system):]
    while True:
        kept = system + rest
        size = _size(counter.count(_texts(kept)), kept)
        if size <= budget:
            return kept if rest else None
        if len(rest) > 1:
            rest = rest[1:]
            continue
        if system:  # the system message goes before the question does
            system = []
            continue
        room = budget - CHAT_MESSAGE_OVERHEAD
        content = counter.cut_start(rest[0]["content"], room) if room > 0 else ""
        return [{**rest[0], "content": content}] if content.strip() else None


def _keep_start(part: str | list[dict], counter: TokenCounter, budget: int) -> str | list[dict] | None:
    """An answer cut to `budget` tokens, keeping its beginning; None when nothing is left."""
    if isinstance(part, str):
        cut = counter.cut(part, budget)
        return cut if cut.strip() else None
    kept: list[dict] = []
    for message, count in zip(part, counter.count(_texts(part))):
        room = budget - CHAT_MESSAGE_OVERHEAD
        if count <= room:
            kept.append(message)
            budget -= count + CHAT_MESSAGE_OVERHEAD
            continue
        content = counter.cut(message["content"], room) if room > 0 else ""
        if content.strip():
            kept.append({**message, "content": content})
        break
    return kept or None


def _pair_length(record: dict, counter: TokenCounter, max_len: int, policy: str,
                 max_prompt: int | None, max_completion: int | None, result: LengthResult) -> dict | None:
    """A preference pair with DPO's prompt/completion limits applied, then the length policy
    (a pair's length: its prompt plus the longer answer). None: the pair is removed."""
    parts = {k: record[k] for k in ("prompt", "chosen", "rejected")}
    counts = counter.count([t for k in parts for t in _texts(parts[k])])
    sizes, at = {}, 0
    for key, part in parts.items():
        n = len(_texts(part))
        sizes[key] = _size(counts[at:at + n], part)
        at += n
    changed = False
    if max_prompt and sizes["prompt"] > max_prompt:
        parts["prompt"] = _keep_end(parts["prompt"], counter, max_prompt)
        changed = True
    if max_completion:
        for key in ("chosen", "rejected"):
            if sizes[key] > max_completion:
                parts[key] = _keep_start(parts[key], counter, max_completion)
                changed = True
    if any(part is None for part in parts.values()):
        result.dropped_no_trainable += 1
        return None
    if changed:
        sizes = {k: _size(counter.count(_texts(v)), v) for k, v in parts.items()}
    total = sizes["prompt"] + max(sizes["chosen"], sizes["rejected"])
    if total > max_len:
        if policy == "drop":
            result.dropped_too_long += 1
            return None
        room = max_len - sizes["prompt"]
        for key in ("chosen", "rejected"):
            if sizes[key] > room:
                parts[key] = _keep_start(parts[key], counter, room) if room > 0 else None
        if parts["chosen"] is None or parts["rejected"] is None:
            result.dropped_no_trainable += 1
            return None
        sizes = {k: _size(counter.count(_texts(v)), v) for k, v in parts.items()}
        total = sizes["prompt"] + max(sizes["chosen"], sizes["rejected"])
        changed = True
    if changed:
        result.truncated += 1
    return {**record, **parts, "_tokens": total}


def _template_truncate(record: dict, renderer: Any, counter: TokenCounter,
                       max_len: int) -> tuple[dict | None, int]:
    """A chat record cut to `max_len` rendered tokens: the longest run of whole turns that
    ends with an assistant turn, else the first answer shortened. (None, 0): nothing fits."""
    from ..chat_templates import TemplateError

    messages = record["messages"]
    for end in range(len(messages) - 1, 0, -1):
        if messages[end - 1]["role"] != "assistant":
            continue
        candidate = {**record, "messages": messages[:end]}
        try:
            tokens = renderer.count(candidate)
        except TemplateError:
            continue
        if tokens <= max_len:
            return candidate, tokens
    first = next((i for i, m in enumerate(messages) if m["role"] == "assistant"), None)
    if first is None:
        return None, 0
    content = messages[first]["content"]
    for _ in range(4):  # a cut can change how the rest tokenizes: measure again
        candidate = {**record, "messages": messages[:first] + [{**messages[first], "content": content}]}
        try:
            tokens = renderer.count(candidate)
        except TemplateError:
            return None, 0
        if tokens <= max_len:
            return candidate, tokens
        keep = counter.count([content])[0] - (tokens - max_len)
        content = counter.cut(content, keep) if keep > 0 else ""
        if not content.strip():
            return None, 0
    return None, 0


def _template_length(example: Example, renderer: Any, counter: TokenCounter, max_len: int,
                     policy: str, result: LengthResult) -> None:
    total = example.rendered_tokens
    if total is None:
        total = renderer.count(example.record)
    if total > max_len:
        result.too_long.append((example.where, total))
        if policy == "drop":
            result.dropped_too_long += 1
            return
        record, total = _template_truncate(example.record, renderer, counter, max_len)
        if record is None:
            result.dropped_no_trainable += 1
            return
        example.record = record
        result.truncated += 1
    example.tokens = total
    result.kept.append(example)


def apply_length_policy(examples: list[Example], counter: TokenCounter, max_len: int,
                        policy: str, *, max_prompt_length: int | None = None,
                        max_completion_length: int | None = None,
                        renderer: Any = None) -> LengthResult:
    """`renderer` (chat_templates.ChatRenderer): chat records are measured as rendered."""
    result = LengthResult()
    if examples and "chosen" in examples[0].record:
        for example in examples:
            record = _pair_length(example.record, counter, max_len, policy, max_prompt_length,
                                  max_completion_length, result)
            if record is not None:
                example.tokens = record.pop("_tokens")
                example.record = record
                result.kept.append(example)
        return result
    def templated(example: Example) -> bool:
        return renderer is not None and "messages" in example.record

    parts_per_example = [[] if templated(e) else _segments(e.record) for e in examples]
    counts_flat = counter.count([text for parts in parts_per_example for text, _ in parts])
    position = 0
    for example, parts in zip(examples, parts_per_example):
        if templated(example):
            _template_length(example, renderer, counter, max_len, policy, result)
            continue
        counts = counts_flat[position:position + len(parts)]
        position += len(parts)
        chat = "messages" in example.record
        total, trainable = _measure(parts, counts, chat)
        if total > max_len:
            result.too_long.append((example.where, total))
            if policy == "drop":
                result.dropped_too_long += 1
                continue
            record = _truncate(example.record, counts, counter, max_len)
            if record is None:
                result.dropped_no_trainable += 1
                continue
            example.record = record
            new_parts = _segments(record)
            total, trainable = _measure(new_parts, counter.count([t for t, _ in new_parts]), chat)
            result.truncated += 1
        if trainable == 0:
            result.dropped_no_trainable += 1
            continue
        example.tokens = total
        result.kept.append(example)
    return result


def measure_block(records: list[dict], counter: TokenCounter, *, renderer: Any = None,
                  rendered_tokens: Sequence[int | None] | None = None
                  ) -> tuple[np.ndarray, np.ndarray] | None:
    """The (total, trainable) tokens apply_length_policy finds for each record before it
    truncates anything, in bulk; None for preference pairs (their DPO limits need the
    whole pair). A record measured by its chat template counts as trainable (1)."""
    n = len(records)
    if n and any("chosen" in r for r in records):
        return None
    count = getattr(counter, "count_array", None) or (
        lambda texts: np.asarray(counter.count(texts), dtype=np.int64).reshape(-1))
    total = np.zeros(n, dtype=np.int64)
    trainable = np.zeros(n, dtype=np.int64)
    templated = [renderer is not None and "messages" in r for r in records]
    if any(templated):
        for i in [i for i, t in enumerate(templated) if t]:
            tokens = rendered_tokens[i] if rendered_tokens is not None else None
            total[i] = renderer.count(records[i]) if tokens is None else tokens
            trainable[i] = 1
        plain = [i for i, t in enumerate(templated) if not t]
    else:
        plain = None
    chosen = records if plain is None else [records[i] for i in plain]
    if not chosen:
        return total, trainable
    if all("completion" in r and "messages" not in r for r in chosen):
        prompt = count([r["prompt"] for r in chosen])
        answer = count([r["completion"] for r in chosen])
        sums, learned = prompt + answer, answer
    elif all("messages" not in r and "completion" not in r for r in chosen):
        sums = learned = count([r["text"] for r in chosen])
    else:
        parts = [_segments(r) for r in chosen]
        sizes = np.fromiter(map(len, parts), dtype=np.int64, count=len(parts))
        counts = count([text for p in parts for text, _ in p])
        learns = np.fromiter((t for p in parts for _, t in p), dtype=bool, count=len(counts))
        owner = np.repeat(np.arange(len(parts)), sizes)
        sums = np.bincount(owner, weights=counts, minlength=len(parts)).astype(np.int64)
        learned = np.bincount(owner[learns], weights=counts[learns],
                              minlength=len(parts)).astype(np.int64)
        chat = np.fromiter(("messages" in r for r in chosen), dtype=bool, count=len(chosen))
        sums += np.where(chat, CHAT_MESSAGE_OVERHEAD * sizes, 0)
    if plain is None:
        return sums, learned
    total[plain] = sums
    trainable[plain] = learned
    return total, trainable


def percentiles(lengths: Sequence[int]) -> dict[str, int]:
    """Nearest-rank p50/p90/p99/max; zeros for no data."""
    if not lengths:
        return {"p50": 0, "p90": 0, "p99": 0, "max": 0}
    ordered = sorted(lengths)
    n = len(ordered)

    def rank(p: float) -> int:
        return ordered[min(n - 1, max(0, -(-int(p * n) // 100) - 1))]

    return {"p50": rank(50), "p90": rank(90), "p99": rank(99), "max": ordered[-1]}
