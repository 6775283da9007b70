"""CIDEr-D on token sequences: pycocoevalcap's ``Cider`` to 1e-9, fast enough to be an SCST reward.

Usage::

    scorer = CiderD(train_references)     # one entry per image: its references, as token ids
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

How it is fast (30-60x pycocoevalcap on an SCST batch, ``benchmarks/cider.py``):

- tokens get small integer codes and an n-gram is its codes packed into one uint64 (64 // n
  bits each): a batch's n-grams are a few numpy operations on a (sequences, windows) array, and
  sorting each row gives the term frequencies;
- df lives in a numpy hash table (``ngrams.NgramTable``) that keeps only the n-grams of 2+ corpus
  entries (df 1 weighs like df 0), a few percent of them: small enough for the CPU's caches;
- the n-grams of each image's candidates and references are sorted together, one short row per
  image (``ngrams.group_by_ngram``): equal n-grams end side by side, which pairs each candidate's
  entry with the references' and lets a group share one idf lookup;
- with ``keys``, an image's references are vectorised once per call whatever its number of
  samples, and kept for later calls (``cache_size`` images, about 6 KB each).

Shapes: C candidates, G reference sets (images) in a call, J references per set (padded), n
orders, S sequences, L tokens (padded), W n-gram windows, M n-gram entries, R groups.
"""

from __future__ import annotations

import array
import itertools
from collections.abc import Hashable, Iterable, Sequence
from typing import NamedTuple, cast

import numpy as np
from numpy.typing import NDArray

from captioning.evaluation.ngrams import NgramTable, group_by_ngram, offsets, runs

Tokens = Sequence[Hashable]

_MAX_CANDIDATES = 4096  # per internal chunk of score(): bounds the join's memory (and rows < 2^15)
_CORPUS_CHUNK = 4096  # corpus entries per step of the df count
_MAX_ID_TABLE = 1 << 20  # int tokens below this also find their codes in an array (fast path)


class _Counts(NamedTuple):
    """The n-grams of S sequences and their counts: M entries sorted by (seq, key)."""

    seq: NDArray[np.int64]  # (M,) the entry's sequence
    key: NDArray[np.uint64]  # (M,) packed n-gram
    tf: NDArray[np.int64]  # (M,) term frequency
    length: NDArray[np.int64]  # (S,) pycocoevalcap's length: the number of bigrams


class _RefSet(NamedTuple):
    """One image's J references, scored and ready: what the cache keeps per key (about 6 KB)."""

    ref: NDArray[np.int32]  # (M,) the entry's reference, 0..J-1
    key: NDArray[np.uint64]  # (M,) an n-gram of that reference
    tf: NDArray[np.int32]  # (M,)
    idf: NDArray[np.float64]  # (M,)
    norm: NDArray[np.float64]  # (J, n) |v_k| per order
    length: NDArray[np.int64]  # (J,)


class CiderD:
    """CIDEr-D with document frequencies fixed at construction (SCST: computed once from the training references)."""

    def __init__(
        self, corpus: Iterable[Sequence[Tokens]], *, n: int = 4, sigma: float = 6.0, cache_size: int = 10_000
    ) -> None:
        """``corpus``: one entry per document (an image's references), whose n-grams' document
        frequencies are counted once here; ``n``, ``sigma``: CIDEr-D's (pycocoevalcap's defaults).

        ``cache_size``: reference sets kept by key between calls, oldest out first; about 6 KB
        each. They save 30-40% of a call whose images were seen before; an SCST epoch sees each
        image once, so that needs a cache as large as the training split (COCO's Karpathy train:
        113,287 images, about 0.7 GB). Within a call, an image's samples share its references'
        work whatever the cache.
        """
        if not 1 <= n <= 8:
            raise ValueError(f"n must be 1..8 (n-grams are packed into 64 bits), got {n}")
        self.n, self.sigma, self.cache_size = n, float(sigma), cache_size
        self._bits = 64 // n
        self._max_code = (1 << self._bits) - 1
        self._code: dict[Hashable, int] = {}  # token -> 1.., in order of first sight (0 pads)
        self._id_code = np.zeros(1024, np.uint64)  # the same for int tokens, as an array (0: unknown)
        self._cache: dict[Hashable, _RefSet] = {}  # key -> its references, oldest first
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
        """Forget the cached reference sets."""
        self._cache.clear()

    def score(
        self,
        candidates: Sequence[Tokens],
        references: Sequence[Sequence[Tokens]],
        keys: Sequence[Hashable] | None = None,
    ) -> NDArray[np.float64]:
        """CIDEr-D of each candidate against its references: (C,) float64.

        ``references[i]`` are candidate i's references. With ``keys`` (e.g. image ids), candidates
        with the same key share one computation of their references' vectors, which is also
        cached across calls: a key must always stand for the same references.
        """
        if len(references) != len(candidates):
            raise ValueError(f"{len(candidates)} candidates but {len(references)} reference lists")
        if keys is not None and len(keys) != len(candidates):
            raise ValueError(f"{len(candidates)} candidates but {len(keys)} keys")
        for i, refs in enumerate(references):
            if len(refs) == 0:
                raise ValueError(f"candidate {i} has an empty list of references")
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

        # Reference sets: one per distinct key (or per candidate), from the cache where possible.
        C = len(candidates)
        labels = range(C) if keys is None else keys
        set_of: dict[Hashable, int] = {}
        first: list[int] = []  # per set: the first candidate that has it
        for i, label in enumerate(labels):
            if label not in set_of:
                set_of[label] = len(set_of)
                first.append(i)
        group = np.fromiter(map(set_of.__getitem__, labels), np.int64, count=C)  # (C,) each one's set
        cache = self._cache if keys is not None else {}
        cached = [cache.get(label) for label in set_of]  # (G,)
        new = [g for g, ref_set in enumerate(cached) if ref_set is None]
        new_refs = [references[first[g]] for g in new]
        counts = self._count([*candidates, *itertools.chain.from_iterable(new_refs)])
        scores, made = self._score(counts, cached, new, [len(refs) for refs in new_refs], group)
        if keys is not None:
            label_of = list(set_of)
            self._remember([label_of[g] for g in new], made)
        return scores

    # --- n-grams ------------------------------------------------------------------------------------

    def _encode(self, seqs: Sequence[Tokens]) -> tuple[NDArray[np.uint64], NDArray[np.int64]]:
        """Token codes, (S, L) uint64 padded with 0, and the lengths (S,)."""
        for seq in seqs:
            if isinstance(seq, str):
                raise TypeError(
                    f"a caption is a sequence of tokens, not a string: split it first ({seq[:40]!r})"
                )
        lengths = np.fromiter(map(len, seqs), np.int64, count=len(seqs))  # (S,)
        flat = self._codes(list(itertools.chain.from_iterable(seqs)))
        S, L = len(seqs), int(lengths.max(initial=0))
        codes = np.zeros((S, L), np.uint64)
        codes[np.repeat(np.arange(S), lengths), offsets(lengths)] = flat
        return codes, lengths

    def _codes(self, tokens: list[Hashable]) -> NDArray[np.uint64]:
        """Each token's code; a new token gets the next one."""
        if tokens and type(tokens[0]) is int:  # vocabulary ids: one numpy gather if all are known
            try:  # array("q") takes ints only: anything else is a TypeError
                ids = np.frombuffer(array.array("q", cast("list[int]", tokens)), np.int64)
            except (TypeError, OverflowError):
                ids = np.zeros(0, np.int64)
            if ids.size and ids.min() >= 0 and ids.max() < self._id_code.size:
                codes = self._id_code[ids]
                if codes.all():
                    return codes
        code = self._code
        try:
            return np.fromiter(map(code.__getitem__, tokens), np.uint64, len(tokens))
        except KeyError:
            for token in tokens:
                if token not in code:
                    code[token] = len(code) + 1
                    if isinstance(token, int | np.integer) and 0 <= token < _MAX_ID_TABLE:
                        if token >= self._id_code.size:
                            grown = np.zeros(max(2 * self._id_code.size, int(token) + 1), np.uint64)
                            grown[: self._id_code.size] = self._id_code
                            self._id_code = grown
                        self._id_code[token] = code[token]
            if len(code) > self._max_code:
                raise ValueError(
                    f"more than {self._max_code} distinct tokens: with n = {self.n}, n-grams pack "
                    f"{self._bits} bits per token into 64"
                ) from None
            return np.fromiter(map(code.__getitem__, tokens), np.uint64, len(tokens))

    def _ngram_rows(self, codes: NDArray[np.uint64]) -> NDArray[np.uint64]:
        """Every window's packed n-gram, orders 1..n side by side: (S, W), 0 past the end."""
        key = codes  # order 1; then key | next token << bits, one order at a time
        rows = [codes]
        for k in range(1, self.n):
            last = codes[:, k:]  # (S, L - k): the window's last token
            key = key[:, :-1] | (last << np.uint64(self._bits * k))
            rows.append(np.where(last != 0, key, np.uint64(0)))
        return np.concatenate(rows, axis=1)  # (S, W = sum of L - k)

    def _order(self, key: NDArray[np.uint64]) -> NDArray[np.int64]:
        """0-based n-gram order of packed keys: the number of nonzero fields - 1."""
        order = np.zeros(key.shape, np.int64)
        for k in range(1, self.n):
            order += (key >> np.uint64(self._bits * k)) != 0
        return order

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
        cached: list[_RefSet | None],
        new: list[int],
        new_sizes: list[int],
        group: NDArray[np.int64],
    ) -> tuple[NDArray[np.float64], list[_RefSet]]:
        """Scores (C,) of the candidates against their sets ``group``, and the sets ``new`` made.

        ``counts``: the C candidates, then the references of the sets ``new`` (``new_sizes`` each);
        ``cached[g]``: set g from the cache, or None for the new ones.
        """
        n, G, C = self.n, len(cached), group.size
        sizes = np.array(new_sizes, np.int64)  # (new,)
        new_set = np.repeat(np.array(new, np.int64), sizes)  # (R,) each new reference's set and index
        new_ref = offsets(sizes)
        old = [ref_set for ref_set in cached if ref_set is not None]
        old_set = np.array([g for g, ref_set in enumerate(cached) if ref_set is not None], np.int64)

        # Every n-gram entry: the counted ones (candidates', new references'), then the cached sets'.
        # `who` is the candidate (>= 0) or -1 - the reference's index in its set; idf NaN: not known.
        num_counted = counts.key.size
        key = np.concatenate([counts.key, *(s.key for s in old)])  # (M,)
        tf = np.concatenate([counts.tf, *(s.tf for s in old)])
        idf = np.concatenate([np.full(num_counted, np.nan), *(s.idf for s in old)])
        row = np.concatenate(
            [np.concatenate([group, new_set])[counts.seq], np.repeat(old_set, [s.key.size for s in old])]
        )
        who = np.concatenate(
            [
                np.concatenate([np.arange(C), -1 - new_ref])[counts.seq],
                -1 - np.concatenate([new_ref[:0], *(s.ref for s in old)]),
            ]
        )

        # Group the entries of each set by n-gram (candidates first in a group). The idf of a
        # group comes from a cached reference in it, or from one lookup for the whole group.
        entry, run, start = group_by_ngram(key, row, who < 0, G)
        run_idf = np.full(start.size, np.nan)  # (R,)
        cached_at = np.flatnonzero(entry >= num_counted)  # positions of cached entries
        run_idf[run[cached_at]] = idf[entry[cached_at]]
        ask = np.flatnonzero(np.isnan(run_idf))
        run_idf[ask] = self._idf(key[entry[start[ask]]])
        idf[entry] = run_idf[run]
        value = tf * idf  # tf-idf
        order = self._order(key)

        # Norms of the counted sequences (candidates, new references); every set's norms and lengths.
        S = counts.length.size
        square = np.bincount(
            counts.seq * n + order[:num_counted], weights=value[:num_counted] ** 2, minlength=S * n
        )
        norm = np.sqrt(square).reshape(S, n)  # (S, n)
        old_sizes = np.array([s.length.size for s in old], np.int64)
        num_refs = np.zeros(G, np.int64)  # (G,)
        num_refs[new], num_refs[old_set] = sizes, old_sizes
        J = int(num_refs.max())
        ref_norm = np.zeros((G, J, n))
        ref_len = np.zeros((G, J), np.int64)
        ref_norm[new_set, new_ref], ref_len[new_set, new_ref] = norm[C:], counts.length[C:]
        if old:
            old_row, old_ref = np.repeat(old_set, old_sizes), offsets(old_sizes)
            ref_norm[old_row, old_ref] = np.concatenate([s.norm for s in old])
            ref_len[old_row, old_ref] = np.concatenate([s.length for s in old])

        # Every (candidate, reference) pair that shares an n-gram: in a group, each reference
        # entry meets each of the candidate entries at the group's head.
        is_cand = who[entry] >= 0
        seen = np.cumsum(is_cand)
        head = start[run]
        # the number of candidate entries from the group's head to here (all of the group's, for a reference)
        num_cands: NDArray[np.int64] = seen - (seen[head] - is_cand[head])
        hits = np.flatnonzero(~is_cand & (num_cands > 0))
        repeats: NDArray[np.int64] = num_cands[hits]
        e_ref = entry[np.repeat(hits, repeats)]
        e_cand = entry[np.repeat(head[hits], repeats) + offsets(repeats)]
        v_hyp, v_ref = value[e_cand], value[e_ref]
        clipped = np.minimum(v_hyp, v_ref) * v_ref  # pycocoevalcap's clipping
        index = (who[e_cand] * n + order[e_ref]) * J + (-1 - who[e_ref])
        val = np.bincount(index, weights=clipped, minlength=C * n * J).reshape(C, n, J)
        val = val.astype(np.float64, copy=False)  # bincount of nothing is int64, weights or not

        norm_hyp = norm[:C, :, None]  # (C, n, 1)
        norm_ref = ref_norm[group].transpose(0, 2, 1)  # (C, n, J)
        val = np.divide(val, norm_hyp * norm_ref, out=val, where=(norm_hyp != 0) & (norm_ref != 0))
        delta = (counts.length[:C, None] - ref_len[group]).astype(np.float64)  # (C, J)
        val *= np.exp(-(delta**2) / (2 * self.sigma**2))[:, None, :]
        # Padded reference slots hold zeros: no hits, norms 0. Sum over references, mean over orders.
        scores = val.sum(axis=2).mean(axis=1) / num_refs[group] * 10.0

        # The new sets, for the cache: their part of the arrays copied out, and views of those.
        lo = int(np.searchsorted(counts.seq, C))
        ref_seq = counts.seq[lo:num_counted] - C  # (Mr,) the new reference, 0..R-1
        ref, ref_key = new_ref[ref_seq].astype(np.int32), counts.key[lo:num_counted].copy()
        ref_tf, ref_idf = counts.tf[lo:num_counted].astype(np.int32), idf[lo:num_counted].copy()
        ref_norm_all, ref_len_all = norm[C:].copy(), counts.length[C:].copy()
        ends = np.cumsum(sizes)
        bounds = np.searchsorted(ref_seq, np.append(0, ends)).tolist()
        made = [
            _RefSet(ref[a:b], ref_key[a:b], ref_tf[a:b], ref_idf[a:b], ref_norm_all[f:g], ref_len_all[f:g])
            for a, b, f, g in zip(
                bounds[:-1], bounds[1:], (ends - sizes).tolist(), ends.tolist(), strict=True
            )
        ]
        return scores, made

    def _remember(self, keys: list[Hashable], ref_sets: list[_RefSet]) -> None:
        if self.cache_size <= 0:
            return
        for key, ref_set in zip(keys, ref_sets, strict=True):
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
