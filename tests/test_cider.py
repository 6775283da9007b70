"""The fast CIDEr-D (``captioning.evaluation.cider``) against pycocoevalcap's, score for score.

pycocoevalcap 1.2 is the independent reference: ``Cider().compute_score`` on space-joined
strings for ``cider_d`` (document frequencies from the references scored); for ``CiderD`` with a
corpus of its own, pycocoevalcap's ``CiderScorer`` given that corpus's document frequencies
(``FixedDfCiderScorer``: its ``compute_cider`` unchanged). Scores agree to 1e-9.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.cider.cider_scorer import CiderScorer, cook_refs, cook_test

from captioning.evaluation import cider as cider_module
from captioning.evaluation import ngrams
from captioning.evaluation.cider import CiderD, PreparedSize, Tokens, cider_d, estimate_prepared_bytes

TOL = 1e-9


# --- the reference --------------------------------------------------------------------------------


def text(tokens: Tokens) -> str:
    return " ".join(map(str, tokens))


def reference_cider(
    candidates: list[list[Any]], references: list[list[list[Any]]], n: int = 4, sigma: float = 6.0
) -> tuple[float, np.ndarray]:
    """pycocoevalcap's Cider; every entry under a key of its own (an image may come back)."""
    res = {i: [text(c)] for i, c in enumerate(candidates)}
    gts = {i: [text(r) for r in refs] for i, refs in enumerate(references)}
    mean, scores = Cider(n=n, sigma=sigma).compute_score(gts, res)
    return float(mean), np.asarray(scores)


class FixedDfCiderScorer(CiderScorer):
    """pycocoevalcap's CiderScorer with document frequencies (and ref_len) from a corpus."""

    def __init__(self, corpus: list[list[list[Any]]], n: int = 4, sigma: float = 6.0) -> None:
        counter = CiderScorer(n=n, sigma=sigma)
        for refs in corpus:
            counter += (None, [text(r) for r in refs])
        counter.compute_doc_freq()
        super().__init__(n=n, sigma=sigma)
        self.document_frequency = counter.document_frequency
        self._fixed_ref_len = float(np.log(float(len(corpus))))

    @property
    def ref_len(self) -> float:
        return self._fixed_ref_len

    @ref_len.setter
    def ref_len(self, value: Any) -> None:
        """``compute_cider`` sets log(#entries scored): the corpus's value stays."""


def reference_with_corpus(
    corpus: list[list[list[Any]]], candidates: list[list[Any]], references: list[list[list[Any]]]
) -> np.ndarray:
    scorer = FixedDfCiderScorer(corpus)
    for c, refs in zip(candidates, references, strict=True):
        scorer += (text(c), [text(r) for r in refs])
    return np.asarray(scorer.compute_cider())


def assert_scores(actual: np.ndarray, expected: np.ndarray) -> None:
    assert actual.dtype == np.float64 and actual.shape == expected.shape
    np.testing.assert_allclose(actual, expected, rtol=0, atol=TOL)


# --- random cases ---------------------------------------------------------------------------------


def random_caption(rng: random.Random, vocab: int, max_len: int, min_len: int = 1) -> list[int]:
    return [rng.randrange(vocab) for _ in range(rng.randint(min_len, max_len))]


def random_case(seed: int) -> tuple[list[list[int]], list[list[list[int]]]]:
    """Candidates and their references: small vocabularies (repeats, shared n-grams), lengths from
    1 (0 at times), candidates longer than their references, candidates that share nothing, 1-6
    references per image, and images that come back (the same references, scored again)."""
    rng = random.Random(seed)
    vocab = rng.choice([3, 8, 30, 1000])
    images = [
        [random_caption(rng, vocab, 9) for _ in range(rng.randint(1, 6))] for _ in range(rng.randint(1, 8))
    ]
    candidates, references = [], []
    for _ in range(rng.randint(1, 14)):
        refs = rng.choice(images)
        kind = rng.random()
        if kind < 0.15:
            cand = [10_000 + rng.randrange(50) for _ in range(rng.randint(1, 6))]  # no overlap
        elif kind < 0.3:
            cand = random_caption(rng, vocab, 20, min_len=10)  # longer than the references
        elif kind < 0.4:
            cand = [rng.randrange(vocab)] * rng.randint(1, 8)  # one token, repeated
        elif kind < 0.45:
            cand = []
        else:
            cand = random_caption(rng, vocab, 12)
        candidates.append(cand)
        references.append(refs)
    return candidates, references


@pytest.mark.parametrize("seed", range(80))
def test_cider_d_equals_pycocoevalcap(seed: int) -> None:
    candidates, references = random_case(seed)
    mean, scores = cider_d(candidates, references)
    expected_mean, expected = reference_cider(candidates, references)
    assert isinstance(mean, float) and abs(mean - expected_mean) <= TOL
    assert_scores(scores, expected)


@pytest.mark.parametrize("sigma", [1.0, 3.0, 10.0])
def test_other_sigmas(sigma: float) -> None:
    for seed in range(8):
        candidates, references = random_case(100 + seed)
        scores = CiderD(references, sigma=sigma).score(candidates, references)
        assert_scores(scores, reference_cider(candidates, references, sigma=sigma)[1])


class OrderNCiderScorer(CiderScorer):
    """pycocoevalcap's CiderScorer with its ``n`` passed on to the n-gram counting.

    Its own ``cook_append`` calls ``cook_refs(refs)`` and ``cook_test(test)`` with their default,
    n = 4, whatever ``n`` the scorer has: n < 4 fails with an IndexError, n > 4 counts 4-grams at
    most and averages in empty orders.
    """

    def cook_append(self, test: str | None, refs: list[str] | None) -> None:
        if refs is not None:
            self.crefs.append(cook_refs(refs, self.n))
            self.ctest.append(None if test is None else cook_test(test, self.n))


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_other_orders(n: int) -> None:
    """n = 1 has no bigrams, hence pycocoevalcap's "length" is 0 and there is no length penalty."""
    for seed in range(8):
        candidates, references = random_case(200 + seed)
        reference = OrderNCiderScorer(n=n)
        for c, refs in zip(candidates, references, strict=True):
            reference += (text(c), [text(r) for r in refs])
        scores = CiderD(references, n=n).score(candidates, references)
        assert_scores(scores, reference.compute_score()[1])


def test_tokens_are_opaque() -> None:
    """Ints, numpy ints, huge or negative ints, words: only equality matters."""
    candidates, references = random_case(7)
    expected = cider_d(candidates, references)[1]
    as_words = (
        [[f"w{t}" for t in c] for c in candidates],
        [[[f"w{t}" for t in r] for r in refs] for refs in references],
    )
    as_numpy = [list(np.array(c, np.int64)) for c in candidates], references
    shifted = (
        [[t * 10**12 - 5 for t in c] for c in candidates],
        [[[t * 10**12 - 5 for t in r] for r in refs] for refs in references],
    )
    for cands, refs in (as_words, as_numpy, shifted):
        np.testing.assert_array_equal(cider_d(cands, refs)[1], expected)


def test_mixed_tokens_and_empty_captions() -> None:
    """Ints with a word among them take the general path; nothing but empty captions scores 0."""
    corpus = [[[1, 2, 3], [2, 3, 4]], [[5, 6]]]
    mixed = CiderD([[[1, "two", 3], ["two", 3, 4]], [[5, 6]]])
    as_ints = CiderD(corpus)
    np.testing.assert_array_equal(
        mixed.score([[1, "two", 3, 9]], [[[1, "two", 3], ["two", 3, 4]]]),
        as_ints.score([[1, 2, 3, 9]], [corpus[0]]),
    )
    np.testing.assert_array_equal(CiderD([[[]]]).score([[], []], [[[]], [[], []]]), [0.0, 0.0])


def test_images_never_meet() -> None:
    """An n-gram at the end of one image's row and the start of the next stays in its image."""
    candidates: list[list[int]] = [[7], [], [7, 7]]
    references: list[list[list[int]]] = [[[]], [[7]], [[8]]]
    expected = reference_cider(candidates, references)[1]
    assert_scores(cider_d(candidates, references)[1], expected)
    np.testing.assert_array_equal(expected, [0.0, 0.0, 0.0])


# --- real captions ----------------------------------------------------------------------------------

IMAGES = [
    (
        [
            "a man riding a wave on top of a surfboard",
            "a surfer rides a large wave in the ocean",
            "a person on a surfboard riding a wave",
            "a man is surfing on a big blue wave",
            "surfer in a black wetsuit catching a wave",
        ],
        ["a man riding a wave on a surfboard", "a surfer in the ocean", "a dog sitting on a couch"],
    ),
    (
        [
            "a plate of food with broccoli and rice",
            "a white plate topped with rice and vegetables",
            "a meal of chicken rice and broccoli on a plate",
            "a close up of a plate of food on a table",
        ],
        ["a plate of rice and broccoli", "a plate of food on a table on a table", "food"],
    ),
    (
        [
            "two giraffes standing next to each other in a field",
            "a couple of giraffes standing in the grass",
            "two giraffes in a grassy field near trees",
            "giraffes eating leaves from the trees in a zoo",
            "two tall giraffes standing in a fenced enclosure",
        ],
        ["two giraffes standing in a field", "a giraffe", "a group of zebras grazing in a field"],
    ),
    (
        [
            "a red double decker bus driving down a street",
            "a double decker bus on a city street",
            "a red bus is parked on the side of the road",
        ],
        ["a red bus driving down the street", "a bus", "a red double decker bus driving down a street"],
    ),
    (
        [
            "a cat laying on top of a laptop computer",
            "a black and white cat sleeping on a keyboard",
            "a cat is sitting on a laptop on a desk",
            "a kitten resting on an open laptop",
            "the cat lies across the keys of the computer",
        ],
        ["a cat sitting on a laptop", "a cat laying on a laptop computer on a desk", "a man holding a kite"],
    ),
    (
        [
            "a group of people flying kites in a park",
            "several kites flying in the sky over a field",
            "people standing in a field flying colorful kites",
        ],
        ["a group of people flying kites", "a kite in the sky", "a person flying a kite on a beach"],
    ),
]


def test_real_captions_as_words() -> None:
    candidates, references = [], []
    for refs, cands in IMAGES:
        for cand in cands:
            candidates.append(cand.split())
            references.append([r.split() for r in refs])
    mean, scores = cider_d(candidates, references)
    expected_mean, expected = reference_cider(candidates, references)
    assert abs(mean - expected_mean) <= TOL
    assert_scores(scores, expected)
    assert scores[0] > scores[1] > scores[2]  # sanity: the matching caption wins


# --- fixed document frequencies and the cache ------------------------------------------------------


@pytest.mark.parametrize("seed", range(12))
def test_fixed_corpus_equals_pycocoevalcap_with_that_df(seed: int) -> None:
    """Document frequencies from a corpus other than the references scored (which may or may
    not be in it), as in SCST; with keys (twice: the second from the cache) and without."""
    rng = random.Random(1000 + seed)
    vocab = rng.choice([5, 20, 200])
    corpus = [
        [random_caption(rng, vocab, 10) for _ in range(rng.randint(1, 5))] for _ in range(rng.randint(2, 30))
    ]
    unseen = [[random_caption(rng, vocab + 3, 10) for _ in range(rng.randint(1, 5))] for _ in range(5)]
    image_ids = [rng.randrange(len(corpus) + len(unseen)) for _ in range(rng.randint(1, 25))]
    references = [(corpus + unseen)[i] for i in image_ids]
    candidates = [random_caption(rng, vocab + 3, 14) for _ in image_ids]

    expected = reference_with_corpus(corpus, candidates, references)
    scorer = CiderD(corpus)
    without = scorer.score(candidates, references)
    first = scorer.score(candidates, references, keys=image_ids)
    second = scorer.score(candidates, references, keys=image_ids)
    assert_scores(without, expected)
    np.testing.assert_array_equal(first, without)
    np.testing.assert_array_equal(second, first)
    # A batch of only some of those images, in another order, from the cache as well.
    some = list(range(len(image_ids)))[::-2]
    again = scorer.score(
        [candidates[i] for i in some], [references[i] for i in some], [image_ids[i] for i in some]
    )
    np.testing.assert_array_equal(again, first[some])


def test_larger_corpus_with_keys() -> None:
    """A corpus where many n-grams have df >= 2 (a fuller df table), SCST-shaped batches."""
    rng = random.Random(5)
    corpus = [[random_caption(rng, 40, 12, min_len=4) for _ in range(5)] for _ in range(300)]
    scorer = CiderD(corpus)
    for _ in range(2):  # the second batch meets some images in the cache
        images = [rng.randrange(300) for _ in range(20)]
        image_of = [i for i in images for _ in range(5)]
        references = [corpus[i] for i in image_of]
        candidates = [random_caption(rng, 45, 14) for _ in image_of]
        expected = reference_with_corpus(corpus, candidates, references)
        assert_scores(scorer.score(candidates, references, keys=image_of), expected)
        assert_scores(scorer.score(candidates, references), expected)


def test_cache_size_and_clear() -> None:
    candidates, references = random_case(3)
    keys = list(range(len(candidates)))
    scorer = CiderD(references, cache_size=2)
    expected = scorer.score(candidates, references)
    np.testing.assert_array_equal(scorer.score(candidates, references, keys), expected)
    assert len(scorer._cache) == min(2, len(keys))
    scorer.clear_cache()
    assert not scorer._cache
    np.testing.assert_array_equal(
        CiderD(references, cache_size=0).score(candidates, references, keys), expected
    )


def test_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Large calls are scored in chunks of candidates: the same values, with keys or without."""
    candidates, references = random_case(11)
    candidates, references = candidates * 3, references * 3
    expected = CiderD(references).score(candidates, references)
    monkeypatch.setattr(cider_module, "_MAX_CANDIDATES", 4)
    scorer = CiderD(references)
    np.testing.assert_array_equal(scorer.score(candidates, references), expected)
    keys = [i % (len(candidates) // 3) for i in range(len(candidates))]  # an image's key, 3 times
    np.testing.assert_array_equal(scorer.score(candidates, references, keys), expected)


# --- prepared reference sets ------------------------------------------------------------------------


def count_sequences(scorer: CiderD, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """From now on, the number of sequences each n-gram count of ``scorer`` takes."""
    counted: list[int] = []
    count = scorer._count

    def counting(seqs: Sequence[Tokens]) -> Any:
        counted.append(len(seqs))
        return count(seqs)

    monkeypatch.setattr(scorer, "_count", counting)
    return counted


def prepared_case(seed: int) -> tuple[list[list[list[int]]], list[int], list[list[int]]]:
    """A corpus, and SCST-like batches' image ids (some images twice, some unseen) and candidates."""
    rng = random.Random(3000 + seed)
    vocab = rng.choice([5, 20, 200])
    corpus = [
        [random_caption(rng, vocab, 10) for _ in range(rng.randint(1, 5))] for _ in range(rng.randint(2, 40))
    ]
    image_ids = [i for i in rng.choices(range(len(corpus)), k=rng.randint(1, 12)) for _ in range(3)]
    candidates = [random_caption(rng, vocab + 3, 14) for _ in image_ids]
    return corpus, image_ids, candidates


@pytest.mark.parametrize("seed", range(12))
def test_prepared_equals_unprepared_and_pycocoevalcap(seed: int) -> None:
    """Prepared in chunks of 1, 3 or all sets: the same scores as without, and as the reference."""
    corpus, image_ids, candidates = prepared_case(seed)
    references = [corpus[i] for i in image_ids]
    expected = reference_with_corpus(corpus, candidates, references)
    unprepared = CiderD(corpus, cache_size=0)
    without = unprepared.score(candidates, references, keys=image_ids)
    assert_scores(without, expected)
    for chunk_size in (1, 3, 4096):
        scorer = CiderD(corpus, cache_size=0)
        scorer.prepare(range(len(corpus)), corpus, chunk_size=chunk_size)
        assert scorer.prepared_size.sets == len(corpus)
        assert_scores(scorer.score(candidates, references, keys=image_ids), expected)
        np.testing.assert_allclose(
            scorer.score(candidates, references, keys=image_ids), without, rtol=0, atol=1e-12
        )


def test_prepared_cached_and_new_sets_in_one_call() -> None:
    """Keys prepared, cached (seen in an earlier call) and new, mixed in one batch, in any order."""
    corpus, image_ids, candidates = prepared_case(5)
    corpus = [*corpus, [[1, 2, 3], [2, 3]], [[4, 4, 4, 4]], [[7]]]
    n = len(corpus)
    image_ids = [n - 1, *image_ids, n - 3, n - 2, n - 3]
    candidates = [[7, 7], *candidates, [1, 2, 3], [4, 4], [2, 3, 9]]
    references = [corpus[i] for i in image_ids]
    scorer = CiderD(corpus)
    scorer.prepare(range(n - 3), corpus[: n - 3], chunk_size=2)
    scorer.score([[1]], [corpus[n - 2]], keys=[n - 2])  # cached
    assert list(scorer._cache) == [n - 2]
    got = scorer.score(candidates, references, keys=image_ids)
    assert_scores(got, reference_with_corpus(corpus, candidates, references))
    assert set(scorer._cache) == {n - 3, n - 2, n - 1}  # the prepared ones never enter the cache


@pytest.mark.parametrize("cache_size", [0, 1])
def test_prepared_sets_are_never_evicted(cache_size: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """However small the cache and however many other keys come by, prepared sets stay and are not
    vectorised again: only the candidates are counted."""
    corpus, image_ids, candidates = prepared_case(2)
    references = [corpus[i] for i in image_ids]
    scorer = CiderD(corpus, cache_size=cache_size)
    scorer.prepare(range(len(corpus)), corpus)
    first = scorer.score(candidates, references, keys=image_ids)
    for key in range(100):  # other keys through the cache
        scorer.score([[1, 2]], [corpus[key % len(corpus)]], keys=[("other", key)])
    assert len(scorer._cache) == cache_size
    scorer.clear_cache()
    counted = count_sequences(scorer, monkeypatch)
    np.testing.assert_array_equal(scorer.score(candidates, references, keys=image_ids), first)
    assert counted == [len(candidates)] and not scorer._cache


def test_prepare_again_adds_and_skips() -> None:
    """A second prepare() keeps the sets of the first (copied once), adds new keys, skips known ones."""
    corpus, image_ids, candidates = prepared_case(7)
    references = [corpus[i] for i in image_ids]
    expected = reference_with_corpus(corpus, candidates, references)
    half = len(corpus) // 2
    scorer = CiderD(corpus)
    scorer.prepare(range(half), corpus[:half])
    size = scorer.prepared_size
    scorer.prepare(range(half), corpus[:half])  # all known: nothing changes
    assert scorer.prepared_size == size
    scorer.prepare(range(len(corpus)), corpus, chunk_size=2)
    assert scorer.prepared_size.sets == len(corpus)
    assert_scores(scorer.score(candidates, references, keys=image_ids), expected)
    assert not scorer._cache


def test_prepared_size_grows_with_the_corpus() -> None:
    """Bytes, sets and entries: positive, and growing with the number and length of references."""
    rng = random.Random(9)
    corpus = [[random_caption(rng, 50, 12, min_len=4) for _ in range(5)] for _ in range(200)]
    sizes = []
    for images in (10, 100, 200):
        scorer = CiderD(corpus)
        scorer.prepare(range(images), corpus[:images])
        sizes.append(scorer.prepared_size)
    assert CiderD(corpus).prepared_size.sets == 0
    for small, large in itertools.pairwise(sizes):
        assert 0 < small.sets < large.sets and 0 < small.entries < large.entries
        assert 0 < small.entry_bytes < large.entry_bytes and 0 < small.set_bytes < large.set_bytes
    last = sizes[-1]
    assert last.nbytes == last.entry_bytes + last.set_bytes
    assert last.entry_bytes == 24 * last.entries  # key, idf, tf, reference index
    windows = sum(max(0, len(r) - k) for refs in corpus for r in refs for k in range(4))
    assert last.entries <= windows  # distinct n-grams per reference, at most one per window


def test_estimate_prepared_bytes() -> None:
    """Entries per reference as n-gram windows: sum over k of max(0, words - k + 1)."""
    measured = PreparedSize(sets=10, entries=1000, entry_bytes=24_000, set_bytes=3_000)
    # 2 images x 3 references of 5 words: 5 + 4 + 3 + 2 = 14 windows each, 84 entries
    assert estimate_prepared_bytes(measured, 2, 3, 5) == 84 * 24 + 2 * 300
    assert estimate_prepared_bytes(measured, 1, 1, 2) == (2 + 1) * 24 + 300  # no 3- or 4-grams
    coco = estimate_prepared_bytes(measured)  # 113,287 x 5 x (10.5 + 9.5 + 8.5 + 7.5) = 36 a reference
    assert coco == 113_287 * 5 * 36 * 24 + 113_287 * 300
    with pytest.raises(ValueError, match="nothing prepared"):
        estimate_prepared_bytes(PreparedSize(0, 0, 0, 0))


def test_bitmaps_have_no_false_negatives() -> None:
    """Every stored entry whose (set, n-gram) pair a candidate has is let through the join; most
    others are not."""
    rng = np.random.default_rng(0)
    shared = rng.integers(1, 2**63, 500, dtype=np.uint64)
    cand_key = np.concatenate([shared, rng.integers(1, 2**63, 2000, dtype=np.uint64)])
    ref_key = np.concatenate([shared, rng.integers(1, 2**63, 2000, dtype=np.uint64)])
    cand_row, ref_row = rng.integers(0, 50, 2500), rng.integers(0, 50, 2500)
    ref_row[:500] = cand_row[:500]
    ref_key[600:700], ref_row[600:700] = cand_key[600:700], (cand_row[600:700] + 1) % 50  # other sets
    kept = ngrams.may_meet(cand_key, cand_row, ref_key, ref_row, 50)
    assert np.all(np.diff(kept) > 0) and np.isin(np.arange(500), kept).all()
    assert np.count_nonzero(kept >= 500) < 0.2 * 2000  # of 2000 unrelated pairs and 100 of other sets


def test_prepare_errors() -> None:
    scorer = CiderD([[[1, 2]], [[3]]])
    with pytest.raises(ValueError, match="2 keys but 1 reference lists"):
        scorer.prepare([0, 1], [[[1, 2]]])
    with pytest.raises(ValueError, match="key 1 has an empty list of references"):
        scorer.prepare([0, 1], [[[1, 2]], []])
    with pytest.raises(ValueError, match="chunk_size must be"):
        scorer.prepare([0], [[[1, 2]]], chunk_size=0)
    scorer.prepare([0], [[[1, 2]]])
    with pytest.raises(ValueError, match="key 0 has 2 references here but 1 when it was stored"):
        scorer.score([[1]], [[[1, 2], [3]]], keys=[0])


def test_properties() -> None:
    corpus = [[[1, 2, 3], [1, 2]], [[2, 3, 4]], [[1, 2]]]
    scorer = CiderD(corpus)
    reference = FixedDfCiderScorer(corpus)
    assert scorer.num_documents == 3
    assert scorer.log_ref_len == reference.ref_len
    assert scorer.num_ngrams == len(reference.document_frequency) == 9  # 1 2 3 4, 12 23 34, 123 234
    assert scorer.vocabulary_size == 4
    assert scorer.score([], []).shape == (0,)


def test_hash_collisions_are_regrouped() -> None:
    """Two keys of a row whose hashes agree still end up in separate groups, each sorted by entry."""
    inverse = pow(int(ngrams.FIBONACCI), -1, 2**64)
    a = 0x0001_0002_0003_0004
    b = (a + inverse) % 2**64  # b * FIBONACCI = a * FIBONACCI + 1: the same high bits
    key = np.array([b, a, a, b, a, a, b], np.uint64)
    row = np.array([0, 0, 0, 0, 0, 1, 1])
    entry, start, group = ngrams.group_by_ngram(key, row, 2)
    assert sorted(entry.tolist()) == list(range(7)) and start.size == 4
    members = np.split(entry, start[1:])
    assert sorted(m.tolist() for m in members) == [[0, 3], [1, 2, 4], [5], [6]]
    for g, m in enumerate(members):
        assert (group[m] == g).all() and len(set(key[m].tolist())) == 1 and len(set(row[m].tolist())) == 1


@pytest.mark.parametrize("seed", range(4))
def test_group_by_ngram_matches_a_dict(seed: int) -> None:
    """Groups are the distinct (row, key) pairs, rows in order, entries ascending in each; one row
    or thousands, a few entries or many."""
    rng = np.random.default_rng(seed)
    num_rows = [1, 7, 4096, 4096][seed]
    M = [50, 3000, 20_000, 3][seed]
    key = rng.choice(rng.integers(1, 2**63, 40, dtype=np.uint64), M)  # few keys: many repeats
    row = rng.integers(0, num_rows, M)
    expected: dict[tuple[int, int], list[int]] = {}
    for i, (r, k) in enumerate(zip(row.tolist(), key.tolist(), strict=True)):
        expected.setdefault((r, k), []).append(i)
    entry, start, group = ngrams.group_by_ngram(key, row, num_rows)
    members = [m.tolist() for m in np.split(entry, start[1:])]
    assert sorted(members) == sorted(expected.values())
    assert all(m == sorted(m) for m in members)
    assert np.all(np.diff(row[entry[start]]) >= 0)
    assert np.array_equal(group[entry], np.repeat(np.arange(start.size), np.diff(np.append(start, M))))


def test_group_by_ngram_few_hash_bits() -> None:
    """With three bits of hash left, most keys of a row collide: they are sorted apart all the same."""
    rng = np.random.default_rng(5)
    key = rng.integers(1, 2**63, 200, dtype=np.uint64)
    key = np.concatenate([key, key[:50]])
    row = np.zeros(key.size, np.int64)
    entry, start, _ = ngrams.group_by_ngram(key, row, 2**53)  # 53 bits of row, 8 of index
    members = np.split(entry, start[1:])
    assert len(members) == 200 and all(len(set(key[m].tolist())) == 1 for m in members)
    assert sorted(len(m) for m in members) == [1] * 150 + [2] * 50


@pytest.mark.parametrize("size", [0, 1, 3, 1000, 30_000])
def test_ngram_table_matches_a_dict(size: int) -> None:
    """Lookups of present and absent keys, in a table small enough that slots are shared."""
    rng = np.random.default_rng(size)
    keys = np.unique(rng.integers(1, 2**63, size, dtype=np.uint64))
    rng.shuffle(keys)
    values = rng.random(keys.size)
    table = ngrams.NgramTable(keys, values)
    queries = np.concatenate([keys, rng.integers(1, 2**63, 2000, dtype=np.uint64), keys[:10]])
    rng.shuffle(queries)
    expected = dict(zip(keys.tolist(), values.tolist(), strict=True))
    got = table.get(queries, default=-1.0)
    assert got.tolist() == [expected.get(q, -1.0) for q in queries.tolist()]
    assert table.get(np.zeros(0, np.uint64)).shape == (0,)


def test_ngram_table_keys_in_one_slot() -> None:
    """Keys that all hash to the same slot (and past the end of the table) probe on to theirs."""
    inverse = pow(int(ngrams.FIBONACCI), -1, 2**64)
    # k * FIBONACCI = 2^64 - j for small j: the last slot, whatever the table's size
    keys = np.array([(-j * inverse) % 2**64 for j in range(1, 9)], np.uint64)
    table = ngrams.NgramTable(keys, np.arange(8.0))
    assert table.get(keys).tolist() == list(range(8))
    absent = np.array([(-j * inverse) % 2**64 for j in range(9, 20)], np.uint64)  # same slot, absent
    assert (table.get(absent, 7.5) == 7.5).all()


def test_runs_counts_each_rows_keys() -> None:
    """Distinct nonzero keys and counts per row, on rows sorted in blocks (zeros at each block's start)."""
    rows = np.array([[0, 0, 3, 3, 5, 0, 7, 7, 7], [1, 1, 1, 1, 1, 0, 0, 0, 0], [0] * 9], np.uint64)
    row, key, count = ngrams.runs(rows)
    assert row.tolist() == [0, 0, 0, 1] and key.tolist() == [3, 5, 7, 1] and count.tolist() == [2, 1, 3, 5]
    assert all(a.size == 0 for a in ngrams.runs(np.zeros((3, 0), np.uint64)))


# --- errors ----------------------------------------------------------------------------------------


def test_errors() -> None:
    scorer = CiderD([[[1, 2, 3]]])
    with pytest.raises(ValueError, match="2 candidates but 1 reference lists"):
        scorer.score([[1], [2]], [[[1]]])
    with pytest.raises(ValueError, match="1 candidates but 2 keys"):
        scorer.score([[1]], [[[1]]], keys=[0, 1])
    with pytest.raises(ValueError, match="candidate 1 has an empty list of references"):
        scorer.score([[1], [2]], [[[1]], []])
    with pytest.raises(TypeError, match="split it first"):
        scorer.score(["a cat"], [[["a", "cat"]]])
    with pytest.raises(ValueError, match="non-empty corpus"):
        CiderD([])
    with pytest.raises(ValueError, match="corpus entry 1 has no references"):
        CiderD([[[1]], []])
    with pytest.raises(ValueError, match="n must be"):
        CiderD([[[1]]], n=0)
    with pytest.raises(ValueError, match="distinct tokens"):
        CiderD([[list(range(300))]], n=8)  # 8 bits per token
    with pytest.raises(ValueError, match="2 candidates but 1 reference lists"):
        cider_d([[1], [2]], [[[1]]])
    with pytest.raises(ValueError, match="at least one candidate"):
        cider_d([], [])


def test_reference_quirk_same_image_twice_counts_twice() -> None:
    """Document frequencies count entries, not images: listing an image twice changes scores."""
    a, b, c = [[1, 2, 3], [1, 2, 4]], [[3, 7, 8]], [[9, 9]]  # "3" is in a and b
    once = cider_d([[1, 2, 3], [7], [9]], [a, b, c])[1]
    twice = cider_d([[1, 2, 3], [7], [9], [1, 2, 3]], [a, b, c, a])[1]
    assert abs(once[0] - twice[0]) > 1e-3 and twice[0] == twice[3]
    assert_scores(twice, reference_cider([[1, 2, 3], [7], [9], [1, 2, 3]], [a, b, c, a])[1])
