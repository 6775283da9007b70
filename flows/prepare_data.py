"""``prepare-data``: download -> records -> vocabulary -> shards (mapped over groups) -> manifest [-> publish].

    prefect deployment run prepare-data/coco
    python -m flows.prepare_data --recipe demo            # the same flow, run here without a deployment

Nothing is redone: downloads keep verified files, the shard build is skipped when the manifest
already records this build key (shard settings + split file + vocabulary:
``captioning.data.prepare.build_key``, the same key ``captioning shards`` records), and a failed
build resumes with the shards that were complete.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from prefect import flow, get_run_logger, unmapped
from prefect.artifacts import create_markdown_artifact

from captioning.config import load_config, normalize_overrides
from captioning.data.prepare import data_report, group_config, manifest_summary
from tasks import data


@flow(name="prepare-data", log_prints=True)
def prepare_data(
    recipe: str = "demo",
    overrides: list[str] | None = None,
    num_groups: int = 2,
    vocab_from: str | None = None,
    publish_to: str | None = None,
) -> dict[str, Any]:
    """Build the recipe's shards (``data.shard_dir``); returns counts per split and what was (re)built.

    ``overrides``: dotted settings (``data.shard_dir=s3://bucket/shards``). ``num_groups``: shard groups
    written as parallel tasks. ``vocab_from``: a model (checkpoint path, s3://, runs:/, models:/) whose
    vocabulary encodes the captions (new data for an existing model) instead of one built from the
    train split. ``publish_to``: an s3:// prefix the finished shards are copied to.
    """
    cfg = load_config(recipe, normalize_overrides(overrides))
    raw = data.download_dataset(cfg)
    dataset = data.read_records(raw, cfg)
    vocab = data.vocabulary_of_checkpoint(vocab_from) if vocab_from else data.build_vocabulary(dataset, cfg)
    key, manifest = data.check_shards(cfg, raw, vocab)
    if manifest is not None:
        get_run_logger().info(
            "shards in %s are up to date (build key %s): nothing to do", cfg.data.shard_dir, key[:12]
        )
        summary = manifest_summary(cfg.data.shard_dir, manifest)
    else:
        plan = data.plan_shards(dataset, vocab, raw, cfg, key)
        groups = plan.groups(num_groups)
        results = data.write_shards.map(groups, cfg=unmapped(group_config(cfg, len(groups))))
        built = data.finish_shards(plan, vocab, results)  # type: ignore[arg-type]  # futures resolve to results
        summary = manifest_summary(
            cfg.data.shard_dir, built.to_json(), num_built=built.num_built, num_skipped=built.num_skipped
        )
    if publish_to:
        summary["published"] = data.publish_shards(cfg.data.shard_dir, publish_to)
        summary["shard_dir"] = publish_to
    create_markdown_artifact(
        key="shards",
        markdown=data_report(summary),
        description=f"shards of {recipe}",
    )
    return summary


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m flows.prepare_data", description=prepare_data.description)
    p.add_argument("--recipe", default="demo")
    p.add_argument("--num-groups", type=int, default=2)
    p.add_argument("--vocab-from")
    p.add_argument("--publish-to")
    args, overrides = p.parse_known_args(argv)
    return prepare_data(
        recipe=args.recipe,
        overrides=overrides,
        num_groups=args.num_groups,
        vocab_from=args.vocab_from,
        publish_to=args.publish_to,
    )


if __name__ == "__main__":
    main()
