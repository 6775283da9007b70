"""Fast CIDEr-D vs pycocoevalcap's CiderScorer on SCST batches: same df, same scores.

The batch is SCST's: --images images x --samples sampled captions each, every image with --refs
references; token ids from a --vocab vocabulary drawn Zipf-like (a few very common words, as in
real captions), captions of --min-len..--max-len ids. The images belong to a training corpus of
--corpus images (5 references each) from which both scorers take their document frequencies, so
the values are comparable. A sample is one of its image's references with 30% of its ids
replaced and its length changed by -2..+2, so that the scores are not all zero.

- reference: pycocoevalcap 1.2's ``CiderScorer`` with that df (``compute_cider`` itself
  unchanged; ``ref_len`` held at log(corpus size)), fed the batch as space-joined strings (made
  outside the timing) and computing everything per call, as it does;
- fast, cold: ``CiderD.score(samples, refs, keys)`` with keys never seen before: every
  reference set is vectorised in the call, once per image (the headline figure);
- fast, warm: the same call again, right after: references from the key cache (a later SCST
  epoch, if the cache holds the training split) and the CPU caches warm from the cold call
  (flushed, as a training step in between would, it takes about as long as the cold one);
- fast, no keys: each sample's references vectorised on their own (the evaluation path).

Each repetition runs all of them on a fresh batch (new samples, new images), one after the
other, so that other load on the machine hits them alike, the reference first: the fast cold
call finds the CPU caches full of the reference's data (its df alone is a dict of some 10^6
tuples), as it would after a training step. Every score is compared with the reference's. The speedups per batch are reference
seconds over fast seconds; their median is robust to the odd preemption, which on a busy
2-core machine costs a 3 ms call far more than a 150 ms one. Last line:
``RESULT cider_speedup=X max_abs_diff=D cider_speedup_warm=Y`` (medians; goal >= 30). Run::

    .venv/bin/python benchmarks/cider.py              # 50 images x 5 samples, 30 repetitions
    .venv/bin/python benchmarks/cider.py --repeats 100 --corpus 20000
"""

from __future__ import annotations

import argparse
import os
import time
from collections import defaultdict
from typing import Any

import numpy as np
from pycocoevalcap.cider.cider_scorer import CiderScorer

from captioning.evaluation.cider import CiderD


class FixedDfCiderScorer(CiderScorer):
    """pycocoevalcap's CiderScorer with document frequencies (and ref_len) from a corpus."""

    def __init__(self, document_frequency: defaultdict[tuple[str, ...], float], ref_len: float) -> None:
        super().__init__()
        self.document_frequency = document_frequency
        self._fixed_ref_len = ref_len

    @property
    def ref_len(self) -> float:
        return self._fixed_ref_len

    @ref_len.setter
    def ref_len(self, value: Any) -> None:
        """``compute_cider`` sets log(#entries of this batch): the corpus's value stays."""


def make_caption(rng: np.random.Generator, p: np.ndarray, min_len: int, max_len: int) -> list[int]:
    return rng.choice(p.size, size=int(rng.integers(min_len, max_len + 1)), p=p).tolist()


def make_sample(rng: np.random.Generator, ref: list[int], p: np.ndarray, min_len: int) -> list[int]:
    sample = [int(rng.choice(p.size, p=p)) if rng.random() < 0.3 else t for t in ref]
    change = int(rng.integers(-2, 3))
    if change < 0:
        return sample[: max(min_len, len(sample) + change)]
    return sample + rng.choice(p.size, size=change, p=p).tolist()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--images", type=int, default=50)
    parser.add_argument("--samples", type=int, default=5, help="sampled captions per image")
    parser.add_argument("--refs", type=int, default=5, help="references per image")
    parser.add_argument("--vocab", type=int, default=10_000)
    parser.add_argument("--min-len", type=int, default=8)
    parser.add_argument("--max-len", type=int, default=16)
    parser.add_argument("--corpus", type=int, default=5000, help="training images (the df)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    p = 1.0 / np.arange(1, args.vocab + 1)  # Zipf: rank r drawn with probability ~ 1/r
    p /= p.sum()
    corpus = [
        [make_caption(rng, p, args.min_len, args.max_len) for _ in range(args.refs)]
        for _ in range(args.corpus)
    ]
    start = time.perf_counter()
    fast = CiderD(corpus)
    t_fast_df = time.perf_counter() - start
    start = time.perf_counter()
    df_scorer = CiderScorer()
    for refs in corpus:
        df_scorer += (None, [" ".join(map(str, ref)) for ref in refs])
    df_scorer.compute_doc_freq()
    t_ref_df = time.perf_counter() - start
    ref_len = float(np.log(float(len(corpus))))
    print(
        f"batch: {args.images} images x {args.samples} samples, {args.refs} refs each, vocab {args.vocab}, "
        f"lengths {args.min_len}-{args.max_len}; df from {args.corpus} images ({fast.num_ngrams} n-grams: "
        f"CiderD {t_fast_df:.2f} s, pycocoevalcap {t_ref_df:.2f} s); repeats {args.repeats}; "
        f"cpus={os.cpu_count()} load={os.getloadavg()[0]:.1f}"
    )

    def run_reference(texts: list[tuple[str, list[str]]]) -> tuple[np.ndarray, float]:
        start = time.perf_counter()
        scorer = FixedDfCiderScorer(df_scorer.document_frequency, ref_len)
        for text, ref_texts in texts:
            scorer += (text, ref_texts)
        scores = np.array(scorer.compute_cider())
        return scores, time.perf_counter() - start

    def run_fast(samples: list[list[int]], refs: list[list[list[int]]], keys: list[Any]) -> dict[str, Any]:
        t0 = time.perf_counter()
        cold = fast.score(samples, refs, keys)
        t1 = time.perf_counter()
        warm = fast.score(samples, refs, keys)
        t2 = time.perf_counter()
        no_keys = fast.score(samples, refs)
        t3 = time.perf_counter()
        return {"cold": (cold, t1 - t0), "warm": (warm, t2 - t1), "no keys": (no_keys, t3 - t2)}

    times: dict[str, float] = {"reference": 0.0, "cold": 0.0, "warm": 0.0, "no keys": 0.0}
    ratios: dict[str, list[float]] = {name: [] for name in times if name != "reference"}  # per batch
    max_diff = 0.0
    for rep in range(-1, args.repeats):  # -1: a warm-up, not counted
        images = rng.choice(len(corpus), size=args.images, replace=False)
        image_of = np.repeat(images, args.samples).tolist()  # (C,)
        refs = [corpus[i] for i in image_of]
        samples = [
            make_sample(rng, refs[c][int(rng.integers(args.refs))], p, args.min_len) for c in range(len(refs))
        ]
        keys = [(rep, i) for i in image_of]  # never seen before: a cold cache
        texts = [
            (" ".join(map(str, s)), [" ".join(map(str, r)) for r in rs])
            for s, rs in zip(samples, refs, strict=True)
        ]
        reference, t_reference = run_reference(texts)
        results = run_fast(samples, refs, keys)  # the CPU caches full of the reference's data
        if rep < 0:
            continue
        times["reference"] += t_reference
        for name, (scores, seconds) in results.items():
            times[name] += seconds
            ratios[name].append(t_reference / seconds)
            max_diff = max(max_diff, float(np.abs(scores - reference).max()))

    def median(values: list[float]) -> float:
        return sorted(values)[len(values) // 2]

    print(f"{'':<16}{'ms/batch':>10}{'speedup':>10}{'per batch: median':>20}{'min':>7}{'max':>7}")
    for name, seconds in times.items():
        label = "pycocoevalcap" if name == "reference" else f"CiderD {name}"
        row = f"{label:<16}{1000 * seconds / args.repeats:>10.2f}{times['reference'] / seconds:>10.1f}"
        if name in ratios:
            row += f"{median(ratios[name]):>20.1f}{min(ratios[name]):>7.1f}{max(ratios[name]):>7.1f}"
        print(row)
    print(
        f"mean score {reference.mean():.3f}; max |difference| {max_diff:.1e}; "
        f"load average at the end: {os.getloadavg()[0]:.1f}"
    )
    print(
        f"RESULT cider_speedup={median(ratios['cold']):.1f} max_abs_diff={max_diff:.1e} "
        f"cider_speedup_warm={median(ratios['warm']):.1f}"
    )


if __name__ == "__main__":
    main()
