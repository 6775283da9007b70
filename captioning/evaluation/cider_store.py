"""Where ``CiderD`` (``cider.py``) keeps vectorised reference sets: prepared for good, or cached by key.

A reference set is one image's references as CIDEr-D needs them: each reference's n-grams with
their term frequencies and idf, its norms per order and its length (``RefSets``, G sets side by
side). ``RefSetStore`` keeps them by key (an image id):

- prepared (``CiderD.prepare``: SCST's whole training split, once per stage): two record arrays
  for all sets, with no Python object per set, never evicted; a set's entries are one run of
  memory, so a batch's sets are gathered with a memcpy each;
- cached: the sets of keys not prepared, the ``cache_size`` newest, as ``RefSets`` of one set.

``PreparedSize`` and ``estimate_prepared_bytes`` tell what the prepared sets cost (SCST logs it,
and checks COCO's before preparing it). Shapes: G sets, M n-gram entries, R references, n orders.
"""

from __future__ import annotations

import sys
from collections.abc import Hashable, Sequence
from typing import NamedTuple

import numpy as np
from numpy.typing import NDArray


class RefSets(NamedTuple):
    """G images' reference sets, scored and ready, side by side: their M n-gram entries, set by
    set (within a set, by reference then n-gram), and their R references, set by set."""

    ref: NDArray[np.int32]  # (M,) the entry's reference within its set, 0..J-1
    key: NDArray[np.uint64]  # (M,) an n-gram of that reference
    tf: NDArray[np.int32]  # (M,)
    idf: NDArray[np.float64]  # (M,)
    norm: NDArray[np.float64]  # (R, n) |v_k| per order
    length: NDArray[np.int64]  # (R,)
    num_entries: NDArray[np.int64]  # (G,) per set
    num_refs: NDArray[np.int64]  # (G,) J per set

    @staticmethod
    def empty(n: int) -> RefSets:
        """No sets."""
        none = np.zeros(0, np.int64)
        return RefSets(np.zeros(0, np.int32), np.zeros(0, np.uint64), np.zeros(0, np.int32), np.zeros(0),
                       np.zeros((0, n)), none, none, none)  # fmt: skip

    @staticmethod
    def concat(parts: Sequence[RefSets], n: int) -> RefSets:
        """The sets of ``parts``, in order (nothing copied for one part)."""
        if len(parts) == 1:
            return parts[0]
        if not parts:
            return RefSets.empty(n)
        return RefSets(*(np.concatenate(arrays) for arrays in zip(*parts, strict=True)))

    def split(self) -> list[RefSets]:
        """One per set: views of these arrays."""
        entry_ends, ref_ends = np.cumsum(self.num_entries).tolist(), np.cumsum(self.num_refs).tolist()
        bounds = zip([0, *entry_ends[:-1]], entry_ends, [0, *ref_ends[:-1]], ref_ends, strict=True)
        sets = []
        for g, (a, b, f, j) in enumerate(bounds):
            e, r, one = slice(a, b), slice(f, j), slice(g, g + 1)
            sets.append(RefSets(self.ref[e], self.key[e], self.tf[e], self.idf[e], self.norm[r],
                                self.length[r], self.num_entries[one], self.num_refs[one]))  # fmt: skip
        return sets


class PreparedSize(NamedTuple):
    """What ``CiderD.prepare`` keeps: reference sets, their n-gram entries, and bytes.

    ``entry_bytes``: the per-entry arrays (key, tf, idf, reference index: 24 bytes an entry);
    ``set_bytes``: the rest, which grows with the sets: their per-reference arrays (norms,
    lengths: 40 bytes a reference), two offsets per set and its slot in the store's dict (with
    the int it holds). Not counted: the keys themselves, which the caller holds anyway.
    """

    sets: int
    entries: int
    entry_bytes: int
    set_bytes: int

    @property
    def nbytes(self) -> int:
        return self.entry_bytes + self.set_bytes


def estimate_prepared_bytes(
    measured: PreparedSize,
    num_images: int = 113_287,
    refs_per_image: float = 5.0,
    words_per_ref: float = 10.5,
    n: int = 4,
) -> float:
    """Bytes ``prepare`` would keep for another corpus, scaled from a measured one.

    Defaults: COCO's Karpathy train split (113,287 images, 5 references each, about 10.5 words
    on average). Assumes the measured bytes per entry and per set (at about as many references
    per set) carry over, and takes as many entries per reference as it has n-gram windows,
    sum over k = 1..n of max(0, words - k + 1): an upper bound, since an n-gram that a
    reference repeats is one entry (a few percent of them in real captions).
    """
    if measured.sets == 0 or measured.entries == 0:
        raise ValueError("nothing prepared to scale from")
    entries = num_images * refs_per_image * sum(max(0.0, words_per_ref - k + 1) for k in range(1, n + 1))
    per_entry, per_set = measured.entry_bytes / measured.entries, measured.set_bytes / measured.sets
    return entries * per_entry + num_images * per_set


def _copy_runs(
    records: NDArray[np.void], starts: NDArray[np.int64], sizes: NDArray[np.int64]
) -> NDArray[np.void]:
    """``records[starts[i]:starts[i] + sizes[i]]`` for each i, side by side: (sizes.sum(),).

    Copied as uint64 words, a slice each (the records are 8-byte fields): numpy copies records
    field by field, and gathers them (take) one by one, both several times slower.
    """
    words, width = records.view(np.uint64), records.itemsize // 8
    bounds = zip((width * starts).tolist(), (width * (starts + sizes)).tolist(), strict=True)
    return np.concatenate([words[:0], *(words[a:b] for a, b in bounds)]).view(records.dtype)


class RefSetStore:
    """Reference sets by key: prepared ones for good, others in a cache of the ``cache_size`` newest.

    Prepared set i (``index[key]``) holds entries ``entry_start[i]:entry_start[i + 1]`` of
    ``entries`` (key, idf, tf, reference: 24 bytes, side by side so that a set is one run of
    memory) and references ``ref_start[i]:ref_start[i + 1]`` of ``refs`` (norms, length); past
    the last set, the arrays may have room for more (``reserve``).
    """

    def __init__(self, n: int, cache_size: int) -> None:
        self.n, self.cache_size = n, cache_size
        self.cache: dict[Hashable, RefSets] = {}  # key -> its one set, oldest first
        self.index: dict[Hashable, int] = {}  # key -> prepared set number
        self.entries = np.zeros(
            0, [("key", np.uint64), ("idf", np.float64), ("tf", np.int32), ("ref", np.int32)]
        )
        self.refs = np.zeros(0, [("norm", np.float64, (n,)), ("length", np.int64)])
        self.entry_start = np.zeros(1, np.int64)  # (sets + 1,)
        self.ref_start = np.zeros(1, np.int64)

    # --- prepared ------------------------------------------------------------------------------------

    def reserve(self, num_entries: int, num_refs: int) -> None:
        """Room for that many more entries and references: one copy of what is there (if anything)."""
        M, R = int(self.entry_start[-1]), int(self.ref_start[-1])
        entries, refs = np.zeros(M + num_entries, self.entries.dtype), np.zeros(R + num_refs, self.refs.dtype)
        entries[:M], refs[:R] = self.entries[:M], self.refs[:R]
        self.entries, self.refs = entries, refs

    def prepare(self, keys: list[Hashable], made: RefSets) -> None:
        """Keep the sets of ``made`` (within the room reserved) under ``keys``, one key each, for good."""
        M, R = int(self.entry_start[-1]), int(self.ref_start[-1])
        entries, refs = self.entries[M : M + made.key.size], self.refs[R : R + made.length.size]
        entries["key"], entries["idf"], entries["tf"], entries["ref"] = made.key, made.idf, made.tf, made.ref
        refs["norm"], refs["length"] = made.norm, made.length
        self.entry_start = np.append(self.entry_start, M + np.cumsum(made.num_entries))
        self.ref_start = np.append(self.ref_start, R + np.cumsum(made.num_refs))
        self.index.update(zip(keys, range(len(self.index), len(self.index) + len(keys)), strict=True))
        for key in keys:
            self.cache.pop(key, None)

    def trim(self) -> None:
        """Give back the room left over (in place: the arrays are not referenced elsewhere)."""
        self.entries.resize(int(self.entry_start[-1]), refcheck=False)
        self.refs.resize(int(self.ref_start[-1]), refcheck=False)

    def gather(self, numbers: NDArray[np.int64]) -> RefSets:
        """Prepared sets ``numbers`` (G,), copied side by side: a memcpy per set and record array."""
        num_entries = self.entry_start[numbers + 1] - self.entry_start[numbers]  # (G,)
        num_refs = self.ref_start[numbers + 1] - self.ref_start[numbers]
        entries = _copy_runs(self.entries, self.entry_start[numbers], num_entries)  # (M,)
        refs = _copy_runs(self.refs, self.ref_start[numbers], num_refs)  # (R,)
        return RefSets(entries["ref"], entries["key"], entries["tf"], entries["idf"], refs["norm"],
                       refs["length"], num_entries, num_refs)  # fmt: skip

    def size(self) -> PreparedSize:
        index = self.index
        set_bytes = self.refs.nbytes + self.entry_start.nbytes + self.ref_start.nbytes
        set_bytes += sys.getsizeof(index) + sum(map(sys.getsizeof, index.values()))
        return PreparedSize(len(index), int(self.entry_start[-1]), self.entries.nbytes, set_bytes)

    # --- both ----------------------------------------------------------------------------------------

    def find(self, labels: list[Hashable]) -> tuple[NDArray[np.int64], RefSets, list[int]]:
        """Which of the sets ``labels`` (G,) are stored, and their arrays (prepared ones first);
        the others, to make."""
        found = list(map(self.index.get, labels))  # (G,) set numbers, None if not prepared
        if None not in found:  # SCST: all prepared
            return np.arange(len(labels)), self.gather(np.array(found, np.int64)), []
        cache = self.cache
        prepared = [g for g, i in enumerate(found) if i is not None]
        cached = [g for g, i in enumerate(found) if i is None and labels[g] in cache]
        new = [g for g, i in enumerate(found) if i is None and labels[g] not in cache]
        parts = [self.gather(np.array([found[g] for g in prepared], np.int64))] if prepared else []
        old = RefSets.concat(parts + [cache[labels[g]] for g in cached], self.n)
        return np.array(prepared + cached, np.int64), old, new

    def remember(self, keys: list[Hashable], made: RefSets) -> None:
        """Cache the sets of ``made`` under ``keys``, one key each, evicting the oldest."""
        if self.cache_size <= 0 or not keys:
            return
        for key, ref_set in zip(keys, made.split(), strict=True):
            if len(self.cache) >= self.cache_size:
                del self.cache[next(iter(self.cache))]  # the oldest
            self.cache[key] = ref_set
