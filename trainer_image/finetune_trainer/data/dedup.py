"""Exact and near-duplicate detection, in batches of numpy arrays.

Both work on normalised text: case-folded, split into words on whitespace (so case and
spacing never make two records differ). Each word becomes a 64-bit hash, computed for a
whole batch of texts at once (from its UTF-8 bytes, eight at a time, vectorised with numpy);
no per-word Python object is made.

Exact duplicates share a 128-bit key of their word sequence. Near-duplicates are pairs whose
sets of word 3-gram shingles have a Jaccard similarity >= the threshold. rensa's MinHash +
LSH proposes candidate pairs over the whole dataset in bulk; only the few candidates are then
checked with the exact Jaccard similarity, so the result does not depend on MinHash
estimation noise. The first record of a group is kept.

`NearDuplicateIndex` takes the texts a batch at a time (the caller streams its records and
keeps nothing but the compact digest matrices here) and reads back only the candidates'
texts when it verifies them.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

NUM_PERM = 128
MINHASH_SEED = 42
# Digest matrices kept in memory between the two passes (the rest is hashed again).
KEEP_DIGEST_BYTES = 100 << 20
# Odd 64-bit multipliers that combine three word hashes into one shingle hash.
_MIX1 = np.uint64(0x9E3779B97F4A7C15)
_MIX2 = np.uint64(0xC2B2AE3D27D4EB4F)
# The polynomial hash of a text's word sequence (two bases: 128 bits).
_WORD_BASE1 = 0xFF51AFD7ED558CCD
_WORD_BASE2 = 0xC4CEB9FE1A85EC53
_MASK = (1 << 64) - 1
# Masks keeping the low 0..8 bytes of a 64-bit word.
_LOW_BYTES = np.array([(1 << (8 * n)) - 1 for n in range(9)], dtype=np.uint64)


class _Powers:
    """base**0, base**1, ... (mod 2**64), grown on demand and kept between batches."""

    def __init__(self, base: int) -> None:
        self.base = np.uint64(base)
        self.table = np.ones(1, dtype=np.uint64)

    def upto(self, n: int) -> np.ndarray:
        if len(self.table) < n + 1:
            size = max(n + 1, 2 * len(self.table))
            table = np.full(size, self.base, dtype=np.uint64)
            table[0] = 1
            self.table = np.cumprod(table, dtype=np.uint64)
        return self.table[:n + 1]


_WORD_POWERS1 = _Powers(_WORD_BASE1)
_WORD_POWERS2 = _Powers(_WORD_BASE2)


def _finalise(h: np.ndarray) -> np.ndarray:
    """Spread the bits of `h` (a 64-bit finaliser, in place)."""
    h ^= h >> np.uint64(33)
    h *= np.uint64(0xFF51AFD7ED558CCD)
    h ^= h >> np.uint64(33)
    h *= np.uint64(0xC4CEB9FE1A85EC53)
    h ^= h >> np.uint64(33)
    return h


# The ASCII bytes str.split() splits on map to 0, all others to 1.
_INSIDE_WORD = bytes(0 if b in (9, 10, 11, 12, 13, 28, 29, 30, 31, 32) else 1 for b in range(256))


def normalise(text: str) -> str:
    return " ".join(text.casefold().split())


def word_hashes(texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Hashes of each text's case-folded words, flat, with row offsets (len(texts)+1).

    The words are those of `text.casefold().split()`: equal words hash equal in every batch.
    """
    n = len(texts)
    joined = "\n".join(texts)
    if joined.isascii():  # casefold is lower() and the byte offsets are the str offsets
        data = joined.lower().encode("ascii")
        lengths = np.fromiter(map(len, texts), dtype=np.int64, count=n)
    else:  # only single spaces left between words, so the separator and spaces split
        normal = [normalise(t).encode("utf-8", "surrogatepass") for t in texts]
        data = b"\n".join(normal)
        lengths = np.fromiter(map(len, normal), dtype=np.int64, count=n)
    starts = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths + 1, out=starts[1:])
    # True inside a word, False on a space (bytes.translate: one quick pass in C), with a
    # space before and after.
    inside = np.frombuffer(b"\0" + data.translate(_INSIDE_WORD) + b"\0", dtype=bool)
    # Word edges alternate: a start, then its end.
    edges = np.flatnonzero(inside[1:] != inside[:-1])
    first = edges[0::2]
    hashes = _hash_spans(data, first, edges[1::2] - first)
    # Text i's words are those starting in [starts[i], starts[i+1]).
    offsets = np.searchsorted(first, starts).astype(np.int64)
    return hashes, offsets


def select_rows(flat: np.ndarray, offsets: np.ndarray, rows: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """The (flat, offsets) of word_hashes() for the given rows only."""
    rows = np.asarray(rows, dtype=np.int64)
    counts = np.diff(offsets)
    keep = np.zeros(len(counts), dtype=bool)
    keep[rows] = True
    chosen = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(counts[rows], out=chosen[1:])
    return flat[np.repeat(keep, counts)], chosen


def _hash_spans(data: bytes, first: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """A 64-bit hash of each byte span data[first:first+length], eight bytes at a time."""
    # The eight bytes at position p, read as one little-endian word (unaligned, stride 1).
    at_byte = np.ndarray((len(data),), dtype="<u8", buffer=data + bytes(8), strides=(1,))
    low = np.minimum(lengths, 8)
    chunk = at_byte[first]
    chunk &= _LOW_BYTES[low]
    hashes = _finalise((lengths.astype(np.uint64) * _MIX2 ^ chunk) * _MIX1)
    longer = np.flatnonzero(lengths > 8)  # words past their first eight bytes
    skip = 8
    while len(longer):
        at, left = first[longer] + skip, lengths[longer] - skip
        chunk = at_byte[at]
        chunk &= _LOW_BYTES[np.minimum(left, 8)]
        hashes[longer] = _finalise((hashes[longer] ^ chunk) * _MIX1)
        longer, skip = longer[left > 8], skip + 8
    return hashes


def exact_keys_of(hashes: np.ndarray, offsets: np.ndarray) -> list[int]:
    """A 128-bit key per text: two polynomial hashes of its word-hash sequence and its length."""
    n = len(offsets) - 1
    counts = np.diff(offsets)
    k1 = counts.astype(np.uint64) * _MIX1
    k2 = counts.astype(np.uint64) * _MIX2
    if len(hashes):
        row = np.repeat(np.arange(n), counts)
        position = np.arange(len(hashes), dtype=np.int64) - offsets[row]
        top = int(counts.max())
        filled = np.flatnonzero(counts)
        at = offsets[filled]
        k1[filled] += np.add.reduceat(hashes * _WORD_POWERS1.upto(top)[position], at)
        k2[filled] += np.add.reduceat((hashes ^ (hashes >> np.uint64(29))) *
                                      _WORD_POWERS2.upto(top)[position], at)
    k1, k2 = _finalise(k1), _finalise(k2)
    return [(a << 64) | b for a, b in zip(k1.tolist(), k2.tolist())]


def exact_keys(texts: Sequence[str]) -> list[int]:
    """The exact-duplicate key of each text (equal for texts equal after normalise())."""
    return exact_keys_of(*word_hashes(texts))


def lsh_rows_per_band(threshold: float, num_perm: int = NUM_PERM) -> int:
    """The most rows per band that still proposes a pair at `threshold` with p >= 0.995.

    More rows per band mean fewer candidates to verify; the bound keeps misses rare.
    """
    best = 1
    for rows in (1, 2, 4, 8, 16, 32):
        bands = num_perm // rows
        if 1 - (1 - threshold**rows) ** bands >= 0.995:
            best = rows
    return best


def shingle_hashes(texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Word 3-gram shingle hashes of each text, flat, with row offsets (len(texts)+1)."""
    flat, starts = word_hashes(texts)
    return _shingles(flat, starts)


def _shingles(flat: np.ndarray, starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n = len(starts) - 1
    lengths = np.diff(starts)
    # A shingle starting at i is valid when i + 2 is still inside the same text.
    row_end = np.repeat(starts[1:], lengths)
    position = np.arange(len(flat), dtype=np.int64)
    valid = position + 2 < row_end
    with np.errstate(over="ignore"):
        a, b, c = flat[:-2] * _MIX1, flat[1:-1] * _MIX2, flat[2:]
        shingles_all = (a ^ (a >> np.uint64(29))) + (b ^ (b >> np.uint64(31))) + c
    shingles = shingles_all[valid[:-2]]
    counts = np.maximum(lengths - 2, 0)
    # Texts shorter than three words are one shingle: the hash of their words together.
    short = np.flatnonzero(lengths < 3)
    offsets = np.zeros(n + 1, dtype=np.int64)
    if not len(short):
        np.cumsum(counts, out=offsets[1:])
        return shingles, offsets
    extra = np.array([hash_words(flat[starts[i]:starts[i + 1]].tolist()) for i in short],
                     dtype=np.uint64)
    counts = counts.copy()
    counts[short] = 1
    np.cumsum(counts, out=offsets[1:])
    merged = np.empty(int(offsets[-1]), dtype=np.uint64)
    mask = np.ones(len(merged), dtype=bool)
    mask[offsets[short]] = False
    merged[mask] = shingles
    merged[offsets[short]] = extra
    return merged, offsets


def hash_words(hashes: Sequence[int]) -> int:
    value = 0x243F6A8885A308D3
    for h in hashes:
        value = ((value ^ h) * 0x100000001B3) & _MASK
    return value


class NearDuplicateIndex:
    """Near-duplicate detection over texts given a batch at a time, in order.

    `add(texts)` hashes a batch into MinHash digests and indexes them, noting which records
    share an LSH band with an earlier one; nothing else is kept per record. `duplicates(read)`
    then finds the earlier partners of those records (a second hashing pass against a
    small index of them), verifies all these candidates with their exact Jaccard similarity
    and returns the positions of near-duplicates. `read(positions)` gives texts back by
    position (the caller keeps them on disk).
    """

    def __init__(self, threshold: float, work_dir: str | None = None,
                  keep_bytes: int | None = None) -> None:
        import rensa

        # The first batches' digest matrices stay in memory for the second pass, up to
        # keep_bytes (NUM_PERM * 4 bytes a record); later batches' shingle hashes wait on
        # disk instead (8 bytes a shingle) and are hashed again.
        self.shingle_file = tempfile.TemporaryFile(dir=work_dir)
        self.keep_bytes = KEEP_DIGEST_BYTES if keep_bytes is None else keep_bytes
        # (first position, its digest matrix, or its shingle count and offsets on disk)
        self.batches: list[tuple[int, Any, int, np.ndarray | None]] = []
        self.threshold = threshold
        self.rows = lsh_rows_per_band(threshold)
        self.bands = NUM_PERM // self.rows
        self.lsh = rensa.RMinHashLSH(threshold, NUM_PERM, self.bands)
        self.later: list[int] = []  # shares a band with an earlier record (or one in its batch)
        self.size = 0

    def add(self, texts: Sequence[str]) -> None:
        if texts:
            self.add_words(*word_hashes(texts))

    def add_words(self, flat: np.ndarray, offsets: np.ndarray) -> None:
        """Like add(), from word_hashes() the caller already has."""
        shingles, shingle_offsets = _shingles(flat, offsets)
        matrix = _digest_matrix(shingles, shingle_offsets)
        flags = self.lsh.insert_matrix_and_query_duplicate_flags(matrix, self.size)
        self.later.extend(np.flatnonzero(np.asarray(flags, dtype=bool)) + self.size)
        rows = len(offsets) - 1
        if self.keep_bytes >= rows * NUM_PERM * 4:
            self.keep_bytes -= rows * NUM_PERM * 4
            self.batches.append((self.size, matrix, 0, None))
        else:
            self.shingle_file.write(shingles.tobytes())
            self.batches.append((self.size, None, len(shingles), shingle_offsets))
        self.size += rows

    def duplicates(self, read: Callable[[list[int]], Sequence[str]],
                   batch: int = 4096) -> list[int]:
        import rensa

        del self.lsh
        if not self.later:
            self.close()
            return []
        # Every record that shares a band with another one shares it with one of `later`.
        flagged = rensa.RMinHashLSH(self.threshold, NUM_PERM, self.bands)
        for start in range(0, len(self.later), batch):
            chunk = self.later[start:start + batch]
            flagged.insert_matrix(_digests(*word_hashes(read(chunk))), start)
        candidates: list[int] = []
        self.shingle_file.seek(0)
        for start, matrix, count, offsets in self.batches:
            if matrix is None:
                shingles = np.frombuffer(self.shingle_file.read(8 * count), dtype=np.uint64)
                matrix = _digest_matrix(shingles, offsets)
            # one_shot: a band shared with any indexed key counts (query_duplicate_flags_matrix
            # wants two keys in the bucket, as if the queried rows were indexed themselves).
            flags = flagged.query_duplicate_flags_matrix_one_shot(matrix)
            candidates.extend((np.flatnonzero(np.asarray(flags, dtype=bool)) + start).tolist())
        del flagged
        self.close()
        return _verify(read, candidates, self.threshold, self.rows, batch)


    def close(self) -> None:
        self.shingle_file.close()
        self.batches.clear()


def _digests(flat: np.ndarray, offsets: np.ndarray):
    return _digest_matrix(*_shingles(flat, offsets))


def _digest_matrix(shingles: np.ndarray, offsets: np.ndarray):
    import rensa

    return rensa.RMinHash.digest_matrix_from_flat_token_hashes(
        shingles, offsets.astype(np.uint64), NUM_PERM, MINHASH_SEED)


def near_duplicates(texts: Sequence[str], threshold: float) -> list[bool]:
    """Flags for records that are near-duplicates of an earlier kept record."""
    n = len(texts)
    flags = [False] * n
    if threshold <= 0 or n < 2:
        return flags
    index = NearDuplicateIndex(threshold)
    for start in range(0, n, 4096):
        index.add(texts[start:start + 4096])
    for i in index.duplicates(lambda positions: [texts[i] for i in positions]):
        flags[i] = True
    return flags


def _verify(read: Callable[[list[int]], Sequence[str]], candidates: list[int], threshold: float,
            rows: int, batch: int) -> list[int]:
    """Greedy pass over the LSH candidates in order, checking exact Jaccard similarity;
    the positions of the candidates that are near-duplicates of an earlier kept one.

    Two candidates are compared when a band of their digests is equal; each candidate keeps
    only its sorted unique shingle hashes (a flat array) and one key per band.
    """
    bands = NUM_PERM // rows
    shingle_parts: list[np.ndarray] = []
    sizes = np.zeros(len(candidates), dtype=np.int64)
    band_parts: list[np.ndarray] = []
    import rensa

    for start in range(0, len(candidates), batch):
        flat, offsets = shingle_hashes(read(candidates[start:start + batch]))
        m = len(offsets) - 1
        digests = np.array(rensa.RMinHash.digest_matrix_from_flat_token_hashes(
            flat, offsets.astype(np.uint64), NUM_PERM, MINHASH_SEED).to_rows(), dtype=np.uint64)
        per_band = digests.reshape(m, bands, rows)
        keys = np.zeros((m, bands), dtype=np.uint64)
        for r in range(rows):
            keys = _finalise(keys * _MIX1 + per_band[:, :, r])
        keys ^= np.arange(bands, dtype=np.uint64) * _MIX2
        band_parts.append(keys)
        row = np.repeat(np.arange(m), np.diff(offsets))
        order = np.lexsort((flat, row))
        flat, row = flat[order], row[order]
        unique = np.ones(len(flat), dtype=bool)
        unique[1:] = (flat[1:] != flat[:-1]) | (row[1:] != row[:-1])
        shingle_parts.append(flat[unique])
        sizes[start:start + m] = np.bincount(row[unique], minlength=m)
    shingles = np.concatenate(shingle_parts) if shingle_parts else np.zeros(0, dtype=np.uint64)
    starts = np.zeros(len(candidates) + 1, dtype=np.int64)
    np.cumsum(sizes, out=starts[1:])
    band_keys = np.concatenate(band_parts) if band_parts else np.zeros((0, bands), dtype=np.uint64)
    pairs = _sharing_pairs(band_keys)
    if pairs is None:
        return _greedy_by_buckets(candidates, band_keys.tolist(), shingles, starts, threshold)
    # A candidate is a near-duplicate when an earlier candidate that is kept shares a band
    # with it and is similar enough; which one is found first does not matter.
    similar = _similar_pairs(shingles, starts, pairs, threshold)
    duplicate = bytearray(len(candidates))
    for (earlier, later), alike in zip(pairs.tolist(), similar):
        if alike and not duplicate[later] and not duplicate[earlier]:
            duplicate[later] = 1
    return [c for c, d in zip(candidates, duplicate) if d]


# Pairs are compared in bulk up to this many shingles together (8 bytes each, a few copies).
_BULK_SHINGLES = 1 << 22


def _similar_pairs(shingles: np.ndarray, starts: np.ndarray, pairs: np.ndarray,
                   threshold: float) -> list[bool]:
    """Whether the exact Jaccard similarity of each pair's shingle sets reaches `threshold`.

    Each candidate's shingles are sorted and unique, so (candidate, rank of the shingle
    among all of them) is one sorted key: a shingle of the later one of a pair is shared
    when (earlier, its rank) is a key."""
    sizes = np.diff(starts)
    values, rank = np.unique(shingles, return_inverse=True)
    span = np.int64(max(1, len(values)))
    key = np.repeat(np.arange(len(sizes), dtype=np.int64), sizes) * span + rank
    out: list[bool] = []
    step = max(1, _BULK_SHINGLES // max(1, int(sizes.max(initial=1))))
    for at in range(0, len(pairs), step):
        earlier, later = pairs[at:at + step, 0], pairs[at:at + step, 1]
        lengths = sizes[later]
        pair = np.repeat(np.arange(len(later), dtype=np.int64), lengths)
        # Positions of the later ones' shingles in `shingles`.
        position = np.repeat(starts[later] - np.cumsum(lengths) + lengths, lengths) + \
            np.arange(int(lengths.sum()), dtype=np.int64)
        wanted = earlier[pair] * span + rank[position]
        found = np.minimum(np.searchsorted(key, wanted), len(key) - 1)
        common = np.bincount(pair[key[found] == wanted], minlength=len(later))
        union = sizes[earlier] + lengths - common
        out.extend(((common > 0) & (common / np.maximum(union, 1) >= threshold)).tolist())
    return out


# More pairs than this many per candidate (huge buckets): compare by buckets instead.
_MAX_PAIRS_PER_CANDIDATE = 64


def _sharing_pairs(band_keys: np.ndarray) -> np.ndarray | None:
    """The (earlier, later) candidate pairs that share at least one band key, sorted by later
    then earlier, one row each; None when there are too many to list."""
    m, bands = band_keys.shape
    if m < 2:
        return np.zeros((0, 2), dtype=np.int64)
    keys = band_keys.reshape(-1)
    owner = np.repeat(np.arange(m, dtype=np.int64), bands)
    order = np.lexsort((owner, keys))
    keys, owner = keys[order], owner[order]
    same = keys[1:] == keys[:-1]
    # Runs of equal keys: every two members of a run make a pair.
    run_start = np.flatnonzero(np.r_[True, ~same])
    run_size = np.diff(np.r_[run_start, len(keys)])
    shared = run_size > 1
    run_start, run_size = run_start[shared], run_size[shared]
    if int((run_size * (run_size - 1) // 2).sum()) > _MAX_PAIRS_PER_CANDIDATE * m:
        return None
    firsts, seconds = [], []
    for size in np.unique(run_size).tolist():
        starts = run_start[run_size == size]
        a, b = np.triu_indices(size, 1)
        firsts.append(owner[starts[:, None] + a].reshape(-1))
        seconds.append(owner[starts[:, None] + b].reshape(-1))
    if not firsts:
        return np.zeros((0, 2), dtype=np.int64)
    earlier, later = np.concatenate(firsts), np.concatenate(seconds)
    # Within a run owners ascend, so earlier < later (a candidate repeats no key? it may:
    # two of its bands can hash alike; drop such self-pairs).
    keep = earlier != later
    code = np.unique(later[keep] * m + earlier[keep])
    return np.stack([code % m, code // m], axis=1)


def _similar(shingles: np.ndarray, starts: np.ndarray, i: int, k: int, threshold: float) -> bool:
    mine = shingles[starts[k]:starts[k + 1]]
    theirs = shingles[starts[i]:starts[i + 1]]
    common = len(np.intersect1d(mine, theirs, assume_unique=True))
    return bool(common) and common / (len(mine) + len(theirs) - common) >= threshold


def _greedy_by_buckets(candidates: list[int], band_keys: list[list[int]], shingles: np.ndarray,
                       starts: np.ndarray, threshold: float) -> list[int]:
    """Each candidate against the kept earlier candidates in its buckets, one bucket at a
    time (for huge buckets, where listing every sharing pair would not fit)."""
    buckets: dict[int, list[int]] = {}
    found: list[int] = []
    for k in range(len(candidates)):
        keys = band_keys[k]
        seen: set[int] = set()
        duplicate = False
        for key in keys:
            for other in buckets.get(key, ()):
                if other in seen:
                    continue
                seen.add(other)
                if _similar(shingles, starts, other, k, threshold):
                    duplicate = True
                    break
            if duplicate:
                break
        if duplicate:
            found.append(candidates[k])
        else:
            for key in keys:
                buckets.setdefault(key, []).append(k)
    return found
