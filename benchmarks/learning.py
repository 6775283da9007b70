"""Does the pipeline learn? The ``demo`` recipe end to end on this machine, against a caption prior.

Steps, all with the project's own code: prepare the demo data (synthetic dataset -> shards; a
no-op when they exist), then the stage sequence as ``captioning train --recipe demo`` runs it
(``captioning.stages.train_pipeline``: one ``torchrun --nproc-per-node 2 -m captioning.train --stage
NAME`` launch per stage, each from the previous stage's best model): stage 1 (cross-entropy, frozen encoder), stage 2 (cross-entropy, encoder fine-tuned: the demo has
no ImageNet weights, so the encoder must learn), stage 3 (new self-critical on CIDEr-D). Every
stage is scored on the test split with pycocoevalcap (beam search).

The baseline is the caption prior: the training set's most common caption given to every test
image, scored the same way. "cross-entropy" is the model SCST starts from (the best stage-2
model); SCST should raise its test CIDEr.

Prints a table of test scores, then ``RESULT baseline_cider=A xe_cider=B scst_cider=C minutes=M``
(M: wall-clock minutes of the training run, evaluation included). Goal on 2 CPU cores:
M <= 15, B far above A, C > B. Run::

    .venv/bin/python benchmarks/learning.py                  # output under demo-data/bench-learning
    .venv/bin/python benchmarks/learning.py --output /tmp/learning --nproc 2
"""

from __future__ import annotations

import argparse
import shutil
import time
from collections import Counter

from captioning.config import load_config
from captioning.data.prepare import build_records, fetch, prepare_data
from captioning.evaluation.metrics import score_captions
from captioning.stages import train_pipeline
from captioning.tracking.report import scores_table


def caption_prior(cfg_overrides: list[str]) -> dict[str, float]:
    """Test scores of the training set's most common caption, given to every test image."""
    cfg = load_config("demo", cfg_overrides)
    records = build_records(fetch(cfg, progress=False).karpathy_json, cfg).records
    counts = Counter(" ".join(c.tokens) for r in records if r.split == "train" for c in r.captions)
    prior = counts.most_common(1)[0][0]
    test = {r.image_id: [" ".join(c.tokens) for c in r.captions] for r in records if r.split == "test"}
    print(f"caption prior: {prior!r} ({counts[prior]} of {sum(counts.values())} training captions)")
    return score_captions(dict.fromkeys(test, prior), test).overall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="demo-data/bench-learning")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("overrides", nargs="*", help="extra dotted overrides, e.g. --train.scst.epochs=2")
    args, extra = parser.parse_known_args()
    overrides = [*args.overrides, *extra]

    prepare_data(load_config("demo", overrides), progress=False)
    baseline = caption_prior(overrides)

    shutil.rmtree(args.output, ignore_errors=True)
    start = time.perf_counter()
    summary = train_pipeline(
        "demo",
        overrides,
        output=args.output,
        tracker="jsonl",
        register=False,
        nproc_per_node=args.nproc,
        on_line=lambda line: print(line, flush=True),
    )
    minutes = (time.perf_counter() - start) / 60
    stages = {s["stage"]: s for s in summary["stages"]}

    rows = {"caption prior": baseline}
    rows.update(
        {
            f"{name} (epochs {s['epochs']}, {s['duration_s'] / 60:.1f} min)": s["test_scores"]
            for name, s in stages.items()
        }
    )
    print(f"\ntest split, {args.nproc} processes, {minutes:.1f} min in all")
    print(scores_table(rows))
    xe_stage = "finetune" if "finetune" in stages else "xe"
    print(
        f"RESULT baseline_cider={baseline['CIDEr']:.4f} xe_cider={stages[xe_stage]['test_scores']['CIDEr']:.4f} "
        f"scst_cider={stages['scst']['test_scores']['CIDEr']:.4f} minutes={minutes:.1f}"
    )


if __name__ == "__main__":
    main()
