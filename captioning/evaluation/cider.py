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

How it is fast (about 45x pycocoevalcap on an SCST batch of prepared images, 30x on one of images
never seen, ``benchmarks/cider.py``):

- tokens get small integer codes and an n-gram is its codes packed into one uint64 (64 // n
  bits each): a batch's n-grams are a few numpy operations on a (sequences, windows) array, and
  sorting each row gives the term frequencies;
- a call's n-gram entries, candidates' and references', are sorted together by image then
  n-gram (``ngrams.group_by_ngram``): equal n-grams of an image end side by side, which pairs
  candidates' entries with references' and lets a group share one idf, a stored reference's or
  one lookup in a hash table of the corpus's n-grams of 2+ entries (``ngrams.NgramTable``);
- with ``keys``, an image's references are vectorised once per call whatever its number of
  samples, and kept (``cider_store``): ``prepare`` vectorises a corpus's reference sets up front
  (SCST: every training image, once per stage), for good; other keys' sets stay in a bounded
  cache (``cache_size``). A stored set spares the call its references' n-grams, idf lookups and
  norms, and only its entries that may meet a candidate's (a bitmap says) join the sort.

Shapes: C candidates, G reference sets (images) in a call, J references per set (padded), n
orders, S sequences, L tokens (padded), W n-gram windows, M n-gram entries (Mc candidates', Mn
new references', Mr all references'), R groups, H reference entries that meet a candidate, P pairs.
"""

from __future__ import annotations

import array
import itertools
from collections.abc import Hashable, Iterable, Sequence
from typing import NamedTuple, cast

import numpy as np
from numpy.typing import NDArray

from captioning.evaluation.cider_store import PreparedSize, RefSets, RefSetStore, estimate_prepared_bytes
from captioning.evaluation.ngrams import NgramTable, group_by_ngram, may_meet, offsets, runs, runs_at

__all__ = ["CiderD", "PreparedSize", "Tokens", "cider_d", "estimate_prepared_bytes"]

Tokens = Sequence[Hashable]

_MAX_CANDIDATES = 4096  # per internal chunk of score(): bounds the join's memory and rows
_PREPARE_CHUNK = 4096  # reference sets per step of prepare(): as many rows as score() allows
_CORPUS_CHUNK = 4096  # corpus entries per step of the df count
_MAX_ID_TABLE = 1 << 20  # int tokens below this also find their codes in an array (fast path)


class _Counts(NamedTuple):
    """The n-grams of S sequences and their counts: M entries sorted by (seq, key)."""

    seq: NDArray[np.int64]  # (M,) the entry's sequence
    key: NDArray[np.uint64]  # (M,) packed n-gram
    tf: NDArray[np.int64]  # (M,) term frequency
    length: NDArray[np.int64]  # (S,) pycocoevalcap's length: the number of bigrams


class CiderD:
    """CIDEr-D with document frequencies fixed at construction (SCST: once, from the training references)."""

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
        self.n, self.sigma = n, float(sigma)
        self._bits = 64 // n
        self._max_code = (1 << self._bits) - 1
        # a k-gram's last token is its highest nonzero field: order k - 1 = how many of these it reaches
        self._order_bounds = np.array([1 << (self._bits * k) for k in range(1, n)], np.uint64)
        self._code: dict[Hashable, int] = {}  # token -> 1.., in order of first sight (0 pads)
        self._id_code = np.zeros(1024, np.uint64)  # the same for int tokens, as an array (0: unknown)
        self._store = RefSetStore(n, cache_size)  # prepared (never evicted) and cached sets
        self._cache = self._store.cache  # the cached ones by key (the same dict)
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
        # df 1 weighs like df 0 (log max(1, df) = 0, idf log_ref_len, the lookup's default): the
        # table keeps the n-grams of 2+ documents (6% of them in benchmarks/cider.py's corpus).
        common = df >= 2
        self._idf = NgramTable(keys[common], self.log_ref_len - np.log(df[common].astype(np.float64)))

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
                counts, RefSets.empty(self.n), none, np.arange(G), np.array([*map(len, chunk)]), none, G
            )[1]
            self._store.prepare(chunk_keys, made)
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
            old_set, old, new = np.zeros(0, np.int64), RefSets.empty(self.n), list(range(C))
            new_refs = list(references)
        else:
            label_of = list(dict.fromkeys(keys))  # (G,) the distinct keys, as first seen
            set_of = {label: g for g, label in enumerate(label_of)}
            G, group = len(label_of), np.fromiter(map(set_of.__getitem__, keys), np.int64, count=C)  # (C,)
            old_set, old, new = self._store.find(label_of)
            stored = np.zeros(G, np.int64)
            stored[old_set] = old.num_refs
            stored = stored[group]  # (C,) 0 where new
            wrong = (stored != given) & (stored > 0)
            if wrong.any():
                i = int(wrong.argmax())
                raise ValueError(
                    f"key {keys[i]!r} has {given[i]} references here but {stored[i]} when it was "
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
            self._store.remember([label_of[g] for g in new], made)
        return scores

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
            top = int(ids.view(np.uint64).max(initial=0))  # a negative id views as 2^63 or more
            if ids.size and top < _MAX_ID_TABLE:
                self._grow_id_table(top + 1)
                codes = self._id_code[ids]
                unknown = (codes == 0).nonzero()[0]
                if unknown.size:  # only these go through the dict, in order of first sight
                    self._add_tokens(dict.fromkeys(ids[unknown].tolist()))
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

    def _ngram_rows(self, codes: NDArray[np.uint64], *, sort: bool = False) -> NDArray[np.uint64]:
        """Every window's packed n-gram, orders 1..n side by side: (S, W), 0 past the end. With
        ``sort``, each order's block of a row sorted: equal keys side by side, as ``runs`` wants
        (orders share no key, and the blocks' sorts are shorter than one of the whole row)."""
        blocks = [codes.copy() if sort else codes]  # order 1; then key | next token << bits
        for k in range(1, self.n):
            blocks.append(blocks[-1][:, :-1] | (codes[:, k:] << np.uint64(self._bits * k)))
        for k, block in enumerate(blocks):
            if k:  # a window past the end has a 0 for its last token: it packs to less than its order's bound
                block *= block >= self._order_bounds[k - 1]
            if sort:
                block.sort(axis=1)
        return np.concatenate(blocks, axis=1)  # (S, W = sum of L - k)

    def _order(self, key: NDArray[np.uint64]) -> NDArray[np.intp]:
        """0-based n-gram order of packed keys: the number of nonzero fields - 1."""
        order = np.zeros(key.size, np.intp)
        for bound in self._order_bounds:  # n - 1 compares: a searchsorted per key costs more
            order += key >= bound
        return order

    def _count(self, seqs: Sequence[Tokens]) -> _Counts:
        codes, lengths = self._encode(seqs)
        seq, key, tf = runs(self._ngram_rows(codes, sort=True))
        length = np.maximum(lengths - 1, 0) if self.n >= 2 else np.zeros_like(lengths)
        return _Counts(seq, key, tf, length)

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
            per_chunk.append(runs(np.sort(by_doc.reshape(len(docs), -1), axis=1))[1])
        keys, df = np.unique(np.concatenate(per_chunk), return_counts=True)
        return keys, df

    # --- scores -------------------------------------------------------------------------------------

    def _score(
        self,
        counts: _Counts,
        old: RefSets,
        old_set: NDArray[np.int64],
        new: NDArray[np.int64],
        sizes: NDArray[np.int64],
        group: NDArray[np.int64],
        G: int,
    ) -> tuple[NDArray[np.float64], RefSets]:
        """Scores (C,) of the candidates against their sets ``group`` (of G), and the sets ``new`` made.

        ``counts``: the C candidates, then the references of the sets ``new`` (``sizes`` each);
        ``old``: the stored sets ``old_set``.
        """
        n, C = self.n, group.size
        Mc = int(counts.seq.searchsorted(C))  # the candidates' entries come first
        Mn = counts.key.size - Mc
        new_set, new_ref = new.repeat(sizes), offsets(sizes)  # (new references,) set, index in it
        new_seq = counts.seq[Mc:] - C  # (Mn,) the new reference of each new entry
        cand_row = group[counts.seq[:Mc]]  # (Mc,)
        # The stored entries that share no n-gram with a candidate of their set add nothing (their
        # set's norms are stored): a bitmap leaves most of them out.
        stored_row = old_set.repeat(old.num_entries)  # (stored entries,)
        kept = may_meet(counts.key[:Mc], cand_row, old.key, stored_row, G) if old.key.size else stored_row
        # The join: the counted entries (candidates', new references') then the stored ones kept;
        # the references' (Mr) follow the candidates'.
        key = np.concatenate([counts.key, old.key[kept]])  # (M,)
        row = np.concatenate([cand_row, new_set[new_seq], stored_row[kept]])
        ref_index = np.concatenate([new_ref[new_seq], old.ref[kept]])  # (Mr,) the reference within its set
        ref_tf = np.concatenate([counts.tf[Mc:], old.tf[kept]])

        # Group the entries of each set by n-gram, candidates first. A group's idf comes from a
        # stored reference in it, or from one lookup for the whole group.
        entry, start, in_group = group_by_ngram(key, row, G)  # (M,), (R,), (M,)
        group_idf = np.empty(start.size)  # (R,)
        group_idf.fill(np.nan)
        group_idf[in_group[Mc + Mn :]] = old.idf[kept]
        ask = np.isnan(group_idf).nonzero()[0]
        group_idf[ask] = self._idf.get(key[entry[start[ask]]], self.log_ref_len)
        idf = group_idf[in_group[: Mc + Mn]]  # the counted entries'
        value = counts.tf * idf  # tf-idf
        # (sequence, order) of each counted entry; a reference's entry has its candidate's order
        cell = counts.seq * n + self._order(counts.key)  # (Mc + Mn,)

        # Norms of the counted sequences (candidates, new references); every set's norms and lengths.
        S = counts.length.size
        norm = np.sqrt(np.bincount(cell, weights=value**2, minlength=S * n)).reshape(S, n)  # (S, n)
        num_refs = np.zeros(G, np.int64)  # (G,)
        num_refs[new], num_refs[old_set] = sizes, old.num_refs
        J = int(num_refs.max())
        ref_norm = np.zeros((G, J, n))
        ref_len = np.zeros((G, J), np.int64)
        ref_norm[new_set, new_ref], ref_len[new_set, new_ref] = norm[C:], counts.length[C:]
        old_row, old_ref = old_set.repeat(old.num_refs), offsets(old.num_refs)
        ref_norm[old_row, old_ref], ref_len[old_row, old_ref] = old.norm, old.length

        # Every (candidate, reference) pair that shares an n-gram: each reference entry of a group
        # meets each of the candidate entries at the group's head.
        cands_in_group = np.bincount(in_group[:Mc], minlength=start.size)  # (R,)
        ref_group = in_group[Mc:]  # (Mr,)
        repeats = cands_in_group[ref_group]
        hits = repeats.nonzero()[0]  # (H,) the reference entries that meet a candidate
        repeats, hit_group = repeats[hits], ref_group[hits]
        e_cand = entry[runs_at(start[hit_group], repeats)]  # (P,) the candidates' entries
        v_ref = (ref_tf[hits] * group_idf[hit_group]).repeat(repeats)  # (P,)
        clipped = np.minimum(value[e_cand], v_ref) * v_ref  # pycocoevalcap's clipping
        index = cell[e_cand] * J + ref_index[hits].repeat(repeats)
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
            return scores, RefSets.empty(n)
        num_entries = np.diff(np.searchsorted(new_seq, np.append(0, np.cumsum(sizes))))  # (new,)
        made = RefSets(new_ref[new_seq].astype(np.int32), counts.key[Mc:].copy(),
                       counts.tf[Mc:].astype(np.int32), idf[Mc:].copy(), norm[C:].copy(),
                       counts.length[C:].copy(), num_entries, sizes)  # fmt: skip
        return scores, made


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
