"""The fast CIDEr-D (``captioning.evaluation.cider``) against pycocoevalcap's, score for score.

pycocoevalcap 1.2 is the independent reference: ``Cider().compute_score`` on space-joined
strings for ``cider_d`` (document frequencies from the references scored); for ``CiderD`` with a
corpus of its own, pycocoevalcap's ``CiderScorer`` given that corpus's document frequencies
(``FixedDfCiderScorer``: its ``compute_cider`` unchanged). Scores agree to 1e-9.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import pytest
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.cider.cider_scorer import CiderScorer, cook_refs, cook_test

from captioning.evaluation import cider as cider_module
from captioning.evaluation import ngrams
from captioning.evaluation.cider import CiderD, Tokens, cider_d

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
    """Two keys whose hashes agree under the first multiplier still end up in separate groups."""
    inverse = pow(int(ngrams.FIBONACCI), -1, 2**64)
    a = 0x0001_0002_0003_0004
    b = (a + inverse) % 2**64  # b * multiplier = a * multiplier + 1: the same high bits
    key = np.array([a, b, a, b, a], np.uint64)
    is_ref = np.array([False, False, True, True, True])
    entry, group, start = ngrams.group_by_ngram(key, np.zeros(5, np.int64), is_ref, 1)
    assert sorted(entry.tolist()) == [0, 1, 2, 3, 4] and start.size == 2
    for g in range(2):
        members = entry[group == g]
        assert len(set(key[members].tolist())) == 1
        assert not is_ref[members[0]]  # the candidate's entry first


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
