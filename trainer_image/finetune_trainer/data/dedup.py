"""Exact and near-duplicate detection.

Both work on normalised text: case-folded, whitespace collapsed. Near-duplicates are
pairs whose sets of word 3-gram shingles have a Jaccard similarity >= the threshold.
rensa's MinHash + LSH proposes candidate pairs over the whole dataset in bulk; only the
few candidates are then checked with the exact Jaccard similarity, so the result does
not depend on MinHash estimation noise. The first record of a group is kept.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Sequence

import numpy as np

NUM_PERM = 128
MINHASH_SEED = 42
_CHUNK = 50_000
# Odd 64-bit multipliers that combine three word hashes into one shingle hash.
_MIX1 = np.uint64(0x9E3779B97F4A7C15)
_MIX2 = np.uint64(0xC2B2AE3D27D4EB4F)


def normalise(text: str) -> str:
    return " ".join(text.casefold().split())


def exact_key(text: str) -> bytes:
    return hashlib.blake2b(normalise(text).encode("utf-8"), digest_size=16).digest()


def exact_duplicates(texts: Sequence[str], seen: set[bytes] | None = None) -> list[bool]:
    """Flags for records whose normalised text appeared earlier (or is in `seen`)."""
    seen = set() if seen is None else seen
    flags = []
    for text in texts:
        key = exact_key(text)
        flags.append(key in seen)
        seen.add(key)
    return flags


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


def _shingle_hashes(texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Word 3-gram shingle hashes of each text, flat, with row offsets (len(texts)+1)."""
    import rensa

    words = [t.casefold().split() for t in texts]
    hashed = rensa.RMinHash.hash_token_sets(words)
    lengths = np.fromiter((len(h) for h in hashed), dtype=np.int64, count=len(hashed))
    flat = np.fromiter(itertools.chain.from_iterable(hashed), dtype=np.uint64, count=int(lengths.sum()))
    starts = np.zeros(len(texts) + 1, dtype=np.int64)
    np.cumsum(lengths, out=starts[1:])
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
    if len(short):
        extra = np.array(
            [hash_words(hashed[i]) for i in short], dtype=np.uint64
        )
        counts = counts.copy()
        counts[short] = 1
        out_starts = np.zeros(len(texts) + 1, dtype=np.int64)
        np.cumsum(counts, out=out_starts[1:])
        merged = np.empty(int(out_starts[-1]), dtype=np.uint64)
        mask = np.ones(len(merged), dtype=bool)
        mask[out_starts[short]] = False
        merged[mask] = shingles
        merged[out_starts[short]] = extra
        return merged, out_starts
    offsets = np.zeros(len(texts) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    return shingles, offsets


def hash_words(hashes: Sequence[int]) -> int:
    value = 0x243F6A8885A308D3
    for h in hashes:
        value = ((value ^ h) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return value


def near_duplicates(texts: Sequence[str], threshold: float) -> list[bool]:
    """Flags for records that are near-duplicates of an earlier kept record."""
    import rensa

    n = len(texts)
    flags = [False] * n
    if threshold <= 0 or n < 2:
        return flags
    rows = lsh_rows_per_band(threshold)
    lsh = rensa.RMinHashLSH(threshold, NUM_PERM, NUM_PERM // rows)
    matrices = []
    for start in range(0, n, _CHUNK):
        flat, offsets = _shingle_hashes(texts[start:start + _CHUNK])
        matrix = rensa.RMinHash.digest_matrix_from_flat_token_hashes(
            flat, offsets.astype(np.uint64), NUM_PERM, MINHASH_SEED
        )
        lsh.insert_matrix(matrix, start)
        matrices.append(matrix)
    candidates: list[int] = []
    for index, matrix in enumerate(matrices):
        chunk_flags = lsh.query_duplicate_flags_matrix(matrix)
        candidates.extend(index * _CHUNK + i for i, f in enumerate(chunk_flags) if f)
    del matrices, lsh
    if not candidates:
        return flags
    return _verify(texts, candidates, threshold, rows, flags)


def _verify(texts: Sequence[str], candidates: list[int], threshold: float, rows: int,
            flags: list[bool]) -> list[bool]:
    """Greedy pass over the LSH candidates in order, checking exact Jaccard similarity."""
    import rensa

    flat, offsets = _shingle_hashes([texts[i] for i in candidates])
    digests = rensa.RMinHash.digest_matrix_from_flat_token_hashes(
        flat, offsets.astype(np.uint64), NUM_PERM, MINHASH_SEED
    ).to_rows()
    shingle_sets = [set(flat[offsets[k]:offsets[k + 1]].tolist()) for k in range(len(candidates))]
    buckets: dict[tuple, list[int]] = {}
    for k in range(len(candidates)):
        digest = digests[k]
        keys = [(b, *digest[b * rows:(b + 1) * rows]) for b in range(NUM_PERM // rows)]
        mine = shingle_sets[k]
        seen: set[int] = set()
        duplicate = False
        for key in keys:
            for other in buckets.get(key, ()):
                if other in seen:
                    continue
                seen.add(other)
                theirs = shingle_sets[other]
                common = len(mine & theirs)
                if common and common / (len(mine) + len(theirs) - common) >= threshold:
                    duplicate = True
                    break
            if duplicate:
                break
        if duplicate:
            flags[candidates[k]] = True
        else:
            for key in keys:
                buckets.setdefault(key, []).append(k)
    return flags
