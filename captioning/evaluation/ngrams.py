"""The numpy kernels under ``CiderD`` (``cider.py``): n-grams packed into uint64 keys, grouped and looked up.

- ``NgramTable``: a hash table from packed n-grams to float64 (the document frequencies), all lookups
  of a batch at once;
- ``runs``: each row's distinct keys and their counts (term frequencies) from one row-wise sort;
- ``offsets``: each item's index within its block, for scattering ragged data into padded arrays;
- ``group_by_ngram``: the entries of each row sorted into groups of equal n-grams, candidates first.

Keys are distinct nonzero uint64 (0 pads). Shapes: S rows, W keys per row, M entries, R groups, Q
queries.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

FIBONACCI = np.uint64(0x9E3779B97F4A7C15)  # 2^64 / golden ratio: multiplicative hashing


class NgramTable:
    """A hash table from packed n-grams (distinct, nonzero uint64) to float64, in numpy arrays.

    The keys sorted by bucket (a multiplicative hash into 2N..4N buckets) and each bucket's start:
    a lookup walks its bucket (at most ``width`` keys, about 5) for all queries at once, dropping
    the ones found or exhausted at each step. 32-48 bytes per key.
    """

    def __init__(self, keys: NDArray[np.uint64], values: NDArray[np.floating]) -> None:
        self.bits = keys.size.bit_length() + 1
        bucket = self._hash(keys)
        order = np.argsort(bucket, kind="stable")
        self.start = np.searchsorted(bucket[order], np.arange((1 << self.bits) + 1)).astype(np.int32)
        self.width = int(np.diff(self.start).max())
        self.keys, self.values = keys[order], values[order]

    def _hash(self, keys: NDArray[np.uint64]) -> NDArray[np.intp]:
        return ((keys * FIBONACCI) >> np.uint64(64 - self.bits)).astype(np.intp)

    def get(self, keys: NDArray[np.uint64], default: float = 0.0) -> NDArray[np.float64]:
        """The value of each key (``default`` where absent)."""
        bucket = self._hash(keys)
        first = self.start[bucket]  # (Q,)
        size = self.start[bucket + 1] - first
        out = np.full(keys.size, default)
        pending = np.flatnonzero(size)  # most absent keys land in an empty bucket
        for i in range(self.width):  # the i-th key of each pending query's bucket
            at = first[pending] + i
            hit = self.keys[at] == keys[pending]
            out[pending[hit]] = self.values[at[hit]]
            pending = pending[~hit & (size[pending] > i + 1)]
        return out


def runs(rows: NDArray[np.uint64]) -> tuple[NDArray[np.int64], NDArray[np.uint64], NDArray[np.int64]]:
    """Each row's distinct nonzero keys and their counts: (row, key, count), sorted by (row, key)."""
    S, W = rows.shape
    if W == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.uint64), np.zeros(0, np.int64)
    ordered = np.sort(rows, axis=1)  # (S, W)
    starts = np.ones((S, W), bool)  # a new key begins here; column 0 keeps runs inside rows
    starts[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    first = np.flatnonzero(starts)  # (runs,)
    count = np.diff(first, append=ordered.size)
    key = ordered.ravel()[first]
    keep = key != 0
    return first[keep] // W, key[keep], count[keep]


def offsets(sizes: NDArray[np.int64]) -> NDArray[np.int64]:
    """0, 1, ..., sizes[0] - 1, 0, 1, ..., sizes[1] - 1, ...: each item's index in its block."""
    return np.arange(int(sizes.sum())) - np.repeat(np.cumsum(sizes) - sizes, sizes)


def group_by_ngram(
    key: NDArray[np.uint64], row: NDArray[np.int64], is_ref: NDArray[np.bool_], num_rows: int
) -> tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.int64]]:
    """Entries grouped by (row, n-gram), candidates' entries before references' in each group.

    Returns ``entry`` (M,), the entries in that order; ``group`` (M,), the group of each position;
    ``start`` (R,), each group's first position.

    How: each entry is packed into a uint64, a hash of its key above a reference bit above its
    index + 1 (0 pads); each row's packed entries sorted, a (rows, width) sort of short rows,
    leave equal hashes side by side. Should two keys of one row share a hash, it is done again
    with another multiplier.
    """
    M = key.size
    index_bits = M.bit_length()  # entry + 1 <= M fits
    ref_bit = np.uint64(1 << index_bits)
    shift = np.uint64(index_bits + 1)
    by_row = np.argsort(row.astype(np.int16), kind="stable")  # int16 (rows < 2^15): radix sort
    sizes = np.bincount(row, minlength=num_rows)  # (rows,)
    ordered_row = np.repeat(np.arange(num_rows), sizes)  # (M,)
    width = int(sizes.max(initial=0))
    slot = ordered_row * width + offsets(sizes)  # in the flattened table, for entry by_row[i]
    for attempt in range(8):
        multiplier = np.uint64((int(FIBONACCI) + 2 * attempt * 0x632BE59BD9B4E019) % 2**64)  # odd
        packed = (key * multiplier) >> shift << shift
        packed |= np.arange(1, M + 1, dtype=np.uint64)
        packed[is_ref] |= ref_bit
        table = np.zeros((num_rows, width), np.uint64)  # (rows, width)
        table.ravel()[slot] = packed[by_row]
        table.sort(axis=1)
        ordered = table[table != 0]  # (M,) row by row, padding dropped
        hashed = ordered >> shift
        new_group = np.ones(M, bool)
        new_group[1:] = (hashed[1:] != hashed[:-1]) | (ordered_row[1:] != ordered_row[:-1])
        entry = (ordered & (ref_bit - np.uint64(1))).astype(np.int64) - 1
        ordered_key = key[entry]
        if not np.any((ordered_key[1:] != ordered_key[:-1]) & ~new_group[1:]):  # no collision
            return entry, np.cumsum(new_group) - 1, np.flatnonzero(new_group)
    raise RuntimeError("n-gram hashes collide under 8 multipliers")  # each: odds ~1e-9 per row
