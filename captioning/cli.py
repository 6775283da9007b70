"""The ``captioning`` command: one entry point, a subcommand per job.

    captioning config demo --train.xe.epochs=2      # resolved config as JSON (warnings on stderr)
    captioning config --describe                    # every key with its type, default and doc
    captioning synth OUT_DIR --recipe demo          # write the synthetic dataset (Karpathy layout)
    captioning records data/raw/dataset_coco.json   # validate a Karpathy split file, count per split
    captioning vocab dataset_coco.json OUT.json     # vocabulary from the train split
    captioning download --recipe coco               # fetch the raw dataset (resumes, verifies)
    captioning shards --recipe coco                 # download -> vocabulary -> WebDataset shards
    captioning inspect data/coco/shards -n 2        # counts per split and decoded samples
    captioning verify data/coco/shards              # every shard against its manifest sha256
    captioning train --recipe demo                  # the stages, one torchrun each, then registration
    captioning demo                                 # the main job on embedded defaults: shards, then training
    captioning caption photo.jpg --checkpoint models:/show-attend-tell@champion   # or a path, s3://, runs:/
    captioning mlflow start                         # a local MLflow server in the background; stop|status|ui
    captioning stack up [--s3]                      # Prefect server + worker, MLflow (+ S3); down|status|env

Every subcommand that takes ``--recipe`` also takes dotted overrides (``--data.min_word_freq=3``).
``main(argv)`` returns the exit code, so tests call it directly.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from captioning.caption_cli import COMMANDS as CAPTION_COMMANDS
from captioning.caption_cli import add_parsers as add_caption_parsers
from captioning.config import (
    STAGES,
    Config,
    ConfigError,
    config_warnings,
    describe_config,
    list_recipes,
    load_config,
    split_overrides,
)
from captioning.services.cli import COMMANDS as SERVICE_COMMANDS
from captioning.services.cli import add_parsers as add_service_parsers
from captioning.tracking import TRACKERS

if TYPE_CHECKING:
    from captioning.data.format import ShardManifest


def _add_recipe(parser: argparse.ArgumentParser, default: str | None = None) -> None:
    parser.add_argument(
        "--recipe",
        default=default,
        help=f"recipe name ({', '.join(list_recipes())}) or path to a .toml file"
        + (f" (default: {default})" if default else " (default: built-in defaults)"),
    )


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="captioning",
        description="Show, Attend and Tell image captioning: data, training, evaluation.",
        epilog="Dotted overrides such as --train.xe.lr_decoder=4e-4 follow the subcommand's arguments; "
        "`captioning config --describe` lists every key.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("config", help="print the resolved config (recipe + overrides) as JSON")
    p.add_argument("recipe_name", nargs="?", metavar="RECIPE", help="recipe name or .toml path")
    p.add_argument("--describe", action="store_true", help="list every key with type, value and doc")
    p.add_argument("--list", action="store_true", help="list the available recipes")

    p = sub.add_parser("synth", help="write the learnable synthetic dataset in the Karpathy layout")
    p.add_argument("out_dir", type=Path, help="output folder")
    _add_recipe(p, "demo")

    p = sub.add_parser("records", help="validate a Karpathy split file and count images per split")
    p.add_argument("karpathy_json", type=Path)
    _add_recipe(p)

    p = sub.add_parser("vocab", help="build the vocabulary from a Karpathy file's train split")
    p.add_argument("karpathy_json", type=Path)
    p.add_argument("out", type=Path, help="where to write the vocabulary JSON")
    _add_recipe(p)

    p = sub.add_parser("download", help="fetch the raw dataset into data.raw_dir (resumable)")
    _add_recipe(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")

    p = sub.add_parser("shards", help="download -> records -> vocabulary -> shards + manifest")
    _add_recipe(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")

    p = sub.add_parser("inspect", help="counts per split and the first samples of built shards")
    p.add_argument("location", nargs="?", help="shard location (default: the recipe's data.shard_dir)")
    _add_recipe(p)
    p.add_argument("--split", choices=["train", "val", "test"], help="only this split")
    p.add_argument("-n", type=int, default=1, help="samples to decode per split (default 1)")
    p.add_argument("--save-images", type=Path, metavar="DIR", help="also write the samples' images here")

    p = sub.add_parser("verify", help="check every shard against the sha256 in its manifest")
    p.add_argument("location", nargs="?", help="shard location (default: the recipe's data.shard_dir)")
    _add_recipe(p)

    p = sub.add_parser(
        "train",
        help="train the stages (one torchrun launch each), then register the best model",
        description="Every stage (default: the recipe's train.stages) runs as `torchrun -m captioning.train "
        "--stage NAME` from the previous stage's best model, under one tracking run; with MLflow the best "
        "stage's model is registered once and gated for the champion alias. The shards must exist "
        "(`captioning shards`).",
    )
    _add_recipe(p, "demo")
    _add_train_options(p)

    p = sub.add_parser("demo", help="the main job on embedded defaults (synthetic data, CPU-sized)")
    _add_recipe(p, "demo")
    p.add_argument("--prepare-only", action="store_true", help="build the shards, do not train")
    _add_train_options(p)

    add_caption_parsers(sub)

    from captioning import server

    server.add_arguments(
        sub.add_parser("serve", help="serve a model over HTTP, bounded", description=server.DESCRIPTION)
    )
    add_service_parsers(sub)
    return parser


def _add_train_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output", help="run folder or s3:// prefix (default: {storage.run_dir}/{recipe}/{time})")
    p.add_argument("--stages", nargs="+", choices=STAGES, help="stages to train (default: train.stages)")
    p.add_argument("--init-from", help="checkpoint the first stage starts from")
    p.add_argument("--resume", action="store_true", help="continue the run in --output")
    p.add_argument(
        "--tracker",
        choices=TRACKERS,
        default="auto",
        help="auto: MLflow when tracking.tracking_uri or MLFLOW_TRACKING_URI is set, else OUTPUT/metrics.jsonl",
    )
    p.add_argument(
        "--no-register", action="store_true", help="MLflow: do not register the best stage's model"
    )


def _resolve(recipe: str | None, overrides: Sequence[str]) -> Config:
    cfg = load_config(recipe, overrides)
    for warning in config_warnings(cfg):
        print(f"warning: {warning}", file=sys.stderr)
    return cfg


def _cmd_config(args: argparse.Namespace, overrides: Sequence[str]) -> int:
    if args.list:
        print("\n".join(list_recipes()))
        return 0
    cfg = _resolve(args.recipe_name, overrides)
    print(describe_config(cfg) if args.describe else cfg.to_json())
    return 0


def _cmd_synth(args: argparse.Namespace, overrides: Sequence[str]) -> int:
    from captioning.data.synthetic import generate_synthetic

    synthetic = _resolve(args.recipe, overrides).data.synthetic
    start = time.perf_counter()
    result = generate_synthetic(args.out_dir, **dataclasses.asdict(synthetic))
    print(f"wrote {result.json_path} ({time.perf_counter() - start:.1f} s)")
    return 0


def _summarise_records(path: Path, cfg: Config) -> dict[str, object]:
    from captioning.data.records import read_karpathy

    dataset = read_karpathy(path, restval_split=cfg.data.restval_split)
    splits = dataset.by_split()
    return {
        "dataset": dataset.name,
        "images": {name: len(recs) for name, recs in splits.items()},
        "captions": {name: sum(len(r.captions) for r in recs) for name, recs in splits.items()},
        "restval_skipped": dataset.num_restval_skipped,
    }


def _cmd_records(args: argparse.Namespace, overrides: Sequence[str]) -> int:
    print(json.dumps(_summarise_records(args.karpathy_json, _resolve(args.recipe, overrides)), indent=2))
    return 0


def build_vocab_file(karpathy_json: Path, out: Path, cfg: Config) -> dict[str, object]:
    """Records -> length policy -> vocabulary saved at ``out``; returns the counts."""
    from captioning.data.prepare import build_records, build_vocabulary

    vocab, stats = build_vocabulary(build_records(karpathy_json, cfg), cfg)
    vocab.save(out)
    return {"vocab_size": len(vocab), "path": str(out), "train_length_policy": dataclasses.asdict(stats)}


def _cmd_vocab(args: argparse.Namespace, overrides: Sequence[str]) -> int:
    print(
        json.dumps(build_vocab_file(args.karpathy_json, args.out, _resolve(args.recipe, overrides)), indent=2)
    )
    return 0


def _cmd_download(args: argparse.Namespace, overrides: Sequence[str]) -> int:
    from captioning.data.prepare import fetch

    raw = fetch(_resolve(args.recipe, overrides), progress=not args.no_progress)
    print(
        json.dumps({"dataset": raw.name, "karpathy_json": str(raw.karpathy_json), "images": repr(raw.images)})
    )
    return 0


def shard_summary(manifest: ShardManifest) -> dict[str, object]:
    """The figures a person wants after a shard build (or after finding it up to date)."""
    return {
        "location": manifest.out,
        "built": manifest.num_built,
        "skipped_complete": manifest.num_skipped,
        "duration_s": round(manifest.duration_s, 2),
        "splits": {
            name: {
                "samples": s.num_samples,
                "shards": s.num_shards,
                "skipped": s.failures,
                "converted": s.converted,
            }
            for name, s in manifest.splits.items()
        },
    }


def _cmd_shards(args: argparse.Namespace, overrides: Sequence[str]) -> int:
    from captioning.data.prepare import prepare_data

    result = prepare_data(_resolve(args.recipe, overrides), progress=not args.no_progress)
    print(json.dumps({"vocab_size": result.vocab_size, **shard_summary(result.manifest)}, indent=2))
    return 0


def _cmd_inspect(args: argparse.Namespace, overrides: Sequence[str]) -> int:
    from captioning.data.shard_check import inspect_shards

    location = args.location or _resolve(args.recipe, overrides).data.shard_dir
    print(
        json.dumps(
            inspect_shards(location, split=args.split, n=args.n, images_dir=args.save_images), indent=2
        )
    )
    return 0


def _cmd_verify(args: argparse.Namespace, overrides: Sequence[str]) -> int:
    from captioning.data.shard_check import verify_shards

    location = args.location or _resolve(args.recipe, overrides).data.shard_dir
    problems = verify_shards(location)
    for problem in problems:
        print(f"problem: {problem}", file=sys.stderr)
    print(f"{location}: {'OK' if not problems else f'{len(problems)} problem(s)'}")
    return 0 if not problems else 1


def _cmd_demo(args: argparse.Namespace, overrides: Sequence[str]) -> int:
    from captioning.data.prepare import prepare_data

    cfg = _resolve(args.recipe, overrides)
    start = time.perf_counter()
    print(
        f"[demo] recipe {cfg.recipe}: {cfg.data.dataset} data into {cfg.data.raw_dir}, shards into {cfg.data.shard_dir}"
    )
    result = prepare_data(cfg, progress=False)
    summary = shard_summary(result.manifest)
    print(f"[demo] vocabulary: {result.vocab_size} words; caption length policy: {result.length_policy}")
    print(f"[demo] shards: {summary['built']} built, {summary['skipped_complete']} already complete")
    print(f"[demo] {'split':<6} {'images':>7} {'shards':>7}  skipped")
    for name, split in result.manifest.splits.items():
        print(f"[demo] {name:<6} {split.num_samples:>7} {split.num_shards:>7}  {split.failures or '-'}")
    print(
        f"[demo] inspect them: captioning inspect {cfg.data.shard_dir} -n 2 ({time.perf_counter() - start:.1f} s)"
    )
    if args.prepare_only:
        return 0
    return _train(args, overrides, cfg, prefix="[demo] ")


def _cmd_train(args: argparse.Namespace, overrides: Sequence[str]) -> int:
    return _train(args, overrides, _resolve(args.recipe, overrides))


def _train(args: argparse.Namespace, overrides: Sequence[str], cfg: Config, *, prefix: str = "") -> int:
    """The stage sequence (``captioning.stages.train_pipeline``), then every stage's test scores."""
    from captioning.launch import LaunchError
    from captioning.stages import StageError, train_pipeline
    from captioning.tracking.report import scores_table

    output = args.output or f"{cfg.storage.run_dir}/{cfg.recipe}/{time.strftime('%Y%m%d-%H%M%S')}"
    start = time.perf_counter()
    try:
        summary = train_pipeline(
            args.recipe,
            overrides,
            output=output,
            stages=args.stages,
            init_from=args.init_from,
            tracker=args.tracker,
            register=not args.no_register,
            resume=args.resume,
            on_line=lambda line: print(f"{prefix}{line}", flush=True),
        )
    except LaunchError as exc:  # a stage's torchrun failed or ran out of time: its last.pt resumes it
        print(f"{prefix}training failed: {exc}", file=sys.stderr)
        print(f"{prefix}continue it with the same command and --resume --output {output}", file=sys.stderr)
        return exc.returncode or 1
    except (StageError, RuntimeError) as exc:  # refused before training (the message says why)
        print(f"{prefix}training: error: {exc}", file=sys.stderr)
        return 1
    minutes = (time.perf_counter() - start) / 60
    print(f"{prefix}test scores ({minutes:.1f} min of training, {output}):")
    table = scores_table({stage["stage"]: stage["test_scores"] for stage in summary["stages"]})
    for line in table.splitlines():
        print(f"{prefix}{line}")
    print(f"{prefix}final model: {summary['checkpoint']} (the best stage, {summary['best_stage']})")
    registered = summary.get("registered")
    if registered and "error" not in registered:
        print(
            f"{prefix}registered {registered['name']} version {registered['version']}: {registered['alias']}"
        )
    print(f"{prefix}caption an image: captioning caption IMAGE --checkpoint {summary['checkpoint']}")
    return 0


_COMMANDS = {
    "config": _cmd_config,
    "synth": _cmd_synth,
    "records": _cmd_records,
    "vocab": _cmd_vocab,
    "download": _cmd_download,
    "shards": _cmd_shards,
    "inspect": _cmd_inspect,
    "verify": _cmd_verify,
    "train": _cmd_train,
    "demo": _cmd_demo,
    **CAPTION_COMMANDS,
    "serve": lambda args, _: _serve(args),
    **SERVICE_COMMANDS,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``captioning`` command; returns the process exit code."""
    own, overrides = split_overrides(list(sys.argv[1:] if argv is None else argv))
    args = _build_parser().parse_args(own)
    try:
        return _COMMANDS[args.command](args, overrides)
    except ConfigError as exc:
        print(f"captioning {args.command}: config error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        if not isinstance(exc, (ValueError, FileNotFoundError, *_data_errors())):
            raise
        print(f"captioning {args.command}: error: {exc}", file=sys.stderr)
        return 1


def _serve(args: argparse.Namespace) -> int:
    from captioning.server import serve

    return serve(args)


def _data_errors() -> tuple[type[Exception], ...]:
    """The data path's refusals that carry their own one-line message (a download that failed or
    does not match its checksum, an archive that does not open, shards that failed); imported only
    when an exception is on its way out."""
    from captioning.data.archives import ArchiveError
    from captioning.data.download import DownloadError
    from captioning.data.shard_build import ShardError

    return (DownloadError, ArchiveError, ShardError)


if __name__ == "__main__":
    sys.exit(main())
