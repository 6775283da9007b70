"""CIDEr-D on token sequences: pycocoevalcap's ``Cider`` to 1e-9, fast enough to be an SCST reward.

Usage::

    scorer = CiderD(train_references)     # one entry per image: its references, as token ids
    scorer.prepare(train_image_ids, train_references)       # optional: every image's vectors, once
    rewards = scorer.score(samples, refs, keys=image_ids)   # (N,) float64; refs[i] go with samples[i]
    mean, per_caption = cider_d(candidates, references)     # pycocoevalcap's Cider: df from these refs

A token is any hashable: vocabulary ids for SCST (without <start>/<end>/<pad>: the caller strips
them), words for evaluation. Tokens are opaque: pass ``caption.split()``, never a string, and
lists of ints (``tensor.tolist()``), not tensors. ``CiderD`` fixes the document frequencies at
construction (SCST: once, from the training references); ``cider_d`` is pycocoevalcap's ``Cider``,
whose document frequencies come from the references it scores.

The formula, pycocoevalcap 1.2's ``CiderScorer`` (``tests/test_cider.py`` compares):

- a sequence's n-grams, orders k = 1..n (4), and their counts tf; per order a vector
  ``v_k[g] = tf(g) * (log_ref_len - log(max(1, df(g))))``, where df(g) is the number of corpus
  entries (images) in any of whose references g occurs and ``log_ref_len = log(#entries)``; an
  n-gram outside the corpus weighs log_ref_len, like one in a single entry;
- ``sim_k(c, r) = sum over c's n-grams g of min(v_k^c[g], v_k^r[g]) * v_k^r[g]``, divided by
  ``|v_k^c| |v_k^r|`` unless one of them is 0, times ``exp(-(len_c - len_r)^2 / (2 sigma^2))``;
- ``score(c) = 10 * mean_k(sum over references r of sim_k(c, r)) / #references``.

Quirks kept: "length" is pycocoevalcap's, the number of bigrams (words - 1, so the same
differences as word counts, and 0 for an empty caption, which scores 0 anyway; always 0 when
n = 1: no length penalty then); in ``cider_d`` an image listed twice counts twice, in df and in
the number of entries. Not kept: pycocoevalcap's own ``n`` stops at its scorer (its n-gram
counting always takes orders 1..4, so n < 4 fails and n > 4 averages in empty orders); here
``n`` sets the orders counted.

How it is fast (about 40x pycocoevalcap on an SCST batch of prepared images, 25-30x on one of
images never seen, ``benchmarks/cider.py``):

- tokens get small integer codes and an n-gram is its codes packed into one uint64 (64 // n
  bits each): a batch's n-grams are a few numpy operations on a (sequences, windows) array, and
  sorting each row gives the term frequencies;
- df lives in a numpy hash table (``ngrams.NgramTable``) that keeps only the n-grams of 2+ corpus
  entries (df 1 weighs like df 0), a few percent of them: small enough for the CPU's caches;
- the n-grams of each image's candidates and references are sorted together, one short row per
  image (``ngrams.group_by_ngram``): equal n-grams end side by side, which pairs each candidate's
  entry with the references' and lets a group share one idf lookup. Only the entries that may
  meet the other side of their image go in (bitmaps of hashed (image, n-gram) pairs: on an SCST
  batch about half of them, plus some 10% let through by mistake); the others only need an idf;
- with ``keys``, an image's references are vectorised once per call whatever its number of
  samples, and kept. ``prepare`` vectorises a whole corpus's reference sets up front (SCST: every
  training image, once per stage) into two record arrays, about 5 KB a set of 5 references, a
  set one run of memory, never evicted; the sets of keys not prepared stay in a bounded cache
  (``cache_size``, oldest out first). A stored set spares the call its references' n-grams, idf
  lookups and norms.

Shapes: C candidates, G reference sets (images) in a call, J references per set (padded), n
orders, S sequences, L tokens (padded), W n-gram windows, M n-gram entries (Mc candidates', Mn
new references', Mr all references', Mj candidates' in the join), R groups, P pairs.
"""

from __future__ import annotations

import array
import itertools
import sys
from collections.abc import Hashable, Iterable, Sequence
from typing import Any, NamedTuple, cast

import numpy as np
from numpy.typing import NDArray

from captioning.evaluation.ngrams import FIBONACCI, NgramTable, group_by_ngram, offsets, runs

Tokens = Sequence[Hashable]

_MAX_CANDIDATES = 4096  # per internal chunk of score(): bounds the join's memory (and rows < 2^15)
_PREPARE_CHUNK = 4096  # reference sets per step of prepare(): as many rows as score() allows
_CORPUS_CHUNK = 4096  # corpus entries per step of the df count
_ROW_MIX = np.uint64(0xD6E8FEB86659FD93)  # odd: spreads set numbers over the hash's high bits
_MAX_ID_TABLE = 1 << 20  # int tokens below this also find their codes in an array (fast path)


class _Counts(NamedTuple):
    """The n-grams of S sequences and their counts: M entries sorted by (seq, key)."""

    seq: NDArray[np.int64]  # (M,) the entry's sequence
    key: NDArray[np.uint64]  # (M,) packed n-gram
    tf: NDArray[np.int64]  # (M,) term frequency
    length: NDArray[np.int64]  # (S,) pycocoevalcap's length: the number of bigrams


class _RefSets(NamedTuple):
    """G images' reference sets, scored and ready, side by side: their M n-gram entries, set by
    set, and their R references, set by set. What the cache keeps per key (G = 1)."""

    ref: NDArray[np.int32]  # (M,) the entry's reference within its set, 0..J-1
    key: NDArray[np.uint64]  # (M,) an n-gram of that reference
    tf: NDArray[np.int32]  # (M,)
    idf: NDArray[np.float64]  # (M,)
    norm: NDArray[np.float64]  # (R, n) |v_k| per order
    length: NDArray[np.int64]  # (R,)
    num_entries: NDArray[np.int64]  # (G,) per set
    num_refs: NDArray[np.int64]  # (G,) J per set

    @staticmethod
    def empty(n: int) -> _RefSets:
        """No sets."""
        none = np.zeros(0, np.int64)
        return _RefSets(np.zeros(0, np.int32), np.zeros(0, np.uint64), np.zeros(0, np.int32), np.zeros(0),
                        np.zeros((0, n)), none, none, none)  # fmt: skip

    @staticmethod
    def concat(parts: Sequence[_RefSets], n: int) -> _RefSets:
        """The sets of ``parts``, in order (nothing copied for one part)."""
        if len(parts) == 1:
            return parts[0]
        if not parts:
            return _RefSets.empty(n)
        return _RefSets(*(np.concatenate(arrays) for arrays in zip(*parts, strict=True)))

    def split(self) -> list[_RefSets]:
        """One per set: views of these arrays."""
        entry_ends, ref_ends = np.cumsum(self.num_entries).tolist(), np.cumsum(self.num_refs).tolist()
        bounds = zip([0, *entry_ends[:-1]], entry_ends, [0, *ref_ends[:-1]], ref_ends, strict=True)
        sets = []
        for g, (a, b, f, j) in enumerate(bounds):
            e, r, one = slice(a, b), slice(f, j), slice(g, g + 1)
            sets.append(_RefSets(self.ref[e], self.key[e], self.tf[e], self.idf[e], self.norm[r],
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


def _runs_at(starts: NDArray[np.int64], sizes: NDArray[np.int64]) -> NDArray[np.int64]:
    """starts[0], starts[0] + 1, ..., starts[0] + sizes[0] - 1, starts[1], ...: (sizes.sum(),)."""
    return np.arange(int(sizes.sum())) + np.repeat(starts - (np.cumsum(sizes) - sizes), sizes)


def _cat(a: NDArray[Any], b: NDArray[Any]) -> NDArray[Any]:
    """np.concatenate([a, b]), without copying when one of them is empty (a prepared batch's)."""
    return b if a.size == 0 else a if b.size == 0 else np.concatenate([a, b])


class _Store:
    """Prepared reference sets, kept for good in two record arrays (no Python objects per set).

    Set i (``index[key]``) holds entries ``entry_start[i]:entry_start[i + 1]`` of ``entries``
    (key, idf, tf, reference: 24 bytes, side by side so that a set is one run of memory) and
    references ``ref_start[i]:ref_start[i + 1]`` of ``refs`` (norms, length); past the last set,
    the arrays may have room for more.
    """

    def __init__(self, n: int) -> None:
        self.index: dict[Hashable, int] = {}
        self.entries = np.zeros(
            0, [("key", np.uint64), ("idf", np.float64), ("tf", np.int32), ("ref", np.int32)]
        )
        self.refs = np.zeros(0, [("norm", np.float64, (n,)), ("length", np.int64)])
        self.entry_start = np.zeros(1, np.int64)  # (sets + 1,)
        self.ref_start = np.zeros(1, np.int64)

    def reserve(self, num_entries: int, num_refs: int) -> None:
        """Room for that many more entries and references: one copy of what is there (if anything)."""
        M, R = int(self.entry_start[-1]), int(self.ref_start[-1])
        entries, refs = np.zeros(M + num_entries, self.entries.dtype), np.zeros(R + num_refs, self.refs.dtype)
        entries[:M], refs[:R] = self.entries[:M], self.refs[:R]
        self.entries, self.refs = entries, refs

    def add(self, keys: list[Hashable], made: _RefSets) -> None:
        """Keep the sets of ``made`` (within the room reserved) under ``keys``, one key each."""
        M, R = int(self.entry_start[-1]), int(self.ref_start[-1])
        entries, refs = self.entries[M : M + made.key.size], self.refs[R : R + made.length.size]
        entries["key"], entries["idf"], entries["tf"], entries["ref"] = made.key, made.idf, made.tf, made.ref
        refs["norm"], refs["length"] = made.norm, made.length
        self.entry_start = np.append(self.entry_start, M + np.cumsum(made.num_entries))
        self.ref_start = np.append(self.ref_start, R + np.cumsum(made.num_refs))
        self.index.update(zip(keys, range(len(self.index), len(self.index) + len(keys)), strict=True))

    def trim(self) -> None:
        """Give back the room left over (in place: the arrays are not referenced elsewhere)."""
        self.entries.resize(int(self.entry_start[-1]), refcheck=False)
        self.refs.resize(int(self.ref_start[-1]), refcheck=False)

    def gather(self, numbers: NDArray[np.int64]) -> _RefSets:
        """Sets ``numbers`` (G,), copied side by side: one fancy index per record array."""
        num_entries = self.entry_start[numbers + 1] - self.entry_start[numbers]  # (G,)
        num_refs = self.ref_start[numbers + 1] - self.ref_start[numbers]
        at = _runs_at(self.entry_start[numbers], num_entries)  # (M,)
        ref_at = _runs_at(self.ref_start[numbers], num_refs)  # (R,)
        # np.take: [] on a record array copies it field by field, some 20x slower
        entries, refs = np.take(self.entries, at), np.take(self.refs, ref_at)
        return _RefSets(
            entries["ref"],
            entries["key"],
            entries["tf"],
            entries["idf"],
            refs["norm"],
            refs["length"],
            num_entries,
            num_refs,
        )

    def size(self) -> PreparedSize:
        index = self.index
        set_bytes = self.refs.nbytes + self.entry_start.nbytes + self.ref_start.nbytes
        set_bytes += sys.getsizeof(index) + sum(map(sys.getsizeof, index.values()))
        return PreparedSize(len(index), int(self.entry_start[-1]), self.entries.nbytes, set_bytes)


class CiderD:
    """CIDEr-D with document frequencies fixed at construction (SCST: computed once from the training references)."""

    def __init__(
        self, corpus: Iterable[Sequence[Tokens]], *, n: int = 4, sigma: float = 6.0, cache_size: int = 10_000
    ) -> None:
        """``corpus``: one entry per document (an image's references), whose n-grams' document
        frequencies are counted once here; ``n``, ``sigma``: CIDEr-D's (pycocoevalcap's defaults).

        ``cache_size``: reference sets of keys not prepared (``prepare``), kept by key between
        calls, oldest out first; about 6 KB each. An SCST epoch sees each image once, so a
        cache smaller than the training split never hits: SCST prepares the split instead
        (COCO's Karpathy train: 113,287 images, about 0.5 GB; ``estimate_prepared_bytes``), and
        every call finds its sets. Within a call, an image's samples share its references' work
        whatever the cache.
        """
        if not 1 <= n <= 8:
            raise ValueError(f"n must be 1..8 (n-grams are packed into 64 bits), got {n}")
        self.n, self.sigma, self.cache_size = n, float(sigma), cache_size
        self._bits = 64 // n
        self._max_code = (1 << self._bits) - 1
        # a k-gram's last token is its highest nonzero field: order k - 1 = how many of these it reaches
        self._order_bounds = np.array([1 << (self._bits * k) for k in range(1, n)], np.uint64)
        self._code: dict[Hashable, int] = {}  # token -> 1.., in order of first sight (0 pads)
        self._id_code = np.zeros(1024, np.uint64)  # the same for int tokens, as an array (0: unknown)
        self._cache: dict[Hashable, _RefSets] = {}  # key -> its references, oldest first
        self._store = _Store(n)  # prepared: never evicted
        documents = [list(refs) for refs in corpus]
        if not documents:
            raise ValueError("CiderD needs a non-empty corpus (document frequencies come from it)")
        for i, refs in enumerate(documents):
            if not refs:
                raise ValueError(f"corpus entry {i} has no references")
        self.num_documents = len(documents)
        self.log_ref_len = float(np.log(float(self.num_documents)))  # as pycocoevalcap computes it
        keys, df = self._document_frequencies(documents)
        self.num_ngrams = int(keys.size)
        # df 1 weighs like df 0 (log max(1, df) = 0): the table keeps the n-grams of 2+ documents
        # (6% of them in benchmarks/cider.py's corpus), small enough to stay in the CPU's caches.
        common = df >= 2
        exact = np.float32 if self.num_documents < 2**24 else np.float64  # df as floats, exactly
        self._df = NgramTable(keys[common], df[common].astype(exact))

    @property
    def vocabulary_size(self) -> int:
        """Distinct tokens seen so far (corpus, then candidates and references)."""
        return len(self._code)

    def clear_cache(self) -> None:
        """Forget the cached reference sets (not the prepared ones)."""
        self._cache.clear()

    @property
    def prepared_size(self) -> PreparedSize:
        """The prepared sets: their number, n-gram entries and bytes."""
        return self._store.size()

    def prepare(
        self,
        keys: Sequence[Hashable],
        references: Sequence[Sequence[Tokens]],
        *,
        chunk_size: int = _PREPARE_CHUNK,
    ) -> None:
        """Vectorise the reference sets of ``keys`` (``references[i]``: key i's) once, for good.

        ``score(..., keys=...)`` then finds them without vectorising, whatever ``cache_size``:
        SCST prepares every training image once per stage. As with the cache, a key must always
        stand for the same references (``score`` checks their number). Keys already prepared
        are skipped. ``chunk_size`` sets per step (at most 4096) bound the temporary memory;
        the sets are kept in arrays reserved for the whole call (an upper bound: n-gram windows),
        trimmed at the end; a later call copies what is there once.
        """
        if len(references) != len(keys):
            raise ValueError(f"{len(keys)} keys but {len(references)} reference lists")
        if not 1 <= chunk_size <= _MAX_CANDIDATES:
            raise ValueError(f"chunk_size must be 1..{_MAX_CANDIDATES}, got {chunk_size}")
        todo: dict[Hashable, Sequence[Tokens]] = {}
        for key, refs in zip(keys, references, strict=True):
            if len(refs) == 0:
                raise ValueError(f"key {key!r} has an empty list of references")
            if key not in self._store.index:
                todo.setdefault(key, refs)
        if not todo:
            return
        new_keys, new_refs = list(todo), list(todo.values())
        lengths = np.fromiter(map(len, itertools.chain.from_iterable(new_refs)), np.int64)  # (R,)
        windows = np.maximum(lengths[:, None] - np.arange(self.n), 0).sum()  # >= the entries
        self._store.reserve(int(windows), lengths.size)
        for start in range(0, len(new_keys), chunk_size):
            chunk, chunk_keys = new_refs[start : start + chunk_size], new_keys[start : start + chunk_size]
            counts = self._count(list(itertools.chain.from_iterable(chunk)))
            G, none = len(chunk), np.zeros(0, np.int64)
            # _score with no candidates: the sets' vectors
            made = self._score(
                counts, _RefSets.empty(self.n), none, np.arange(G), np.array([*map(len, chunk)]), none, G
            )[1]
            self._store.add(chunk_keys, made)
            for key in chunk_keys:
                self._cache.pop(key, None)
        self._store.trim()

    def score(
        self,
        candidates: Sequence[Tokens],
        references: Sequence[Sequence[Tokens]],
        keys: Sequence[Hashable] | None = None,
    ) -> NDArray[np.float64]:
        """CIDEr-D of each candidate against its references: (C,) float64.

        ``references[i]`` are candidate i's references. With ``keys`` (e.g. image ids), candidates
        with the same key share one computation of their references' vectors, which are found
        prepared (``prepare``) or cached, or else made and cached: a key must always stand for
        the same references (a different number of them is an error).
        """
        if len(references) != len(candidates):
            raise ValueError(f"{len(candidates)} candidates but {len(references)} reference lists")
        if keys is not None and len(keys) != len(candidates):
            raise ValueError(f"{len(candidates)} candidates but {len(keys)} keys")
        given = np.fromiter(map(len, references), np.int64, count=len(references))  # (C,) references each
        if given.size and given.min() == 0:
            raise ValueError(f"candidate {int(given.argmin())} has an empty list of references")
        if len(candidates) > _MAX_CANDIDATES:
            parts = [
                self.score(
                    candidates[i : i + _MAX_CANDIDATES],
                    references[i : i + _MAX_CANDIDATES],
                    None if keys is None else keys[i : i + _MAX_CANDIDATES],
                )
                for i in range(0, len(candidates), _MAX_CANDIDATES)
            ]
            return np.concatenate(parts)
        if not candidates:
            return np.zeros(0)

        # Reference sets: one per distinct key (or per candidate): prepared, cached, or made here.
        C = len(candidates)
        if keys is None:
            G, group = C, np.arange(C)
            old_set, old, new = np.zeros(0, np.int64), _RefSets.empty(self.n), list(range(C))
            new_refs = list(references)
        else:
            label_of = list(dict.fromkeys(keys))  # (G,) the distinct keys, as first seen
            set_of = {label: g for g, label in enumerate(label_of)}
            G, group = len(label_of), np.fromiter(map(set_of.__getitem__, keys), np.int64, count=C)  # (C,)
            old_set, old, new = self._find(label_of)
            stored = np.zeros(G, np.int64)
            stored[old_set] = old.num_refs
            for i in np.flatnonzero((stored[group] != given) & (stored[group] > 0))[:1].tolist():
                raise ValueError(
                    f"key {keys[i]!r} has {given[i]} references here but {stored[group[i]]} when it was "
                    "stored: a key must keep its references"
                )
            new_refs = []
            if new:
                first_of = dict(zip(reversed(keys), range(C - 1, -1, -1), strict=True))  # the earliest wins
                new_refs = [references[first_of[label_of[g]]] for g in new]
        counts = self._count([*candidates, *itertools.chain.from_iterable(new_refs)])
        new_sizes = np.fromiter(map(len, new_refs), np.int64, count=len(new))
        scores, made = self._score(counts, old, old_set, np.array(new, np.int64), new_sizes, group, G)
        if keys is not None:
            self._remember([label_of[g] for g in new], made)
        return scores

    def _find(self, labels: list[Hashable]) -> tuple[NDArray[np.int64], _RefSets, list[int]]:
        """Which of the sets ``labels`` (G,) are stored, and their arrays (prepared ones first);
        the others, to make."""
        found = list(map(self._store.index.get, labels))  # (G,) set numbers, None if not prepared
        if None not in found:  # SCST: all prepared
            return np.arange(len(labels)), self._store.gather(np.array(found, np.int64)), []
        cache = self._cache
        prepared = [g for g, i in enumerate(found) if i is not None]
        cached = [g for g, i in enumerate(found) if i is None and labels[g] in cache]
        new = [g for g, i in enumerate(found) if i is None and labels[g] not in cache]
        parts = [self._store.gather(np.array([found[g] for g in prepared], np.int64))] if prepared else []
        old = _RefSets.concat(parts + [cache[labels[g]] for g in cached], self.n)
        return np.array(prepared + cached, np.int64), old, new

    # --- n-grams ------------------------------------------------------------------------------------

    def _encode(self, seqs: Sequence[Tokens]) -> tuple[NDArray[np.uint64], NDArray[np.int64]]:
        """Token codes, (S, L) uint64 padded with 0, and the lengths (S,)."""
        if any(issubclass(kind, str) for kind in set(map(type, seqs))):
            seq = next(seq for seq in seqs if isinstance(seq, str))
            raise TypeError(f"a caption is a sequence of tokens, not a string: split it first ({seq[:40]!r})")
        lengths = np.fromiter(map(len, seqs), np.int64, count=len(seqs))  # (S,)
        flat = self._codes(list(itertools.chain.from_iterable(seqs)))
        S, L = len(seqs), int(lengths.max(initial=0))
        codes = np.zeros((S, L), np.uint64)
        codes[np.arange(L) < lengths[:, None]] = flat  # row by row, as flat is
        return codes, lengths

    def _codes(self, tokens: list[Hashable]) -> NDArray[np.uint64]:
        """Each token's code; a new token gets the next one."""
        if tokens and type(tokens[0]) is int:  # vocabulary ids: one numpy gather
            try:  # array("q") takes ints only: anything else is a TypeError
                ids = np.frombuffer(array.array("q", cast("list[int]", tokens)), np.int64)
            except (TypeError, OverflowError):
                ids = np.zeros(0, np.int64)
            if ids.size and ids.min() >= 0 and ids.max() < _MAX_ID_TABLE:
                self._grow_id_table(int(ids.max()) + 1)
                codes = self._id_code[ids]
                unknown = np.flatnonzero(codes == 0)
                if unknown.size:  # only these go through the dict, in order of first sight
                    new, first = np.unique(ids[unknown], return_index=True)
                    self._add_tokens(new[np.argsort(first)].tolist())
                    codes[unknown] = self._id_code[ids[unknown]]
                return codes
        code = self._code
        try:
            return np.fromiter(map(code.__getitem__, tokens), np.uint64, len(tokens))
        except KeyError:
            self._add_tokens(tokens)
            return np.fromiter(map(code.__getitem__, tokens), np.uint64, len(tokens))

    def _add_tokens(self, tokens: Iterable[Hashable]) -> None:
        """Code the tokens not coded yet; enter the small ints' codes in the id table."""
        code = self._code
        for token in tokens:
            value = code.get(token)
            if value is None:
                value = code[token] = len(code) + 1
            if isinstance(token, int | np.integer) and 0 <= token < _MAX_ID_TABLE:
                self._grow_id_table(int(token) + 1)
                self._id_code[token] = value
        if len(code) > self._max_code:
            raise ValueError(
                f"more than {self._max_code} distinct tokens: with n = {self.n}, n-grams pack "
                f"{self._bits} bits per token into 64"
            )

    def _grow_id_table(self, size: int) -> None:
        if size > self._id_code.size:
            grown = np.zeros(max(2 * self._id_code.size, size), np.uint64)
            grown[: self._id_code.size] = self._id_code
            self._id_code = grown

    def _ngram_rows(self, codes: NDArray[np.uint64]) -> NDArray[np.uint64]:
        """Every window's packed n-gram, orders 1..n side by side: (S, W), 0 past the end."""
        key = codes  # order 1; then key | next token << bits, one order at a time
        orders = [codes]
        for k in range(1, self.n):
            key = key[:, :-1] | (codes[:, k:] << np.uint64(self._bits * k))
            orders.append(key)
        rows = np.concatenate(orders, axis=1)  # (S, W = sum of L - k)
        # A window past the end has a 0 for its last token: it packs to less than its order's bound.
        L = codes.shape[1]
        bound = np.repeat(np.append(np.uint64(0), self._order_bounds), np.maximum(L - np.arange(self.n), 0))
        return np.where(rows >= bound, rows, np.uint64(0))  # (W,) bounds broadcast over the rows

    def _order(self, key: NDArray[np.uint64]) -> NDArray[np.int64]:
        """0-based n-gram order of packed keys: the number of nonzero fields - 1."""
        return np.searchsorted(self._order_bounds, key, side="right")

    def _count(self, seqs: Sequence[Tokens]) -> _Counts:
        codes, lengths = self._encode(seqs)
        seq, key, tf = runs(self._ngram_rows(codes))
        length = np.maximum(lengths - 1, 0) if self.n >= 2 else np.zeros_like(lengths)
        return _Counts(seq, key, tf, length)

    def _idf(self, key: NDArray[np.uint64]) -> NDArray[np.float64]:
        return self.log_ref_len - np.log(np.maximum(self._df.get(key), 1.0))

    def _document_frequencies(
        self, documents: list[list[Tokens]]
    ) -> tuple[NDArray[np.uint64], NDArray[np.int64]]:
        """Every n-gram of the corpus and the number of documents it occurs in."""
        per_chunk = []
        for start in range(0, len(documents), _CORPUS_CHUNK):
            docs = documents[start : start + _CORPUS_CHUNK]
            sizes = np.array([len(refs) for refs in docs])
            rows = self._ngram_rows(self._encode([ref for refs in docs for ref in refs])[0])  # (S, W)
            # One row per document, its references' n-grams side by side: each n-gram once per document.
            by_doc = np.zeros((len(docs), int(sizes.max()), rows.shape[1]), np.uint64)  # (D, J, W)
            by_doc[np.repeat(np.arange(len(docs)), sizes), offsets(sizes)] = rows
            per_chunk.append(runs(by_doc.reshape(len(docs), -1))[1])
        keys, df = np.unique(np.concatenate(per_chunk), return_counts=True)
        return keys, df

    # --- scores -------------------------------------------------------------------------------------

    def _score(
        self,
        counts: _Counts,
        old: _RefSets,
        old_set: NDArray[np.int64],
        new: NDArray[np.int64],
        sizes: NDArray[np.int64],
        group: NDArray[np.int64],
        G: int,
    ) -> tuple[NDArray[np.float64], _RefSets]:
        """Scores (C,) of the candidates against their sets ``group`` (of G), and the sets ``new`` made.

        ``counts``: the C candidates, then the references of the sets ``new`` (``sizes`` each);
        ``old``: the stored sets ``old_set``.
        """
        n, C = self.n, group.size
        num_counted = counts.key.size
        Mc = int(np.searchsorted(counts.seq, C))  # the candidates' entries come first
        Mn = num_counted - Mc
        cand_key, cand_row = counts.key[:Mc], group[counts.seq[:Mc]]  # (Mc,)
        # The references' entries (Mr): the new ones (counted), then the stored ones.
        new_set, new_ref = np.repeat(new, sizes), offsets(sizes)  # (new references,) set, index in it
        new_seq = counts.seq[Mc:] - C  # (Mn,) the new reference of each new entry
        ref_key = _cat(counts.key[Mc:], old.key)  # (Mr,)
        ref_row = _cat(new_set[new_seq], np.repeat(old_set, old.num_entries))
        ref_index = _cat(new_ref[new_seq], old.ref)  # the reference within its set
        ref_tf = _cat(counts.tf[Mc:], old.tf)

        # The join below is a sort, whose cost grows with its entries; most share nothing with the
        # other side of their set, and only need an idf. It takes all new references' entries (a
        # group of them shares one idf lookup) and those the bitmaps let through.
        if Mc and ref_key.size:
            meets_ref, meets_cand = self._may_meet(cand_key, cand_row, ref_key, ref_row, G)
            meets_cand[:Mn] = True
        else:  # nothing to meet (prepare: no candidates)
            meets_ref, meets_cand = np.zeros(Mc, bool), np.ones(ref_key.size, bool)
        jc, jr = np.flatnonzero(meets_ref), np.flatnonzero(meets_cand)  # (Mj,), (M - Mj,)
        Mj = jc.size
        key = np.concatenate([cand_key[jc], ref_key[jr]])  # (M,)
        row = np.concatenate([cand_row[jc], ref_row[jr]])

        # Group the joined entries of each set by n-gram (candidates first in a group). The idf of
        # a group comes from a stored reference in it, or from one lookup for the whole group; a
        # candidate's entry that meets no reference has a lookup of its own (in the same call).
        entry, run, start = group_by_ngram(key, row, np.arange(key.size) >= Mj, G)
        run_idf = np.full(start.size, np.nan)  # (R,)
        stored_at = np.flatnonzero(entry >= Mj + Mn)  # positions of stored entries
        run_idf[run[stored_at]] = old.idf[jr[entry[stored_at] - Mj] - Mn]
        ask = np.flatnonzero(np.isnan(run_idf))
        alone = np.flatnonzero(~meets_ref)  # candidates' entries that meet no reference
        looked_up = self._idf(np.concatenate([key[entry[start[ask]]], cand_key[alone]]))
        run_idf[ask] = looked_up[: ask.size]
        joined_idf = np.empty(key.size)  # (M,)
        joined_idf[entry] = run_idf[run]
        idf = np.empty(num_counted)  # the counted entries': candidates', new references'
        idf[jc], idf[Mc:], idf[alone] = joined_idf[:Mj], joined_idf[Mj : Mj + Mn], looked_up[ask.size :]
        value = counts.tf * idf  # tf-idf
        # (sequence, order) of each counted entry; a reference's entry has its candidate's order
        cell = counts.seq * n + self._order(counts.key)  # (num_counted,)

        # Norms of the counted sequences (candidates, new references); every set's norms and lengths.
        S = counts.length.size
        square = np.bincount(cell, weights=value**2, minlength=S * n)
        norm = np.sqrt(square).reshape(S, n)  # (S, n)
        num_refs = np.zeros(G, np.int64)  # (G,)
        num_refs[new], num_refs[old_set] = sizes, old.num_refs
        J = int(num_refs.max())
        ref_norm = np.zeros((G, J, n))
        ref_len = np.zeros((G, J), np.int64)
        ref_norm[new_set, new_ref], ref_len[new_set, new_ref] = norm[C:], counts.length[C:]
        old_row, old_ref = np.repeat(old_set, old.num_refs), offsets(old.num_refs)
        ref_norm[old_row, old_ref], ref_len[old_row, old_ref] = old.norm, old.length

        # Every (candidate, reference) pair that shares an n-gram: in a group, each reference
        # entry meets each of the candidate entries at the group's head.
        is_cand = entry < Mj  # (M,) in group order
        cands_in_group = np.add.reduceat(is_cand, start, dtype=np.int64)  # (R,)
        refs_at = np.flatnonzero(~is_cand)
        repeats = cands_in_group[run[refs_at]]
        hits = np.flatnonzero(repeats)
        refs_at, repeats = refs_at[hits], repeats[hits]
        e_ref = entry[np.repeat(refs_at, repeats)]  # (P,) joined entries
        e_cand = jc[entry[_runs_at(start[run[refs_at]], repeats)]]  # counted entries
        r = jr[e_ref - Mj]  # (P,) the references' entries
        v_hyp, v_ref = value[e_cand], ref_tf[r] * joined_idf[e_ref]
        clipped = np.minimum(v_hyp, v_ref) * v_ref  # pycocoevalcap's clipping
        index = cell[e_cand] * J + ref_index[r]
        # bincount of nothing is int64, weights or not
        val = np.bincount(index, weights=clipped, minlength=C * n * J).astype(np.float64, copy=False)
        val = val.reshape(C, n, J)

        # A zero norm has only zero values (tf-idf >= 0) hence no hits: val is 0 there, and stays 0
        # divided by the tiny number; any other norm product is far above it.
        val /= np.maximum(norm[:C, :, None] * ref_norm[group].transpose(0, 2, 1), 1e-300)  # (C, n, J)
        delta = (counts.length[:C, None] - ref_len[group]).astype(np.float64)  # (C, J)
        val *= np.exp(-(delta**2) / (2 * self.sigma**2))[:, None, :]
        # Padded reference slots hold zeros: no hits, norms 0. Sum over references, mean over orders.
        scores = val.sum(axis=2).mean(axis=1) / num_refs[group] * 10.0

        # The new sets: their part of the arrays, copied out.
        if new.size == 0:
            return scores, _RefSets.empty(n)
        num_entries = np.diff(np.searchsorted(new_seq, np.append(0, np.cumsum(sizes))))  # (new,)
        made = _RefSets(
            new_ref[new_seq].astype(np.int32),
            counts.key[Mc:num_counted].copy(),
            counts.tf[Mc:num_counted].astype(np.int32),
            idf[Mc:num_counted].copy(),
            norm[C:].copy(),
            counts.length[C:].copy(),
            num_entries,
            sizes,
        )
        return scores, made

    def _may_meet(
        self,
        cand_key: NDArray[np.uint64],
        cand_row: NDArray[np.int64],
        ref_key: NDArray[np.uint64],
        ref_row: NDArray[np.int64],
        G: int,
    ) -> tuple[NDArray[np.bool_], NDArray[np.bool_]]:
        """Which candidates' entries (Mc,) may share their n-gram with a reference of their set
        (of G), and which references' entries (Mr,) with a candidate: no false negatives.

        Bitmaps of hashed (set, n-gram) pairs, 8+ bits per entry: about 10% false positives.
        """
        bits = max(10, (8 * max(cand_key.size, ref_key.size)).bit_length())
        shift = np.uint64(64 - bits)
        row_mix = np.arange(G, dtype=np.uint64) * _ROW_MIX  # (G,)

        def slot(key: NDArray[np.uint64], row: NDArray[np.int64]) -> NDArray[np.intp]:
            return (((key * FIBONACCI) ^ row_mix[row]) >> shift).astype(np.intp)

        cand_slot, ref_slot = slot(cand_key, cand_row), slot(ref_key, ref_row)
        has_cand, has_ref = np.zeros(1 << bits, bool), np.zeros(1 << bits, bool)
        has_cand[cand_slot], has_ref[ref_slot] = True, True
        return has_ref[cand_slot], has_cand[ref_slot]

    def _remember(self, keys: list[Hashable], made: _RefSets) -> None:
        if self.cache_size <= 0 or not keys:
            return
        for key, ref_set in zip(keys, made.split(), strict=True):
            if len(self._cache) >= self.cache_size:
                del self._cache[next(iter(self._cache))]  # the oldest
            self._cache[key] = ref_set


def cider_d(
    candidates: Sequence[Tokens], references: Sequence[Sequence[Tokens]]
) -> tuple[float, NDArray[np.float64]]:
    """pycocoevalcap's Cider exactly: df from these references (quirk included); (mean, per-candidate)."""
    if len(candidates) != len(references):
        raise ValueError(f"{len(candidates)} candidates but {len(references)} reference lists")
    if not candidates:
        raise ValueError("cider_d needs at least one candidate")
    scores = CiderD(references).score(candidates, references)
    return float(scores.mean()), scores
