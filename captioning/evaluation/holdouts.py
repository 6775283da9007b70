"""Identified holdouts and the retraining gate's rule: champion and challenger scored on the same test splits.

Every shard build records its test split's id in its manifest (``captioning.data.format.holdout_of``:
a hash of the test images' ids and reference tokens). A ``Holdout`` names one for people and for
MLflow: ``coco-test:ab12cd`` (a dataset label, the split, the start of the id)::

    original = load_holdout("data/shards", label="coco")                # the recipe's dataset
    new = load_holdout("data/shards-new/3f2a9c", label="2026-11")        # the landed data's
    decision = decide(
        HoldoutScores(original, champion=1.59, challenger=1.56),
        HoldoutScores(new, champion=1.23, challenger=1.32),
        tolerance=0.01,
    )
    decision.promote, decision.reason   # False, "not promoted: 1.5600 on coco-test:ab12cd is 0.0300 below ..."
    evaluation_run_name("3", new)       # "v3 on 2026-11-test:9f8e7d": one MLflow run per evaluation

The rule (``decide``): a model retrained on new data replaces the champion only when it scores
strictly higher than the champion on the new data's holdout (where it was trained) and no more than
``tolerance`` lower on the original dataset's holdout (what the champion was chosen on). A tie on the
new holdout keeps the champion, so re-running the gate decides the same.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from captioning.data.format import read_holdout


@dataclass(frozen=True)
class Holdout:
    """A build's fixed test split: where it lives, its id (manifest ``holdout.id``) and a label for people."""

    label: str  # the dataset, for people: the recipe's dataset name, a landed folder's name
    shard_dir: str
    split: str
    id: str  # sha256 of the split's image ids and reference tokens
    num_images: int

    @property
    def name(self) -> str:
        """``coco-test:ab12cd``: what evaluation runs and gate reasons call it."""
        return f"{self.label}-{self.split}:{self.id[:6]}"


def load_holdout(shard_dir: str, *, label: str) -> Holdout:
    """The holdout a finished build recorded; ValueError when the build predates holdout ids or its
    holdout holds no image (nothing to score a model on)."""
    found = read_holdout(shard_dir)
    if not found.get("num_images"):
        raise ValueError(
            f"the shards at {shard_dir} hold no {found.get('split')} images: the gate scores models on each "
            "dataset's test split (give some of its images the split 'test')"
        )
    return Holdout(
        label=label,
        shard_dir=shard_dir,
        split=str(found["split"]),
        id=str(found["id"]),
        num_images=int(found["num_images"]),
    )


def evaluation_run_name(version: str, holdout: Holdout) -> str:
    """The MLflow run name of one evaluation: the model version and the holdout, ``v3 on coco-test:ab12cd``."""
    return f"v{version} on {holdout.name}"


@dataclass(frozen=True)
class HoldoutScores:
    """The champion and the challenger on one holdout (the same metric, the same decoding)."""

    holdout: Holdout
    champion: float
    challenger: float


@dataclass(frozen=True)
class GateDecision:
    promote: bool
    reason: str  # one line, with both scores on both holdouts


def decide(original: HoldoutScores, new: HoldoutScores, *, tolerance: float) -> GateDecision:
    """Promote only when better on ``new`` and not worse than ``tolerance`` on ``original`` (module doc)."""
    if not (math.isfinite(tolerance) and tolerance >= 0):
        raise ValueError(f"the promotion tolerance must be a finite number >= 0, got {tolerance}")
    for scores in (original, new):
        if not (math.isfinite(scores.champion) and math.isfinite(scores.challenger)):
            raise ValueError(f"scores on {scores.holdout.name} must be finite to compare: {scores}")
    gain = new.challenger - new.champion
    loss = original.champion - original.challenger
    on_new = f"{new.challenger:.4f} vs the champion's {new.champion:.4f} on {new.holdout.name}"
    on_original = f"{original.challenger:.4f} vs {original.champion:.4f} on {original.holdout.name}"
    if gain <= 0:
        return GateDecision(False, f"not promoted: not better on the new data ({on_new}); {on_original}")
    if loss > tolerance:
        return GateDecision(
            False,
            f"not promoted: {loss:.4f} worse on the original data ({on_original}), more than the "
            f"tolerance {tolerance:g}; {on_new}",
        )
    return GateDecision(
        True,
        f"promoted: better on the new data ({on_new}); within {tolerance:g} on the original ({on_original})",
    )


def holdout_tags(holdout: Holdout) -> dict[str, str]:
    """What an evaluation run on ``holdout`` carries, so runs on the same data can be found and compared."""
    return {
        "holdout": holdout.name,
        "holdout_id": holdout.id,
        "dataset": holdout.label,
        "split": holdout.split,
        "shard_dir": holdout.shard_dir,
    }


def version_tags(holdout: Holdout, prefix: str = "") -> dict[str, str]:
    """The tags naming the holdout that a registered version's ``{prefix}test_*`` score comes from."""
    return {f"{prefix}test_holdout": holdout.name, f"{prefix}test_holdout_id": holdout.id}


def gate_table(
    champion_version: str, version: str, original: HoldoutScores, new: HoldoutScores, *, metric: str = "CIDEr"
) -> str:
    """Markdown: both models' ``metric`` on both holdouts (the gate's inputs), one row per model."""
    lines = [
        f"| model | {metric} on {original.holdout.name} (original) | {metric} on {new.holdout.name} (new) |",
        "|---|---|---|",
        f"| champion v{champion_version} | {original.champion:.4f} | {new.champion:.4f} |",
        f"| retrained v{version} | {original.challenger:.4f} | {new.challenger:.4f} |",
    ]
    return "\n".join(lines)
