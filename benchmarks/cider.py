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
- fast, prepared (the headline): what SCST runs. ``CiderD.prepare`` vectorised every corpus
  image's references once, before the timing (its time and memory are printed), and
  ``CiderD.score(samples, refs, keys=image ids)`` finds them all;
- fast, cold: a second ``CiderD`` with the same df and no preparation, keys never seen before:
  every reference set is vectorised in the call, once per image (an SCST step without
  ``prepare``, once the key cache no longer holds the images: a 10,000-image cache on COCO);
- fast, no keys: each sample's references vectorised on their own (the evaluation path).

Each repetition draws a fresh batch (new samples, new images) and runs the reference before the
prepared call and again before the cold one, so that both fast calls find the CPU caches full
of the reference's data (its df alone is a dict of some 10^6 tuples), as they would after a
training step, and other load on the machine hits them alike; the no-keys call comes right
after the cold one (warm CPU caches: a flattering figure). Every score is compared with the
reference's. The speedups per batch are reference seconds over fast seconds; their median is
robust to the odd preemption, which on a busy 2-core machine costs a 3 ms call far more than a
150 ms one. Last line: ``RESULT cider_speedup=X max_abs_diff=D cider_speedup_cold=Y`` (medians;
goal >= 40). Run::

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
    cold = CiderD(corpus)
    start = time.perf_counter()
    fast.prepare(range(len(corpus)), corpus)
    t_prepare = time.perf_counter() - start
    start = time.perf_counter()
    df_scorer = CiderScorer()
    for refs in corpus:
        df_scorer += (None, [" ".join(map(str, ref)) for ref in refs])
    df_scorer.compute_doc_freq()
    t_ref_df = time.perf_counter() - start
    ref_len = float(np.log(float(len(corpus))))
    size = fast.prepared_size
    print(
        f"batch: {args.images} images x {args.samples} samples, {args.refs} refs each, vocab {args.vocab}, "
        f"lengths {args.min_len}-{args.max_len}; df from {args.corpus} images ({fast.num_ngrams} n-grams: "
        f"CiderD {t_fast_df:.2f} s, pycocoevalcap {t_ref_df:.2f} s); repeats {args.repeats}; "
        f"cpus={os.cpu_count()} load={os.getloadavg()[0]:.1f}\n"
        f"prepare: {size.sets} images in {t_prepare:.2f} s, {size.entries} n-gram entries, "
        f"{size.nbytes / 2**20:.1f} MiB ({size.nbytes / size.sets / 1024:.2f} KiB an image)"
    )

    def run_reference(texts: list[tuple[str, list[str]]]) -> tuple[np.ndarray, float]:
        start = time.perf_counter()
        scorer = FixedDfCiderScorer(df_scorer.document_frequency, ref_len)
        for text, ref_texts in texts:
            scorer += (text, ref_texts)
        scores = np.array(scorer.compute_cider())
        return scores, time.perf_counter() - start

    def run_fast(scorer: CiderD, *call: Any) -> tuple[np.ndarray, float]:
        start = time.perf_counter()
        scores = scorer.score(*call)
        return scores, time.perf_counter() - start

    names = ["prepared", "cold", "no keys"]
    times: dict[str, float] = {"reference": 0.0, **dict.fromkeys(names, 0.0)}
    ratios: dict[str, list[float]] = {name: [] for name in names}  # per batch
    max_diff = 0.0
    for rep in range(-1, args.repeats):  # -1: a warm-up, not counted
        images = rng.choice(len(corpus), size=args.images, replace=False)
        image_of = np.repeat(images, args.samples).tolist()  # (C,)
        refs = [corpus[i] for i in image_of]
        samples = [
            make_sample(rng, refs[c][int(rng.integers(args.refs))], p, args.min_len) for c in range(len(refs))
        ]
        texts = [
            (" ".join(map(str, s)), [" ".join(map(str, r)) for r in rs])
            for s, rs in zip(samples, refs, strict=True)
        ]
        # Each keyed call right after a reference call: the CPU caches full of the reference's data.
        reference, t_reference = run_reference(texts)
        results = {"prepared": run_fast(fast, samples, refs, image_of)}
        reference_again, t_reference_again = run_reference(texts)
        results["cold"] = run_fast(cold, samples, refs, [(rep, i) for i in image_of])  # keys never seen
        results["no keys"] = run_fast(cold, samples, refs)
        if rep < 0:
            continue
        times["reference"] += t_reference
        for name, (scores, seconds) in results.items():
            before = t_reference if name == "prepared" else t_reference_again
            times[name] += seconds
            ratios[name].append(before / seconds)
            max_diff = max(max_diff, float(np.abs(scores - reference).max()))
        assert np.array_equal(reference, reference_again)

    def median(values: list[float]) -> float:
        return sorted(values)[len(values) // 2]

    print(f"{'':<18}{'ms/batch':>10}{'speedup':>10}{'per batch: median':>20}{'min':>7}{'max':>7}")
    for name, seconds in times.items():
        label = "pycocoevalcap" if name == "reference" else f"CiderD {name}"
        row = f"{label:<18}{1000 * seconds / args.repeats:>10.2f}{times['reference'] / seconds:>10.1f}"
        if name in ratios:
            row += f"{median(ratios[name]):>20.1f}{min(ratios[name]):>7.1f}{max(ratios[name]):>7.1f}"
        print(row)
    print(
        f"mean score {reference.mean():.3f}; max |difference| {max_diff:.1e}; "
        f"load average at the end: {os.getloadavg()[0]:.1f}"
    )
    print(
        f"RESULT cider_speedup={median(ratios['prepared']):.1f} max_abs_diff={max_diff:.1e} "
        f"cider_speedup_cold={median(ratios['cold']):.1f}"
    )


if __name__ == "__main__":
    main()
