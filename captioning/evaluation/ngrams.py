"""The numpy kernels under ``CiderD`` (``cider.py``): n-grams packed into uint64 keys, grouped and looked up.

- ``NgramTable``: a hash table from packed n-grams to float64 (``CiderD``: the idf), all lookups
  of a batch at once;
- ``runs``: each row's distinct keys and their counts (term frequencies), rows sorted first;
- ``offsets``, ``runs_at``: indices within and across blocks, for scattering and gathering ragged data;
- ``group_by_ngram``: entries sorted into groups of equal (row, n-gram), lower entries first;
- ``may_meet``: which (row, n-gram) pairs of one side may be among the other's, from a bitmap.

Keys are nonzero uint64 (0 pads). Everything is whole-array numpy: a call is a fixed number of
operations, whatever its size (``NgramTable.get``: one more per probe step). Shapes: S rows, W
keys per row, M entries, R groups, Q queries, K probes.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

FIBONACCI = np.uint64(0x9E3779B97F4A7C15)  # 2^64 / golden ratio: multiplicative hashing


class NgramTable:
    """A hash table from packed n-grams (distinct, nonzero uint64) to float64, in numpy arrays.

    Open addressing with linear probing: a key sits in its slot (the top bits of a
    multiplicative hash) or in the first free slot after it; 4N..8N slots, so at most a quarter
    are taken. A slot is two uint64 side by side, the key and the value's bits, so that a hit
    reads one cache line: SCST's lookups come right after other work, and most miss the CPU's
    caches. In front, a bitmap of the slots taken, 128 times smaller: most queries (SCST's are
    mostly n-grams of at most one training image) find their slot free there and read no
    more. The others probe for all of them at once, a few whole-batch gathers a step (1.2 steps
    on average; the last ones take a handful of queries). 64-128 bytes per key.
    """

    def __init__(self, keys: NDArray[np.uint64], values: NDArray[np.floating]) -> None:
        self.bits = keys.size.bit_length() + 2
        self.wrap = (2 << self.bits) - 2  # & wrap: an even index past the end comes back to the start
        self.slots = np.zeros(2 << self.bits, np.uint64)  # (2 * slots,) key, value bits; key 0: free
        self.values = self.slots.view(np.float64)
        at = 2 * self._slot(keys)  # (N,) where each key tries next, in self.slots
        pending = np.arange(keys.size)
        while pending.size:  # one probe for every key not placed yet
            here = at[pending]
            free = (self.slots[here] == 0).nonzero()[0]
            self.slots[here[free]] = keys[pending[free]]  # of keys that try the same free slot, one wins
            won = free[self.slots[here[free]] == keys[pending[free]]]
            self.values[here[won] + 1] = values[pending[won]]
            placed = np.zeros(pending.size, bool)
            placed[won] = True
            pending = pending[~placed]
            at[pending] = (at[pending] + 2) & self.wrap
        self.taken = np.packbits(self.slots[::2] != 0, bitorder="little")  # slot i: bit i % 8 of byte i // 8

    def _slot(self, keys: NDArray[np.uint64]) -> NDArray[np.intp]:
        return ((keys * FIBONACCI) >> np.uint64(64 - self.bits)).astype(np.intp)

    def get(self, keys: NDArray[np.uint64], default: float = 0.0) -> NDArray[np.float64]:
        """The value of each key (``default`` where absent): (Q,)."""
        slot = self._slot(keys)  # (Q,)
        out = np.empty(keys.size)
        out.fill(default)
        pending = ((self.taken[slot >> 3] >> (slot & 7)) & 1).nonzero()[0]  # the others are absent
        at = 2 * slot[pending]  # their keys in self.slots
        while pending.size:
            found = self.slots[at]
            hit = found == keys[pending]
            out[pending[hit]] = self.values[at[hit] + 1]
            on = ~hit & (found != 0)  # another key there: probe on
            pending, at = pending[on], (at[on] + 2) & self.wrap
        return out


def runs(rows: NDArray[np.uint64]) -> tuple[NDArray[np.int64], NDArray[np.uint64], NDArray[np.int64]]:
    """Each row's distinct nonzero keys and their counts: (row, key, count), in the rows' order.

    ``rows`` (S, W): equal keys side by side in each row (sorted rows, say), zeros anywhere.
    """
    S, W = rows.shape
    ordered = rows.ravel()  # (S * W,)
    boundary = np.empty(S * W + 1, bool)
    np.not_equal(ordered[1:], ordered[:-1], out=boundary[1:-1])
    boundary[: S * W : max(W, 1)], boundary[-1] = True, True
    nonzero = ordered != 0  # only the zeros' runs end at a nonzero key: none are left out below
    first = (boundary[:-1] & nonzero).nonzero()[0]  # (runs,)
    last = (boundary[1:] & nonzero).nonzero()[0]
    return first // max(W, 1), ordered[first], last - first + 1


def offsets(sizes: NDArray[np.int64]) -> NDArray[np.int64]:
    """0, 1, ..., sizes[0] - 1, 0, 1, ..., sizes[1] - 1, ...: each item's index in its block."""
    return np.arange(int(sizes.sum())) - (sizes.cumsum() - sizes).repeat(sizes)


def runs_at(starts: NDArray[np.int64], sizes: NDArray[np.int64]) -> NDArray[np.int64]:
    """starts[0], starts[0] + 1, ..., starts[0] + sizes[0] - 1, starts[1], ...: (sizes.sum(),)."""
    return np.arange(int(sizes.sum())) + (starts - (np.cumsum(sizes) - sizes)).repeat(sizes)


def group_by_ngram(
    key: NDArray[np.uint64], row: NDArray[np.int64], num_rows: int
) -> tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.int64]]:
    """Entries grouped by (row, n-gram), lower entries first in each group (candidates' first,
    when they come first), rows in order.

    Returns ``entry`` (M,), the entries in that order; ``start`` (R,), each group's first
    position; ``group`` (M,), the group of each entry (by entry, not position).

    How: each entry packed into a uint64, its row above a hash of its key above its index, and
    the M of them sorted at once. Keys of one row that share a hash (rare, unless M and the rows
    leave few bits to the hash) are sorted apart again.
    """
    M = key.size
    index_bits = max(M - 1, 0).bit_length()
    row_bits = max(num_rows - 1, 0).bit_length()
    if row_bits + index_bits > 63:
        raise ValueError(f"{M} entries in {num_rows} rows leave no bits to hash n-grams")
    index_mask = np.uint64((1 << index_bits) - 1)
    packed = (key * FIBONACCI) >> np.uint64(row_bits + index_bits) << np.uint64(index_bits)  # (M,)
    packed |= np.arange(M, dtype=np.uint64)
    if row_bits:
        packed |= row.astype(np.uint64) << np.uint64(64 - row_bits)
    packed.sort()
    entry = (packed & index_mask).astype(np.intp)
    hashed = packed >> np.uint64(index_bits)  # (row, hash) of each position
    new_hash = hashed[1:] != hashed[:-1]
    ordered_key = key[entry]
    new_group = np.empty(M + 1, bool)  # a group begins here: its key or (row, hash) differs; M: the end
    new_group[0], new_group[M] = True, True
    np.not_equal(ordered_key[1:], ordered_key[:-1], out=new_group[1:M])
    new_group[1:M] |= new_hash
    if np.count_nonzero(new_group[1:M]) > np.count_nonzero(new_hash):  # keys of a row share a hash
        hash_run = np.cumsum(np.append(True, new_hash))  # (M,)
        at = np.flatnonzero(np.isin(hash_run, hash_run[1:][new_group[1:M] & ~new_hash]))
        entry[at] = entry[at[np.lexsort((entry[at], key[entry[at]], hash_run[at]))]]  # by key there
        ordered_key = key[entry]
        np.not_equal(ordered_key[1:], ordered_key[:-1], out=new_group[1:M])
        new_group[1:M] |= new_hash
    bounds = new_group.nonzero()[0]  # (R + 1,)
    start = bounds[:-1]
    group = np.empty(M, np.intp)
    group[entry] = np.arange(start.size).repeat(bounds[1:] - bounds[:-1])
    return entry, start, group


_ROW_MIX = np.uint64(0xD6E8FEB86659FD93)  # odd: spreads row numbers over the hash's high bits


def may_meet(
    key: NDArray[np.uint64],
    row: NDArray[np.int64],
    probe_key: NDArray[np.uint64],
    probe_row: NDArray[np.int64],
    num_rows: int,
) -> NDArray[np.intp]:
    """The probes (K,) whose (row, key) pair may be among the entries': every one that is, and
    about 10% of the others (a bitmap of hashed pairs, 8+ bits per entry), ascending."""
    bits = max(10, (8 * key.size).bit_length())
    shift = np.uint64(64 - bits)
    row_mix = np.arange(num_rows, dtype=np.uint64) * _ROW_MIX  # (rows,)
    has = np.zeros(1 << bits, bool)
    has[(((key * FIBONACCI) ^ row_mix[row]) >> shift).astype(np.intp)] = True
    return has[(((probe_key * FIBONACCI) ^ row_mix[probe_row]) >> shift).astype(np.intp)].nonzero()[0]
