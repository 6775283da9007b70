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
    captioning demo                                 # the main job on embedded defaults: shards, then training
    captioning caption photo.jpg --checkpoint ckpt.pt   # beam-search captions (a folder: JSON lines)
    captioning mlflow start                         # a local MLflow server in the background; stop|status|ui
    captioning stack up [--s3]                      # Prefect server + worker, MLflow (+ S3); down|status|env

Every subcommand that takes ``--recipe`` also takes dotted overrides (``--data.min_word_freq=3``).
``main(argv)`` returns the exit code, so tests call it directly.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from captioning.config import (
    Config,
    ConfigError,
    config_warnings,
    describe_config,
    list_recipes,
    load_config,
    valid_keys,
)

if TYPE_CHECKING:
    from captioning.data.shards import ShardManifest
    from captioning.mlflow_server import MlflowServer
from captioning.data.shards import ShardManifest


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

    p = sub.add_parser("demo", help="the main job on embedded defaults (synthetic data, CPU-sized)")
    _add_recipe(p, "demo")
    p.add_argument("--prepare-only", action="store_true", help="build the shards, do not train")
    p.add_argument("--output", help="run folder (default: {storage.run_dir}/{recipe}-{time})")

    p = sub.add_parser(
        "caption",
        help="caption images with a checkpoint (beam search)",
        description="Prints `path: caption` per image; JSON lines (one object per image) when a folder "
        "is given or with --json. Folders are read in name order, common image extensions only.",
    )
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help="image files and/or folders of images")
    p.add_argument("--checkpoint", required=True, help="checkpoint path (local or s3://)")
    p.add_argument("--beam-size", type=int, default=5, help="beam width (default 5)")
    p.add_argument(
        "--max-len", type=int, default=20, help="most tokens per caption, <end> included (default 20)"
    )
    p.add_argument(
        "--length-normalization", action="store_true", help="rank finished beams by log-prob per token"
    )
    p.add_argument("--batch-size", type=int, default=16, help="images per forward pass (default 16)")
    p.add_argument("--visualize", type=Path, metavar="DIR", help="write attention overlays DIR/<stem>.png")
    p.add_argument("--json", action="store_true", help="JSON lines even for single images")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: CUDA when available)")

    _add_mlflow_parser(sub)
    _add_stack_parser(sub)
    return parser


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
    """The figures a person wants after a shard build."""
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
    from captioning.data.shards import inspect_shards

    location = args.location or _resolve(args.recipe, overrides).data.shard_dir
    print(
        json.dumps(
            inspect_shards(location, split=args.split, n=args.n, images_dir=args.save_images), indent=2
        )
    )
    return 0


def _cmd_verify(args: argparse.Namespace, overrides: Sequence[str]) -> int:
    from captioning.data.shards import verify_shards

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
    output = args.output or f"{cfg.storage.run_dir}/{cfg.recipe}-{time.strftime('%Y%m%d-%H%M%S')}"
    return train_with_torchrun(args.recipe, overrides, output, cfg.train.nproc_per_node, prefix="[demo] ")


def train_with_torchrun(
    recipe: str, overrides: Sequence[str], output: str, nproc_per_node: int, *, prefix: str = ""
) -> int:
    """``torchrun -m captioning.train`` on this node, then the test scores of every stage."""
    import os
    import subprocess

    from captioning import storage
    from captioning.report import format_table

    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc_per_node}",
        "-m", "captioning.train", "--config", recipe, "--output", output, *overrides,
    ]  # fmt: skip
    print(f"{prefix}training: torchrun {' '.join(cmd[3:])}", flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    start = time.perf_counter()
    code = subprocess.run(cmd, env=env).returncode
    if code != 0:
        print(
            f"{prefix}training failed (exit {code}); resume it with the same command and --resume",
            file=sys.stderr,
        )
        return code
    summary = storage.read_json(storage.join(output, "summary.json"))
    print(f"{prefix}test scores ({(time.perf_counter() - start) / 60:.1f} min of training, {output}):")
    table = format_table({stage["name"]: stage["test_scores"] for stage in summary["stages"]})
    for line in table.splitlines():
        print(f"{prefix}{line}")
    print(f"{prefix}final model: {summary['final_checkpoint']}")
    print(f"{prefix}caption an image: captioning caption IMAGE --checkpoint {summary['final_checkpoint']}")
    return 0


IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})


def caption_inputs(inputs: Sequence[str]) -> tuple[list[str], bool]:
    """Expand folders into their image files (sorted by name); True when any input was a folder."""
    paths: list[str] = []
    had_folder = False
    for item in inputs:
        folder = Path(item)
        if folder.is_dir():
            had_folder = True
            paths.extend(
                str(p)
                for p in sorted(folder.iterdir(), key=lambda p: p.name)
                if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
            )
        else:
            paths.append(item)
    return paths, had_folder


def _cmd_caption(args: argparse.Namespace, overrides: Sequence[str]) -> int:
    if overrides:
        raise ConfigError(
            f"caption takes its settings from the checkpoint, not overrides: {' '.join(overrides)}"
        )
    paths, had_folder = caption_inputs(args.inputs)
    if not paths:
        print("captioning caption: no images found", file=sys.stderr)
        return 1
    from captioning.caption import caption_images

    results = caption_images(
        paths,
        args.checkpoint,
        beam_size=args.beam_size,
        max_len=args.max_len,
        length_normalization=args.length_normalization,
        batch_size=args.batch_size,
        visualize_dir=args.visualize,
        device=args.device,
    )
    as_json = args.json or had_folder
    failed = 0
    for entry in results:
        failed += "error" in entry
        if as_json:
            print(json.dumps(entry, ensure_ascii=False))
        elif "error" in entry:
            print(f"{entry['path']}: error: {entry['error']}", file=sys.stderr)
        else:
            print(f"{entry['path']}: {entry['caption']}")
    return 1 if failed else 0


# --- captioning mlflow: a local tracking server (captioning/mlflow_server.py) -------------------------

MLFLOW_STATE_DIR = "demo-data/mlflow"

MLFLOW_EPILOG = """\
Remote servers need no code changes: MLflow clients (the training included) log wherever
MLFLOW_TRACKING_URI points (http://host:5000, https://..., databricks). Artifacts in S3 (or an
S3-compatible store) need MLFLOW_S3_ENDPOINT_URL (when not AWS) and the usual AWS credentials
(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) in the environment of whoever writes them: with
`start --artifacts s3://...` that is this server, which proxies artifact uploads for its clients.

  captioning mlflow start --port 5000      # prints the URL and the export line
  export MLFLOW_TRACKING_URI=http://127.0.0.1:5000
  captioning mlflow ui --open               # the UI in a browser
  captioning mlflow stop
"""


def _add_mlflow_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--state-dir",
        type=Path,
        help=f"the server's folder: mlflow.db, artifacts/, server.log, server.pid (default: {MLFLOW_STATE_DIR})",
    )
    p = sub.add_parser(
        "mlflow",
        help="start, stop, check or open a local MLflow tracking server",
        description="A local `mlflow server` (SQLite, local or S3 artifacts) that runs in the background "
        "until stopped; the state folder's pid file names it.",
        epilog=MLFLOW_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = p.add_subparsers(dest="mlflow_command", required=True, metavar="ACTION")
    start = actions.add_parser(
        "start", parents=[common], help="start the server in the background (a running one is reused)"
    )
    start.add_argument("--port", type=int, default=5000, help="port (default 5000)")
    start.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; the server has no auth)"
    )
    start.add_argument(
        "--artifacts",
        metavar="URI",
        help="artifact destination, e.g. s3://bucket/mlflow (default: STATE_DIR/artifacts)",
    )
    actions.add_parser("stop", parents=[common], help="stop the server named in the state folder's pid file")
    actions.add_parser(
        "status", parents=[common], help="exit 0 when the server is running and healthy, 1 otherwise"
    )
    ui = actions.add_parser(
        "ui",
        parents=[common],
        help="print the UI URL: $MLFLOW_TRACKING_URI when it is http(s) and no --state-dir is "
        "given, else the state folder's server",
    )
    ui.add_argument("--open", action="store_true", help="also open it in a web browser")


def _recorded_mlflow_server(state_dir: Path) -> tuple[MlflowServer, int | None]:
    """The server named by ``state_dir``'s pid file, with its real host and port, and its pid.

    The pid is None when the process is gone, a zombie, or not an ``mlflow server`` on this state
    folder (a recycled pid): stopping must never signal somebody else's process group.
    """
    import psutil

    from captioning.mlflow_server import MlflowServer

    server = MlflowServer(state_dir)
    pid = server.running_pid()
    if pid is None:
        return server, None
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return server, None
        cmd = process.cmdline()
    except psutil.Error:
        return server, None
    if server.backend_store_uri not in cmd or "--port" not in cmd:
        return server, None
    host = cmd[cmd.index("--host") + 1] if "--host" in cmd else server.host
    port = int(cmd[cmd.index("--port") + 1])
    return MlflowServer(state_dir, host=host, port=port), pid


def stop_process_group(pgid: int, timeout_s: float = 20.0) -> None:
    """SIGTERM group ``pgid`` (and its members' descendants), SIGKILL what is left after ``timeout_s``;
    waits until none is alive (zombies count as gone: a detached server's parent is init, which some
    container inits do not reap)."""
    from captioning.launch import stop_process_group as stop_tree

    stop_tree(pgid, ((signal.SIGTERM, timeout_s),))


def _mlflow_start(args: argparse.Namespace, state_dir: Path) -> int:
    from captioning.mlflow_server import MlflowServer, is_healthy

    running, pid = _recorded_mlflow_server(state_dir)
    if pid is not None:
        if not is_healthy(running.url):
            print(
                f"captioning mlflow start: pid {pid} of {state_dir} is alive but {running.url}/health does "
                f"not answer; see {running.log_path}, or `captioning mlflow stop --state-dir {state_dir}`",
                file=sys.stderr,
            )
            return 1
        moved = f" (not port {args.port}: stop it first to move it)" if running.port != args.port else ""
        print(f"MLflow server already running at {running.url}{moved} (pid {pid}, state {state_dir})")
        print(f"export MLFLOW_TRACKING_URI={running.url}")
        return 0
    server = MlflowServer(state_dir, host=args.host, port=args.port, artifacts_destination=args.artifacts)
    start = time.perf_counter()
    server.start()
    assert server.process is not None
    print(
        f"MLflow server started at {server.url} in {time.perf_counter() - start:.1f} s "
        f"(pid {server.process.pid}, state {state_dir}, log {server.log_path})"
    )
    print(f"export MLFLOW_TRACKING_URI={server.url}")
    print(f"stop it with: captioning mlflow stop --state-dir {state_dir}")
    return 0


def _mlflow_stop(state_dir: Path) -> int:
    server, pid = _recorded_mlflow_server(state_dir)
    if pid is None:
        stale = server.pid_path.is_file()
        server.pid_path.unlink(missing_ok=True)
        print(f"no MLflow server running for {state_dir}" + (" (removed a stale pid file)" if stale else ""))
        return 0
    stop_process_group(pid)
    server.pid_path.unlink(missing_ok=True)
    print(f"stopped the MLflow server at {server.url} (pid {pid})")
    return 0


def _mlflow_status(state_dir: Path) -> int:
    from captioning.mlflow_server import is_healthy

    server, pid = _recorded_mlflow_server(state_dir)
    if pid is None:
        print(f"not running: no live MLflow server recorded in {server.pid_path}")
        return 1
    if not is_healthy(server.url):
        print(
            f"not healthy: pid {pid} is alive but {server.url}/health does not answer; see {server.log_path}"
        )
        return 1
    print(f"running: {server.url} is healthy (pid {pid}, state {state_dir})")
    return 0


def _mlflow_ui(args: argparse.Namespace) -> int:
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if args.state_dir is None and uri.startswith(("http://", "https://")):
        url = uri
    else:
        state_dir = args.state_dir or Path(MLFLOW_STATE_DIR)
        server, pid = _recorded_mlflow_server(state_dir)
        if pid is None:
            print(
                f"captioning mlflow ui: no MLflow server running for {state_dir}; "
                f"start one with `captioning mlflow start --state-dir {state_dir}`",
                file=sys.stderr,
            )
            return 1
        url = server.url
    print(url)
    if args.open:
        import webbrowser

        if not webbrowser.open(url):
            print(f"captioning mlflow ui: no web browser found; open {url} yourself", file=sys.stderr)
    return 0


def _cmd_mlflow(args: argparse.Namespace, overrides: Sequence[str]) -> int:
    from captioning.mlflow_server import MlflowServerError

    if overrides:
        raise ConfigError(f"mlflow takes no config overrides: {' '.join(overrides)}")
    state_dir = args.state_dir or Path(MLFLOW_STATE_DIR)
    try:
        if args.mlflow_command == "start":
            return _mlflow_start(args, state_dir)
        if args.mlflow_command == "stop":
            return _mlflow_stop(state_dir)
        if args.mlflow_command == "status":
            return _mlflow_status(state_dir)
        return _mlflow_ui(args)
    except MlflowServerError as exc:
        print(f"captioning mlflow {args.mlflow_command}: error: {exc}", file=sys.stderr)
        return 1


# --- end captioning mlflow ----------------------------------------------------------------------------


# --- captioning stack: the local Prefect + MLflow (+ S3) stack (captioning/stack.py) ------------------

STACK_STATE_DIR = "demo-data/stack"

STACK_EPILOG = """\
Everything binds to 127.0.0.1; pid files, logs, databases and S3 data live in the state folder.
A later `up` reuses the settings the last one recorded there (STATE_DIR/stack.json) unless given
again, so `down`, `status` and `env` need only --state-dir.

  captioning stack up --s3                 # prints the Prefect and MLflow UI URLs
  eval "$(captioning stack env)"           # PREFECT_API_URL, MLFLOW_TRACKING_URI, AWS_* (with --s3)
  captioning stack status
  captioning stack down
"""


def _add_stack_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--state-dir",
        type=Path,
        help=f"the stack's folder: state, pid files, logs (default: {STACK_STATE_DIR})",
    )
    p = sub.add_parser(
        "stack",
        help="start, stop or check the local stack: Prefect server + worker, MLflow, optional S3",
        description="A local Prefect server with a process worker, an MLflow server and optionally an "
        "S3-compatible server (rclone), each in the background until `captioning stack down`.",
        epilog=STACK_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = p.add_subparsers(dest="stack_command", required=True, metavar="ACTION")
    up = actions.add_parser("up", parents=[common], help="start what is not running (running parts are kept)")
    up.add_argument("--s3", action=argparse.BooleanOptionalAction, help="also an S3 server (default: off)")
    up.add_argument("--worker", action=argparse.BooleanOptionalAction, help="a process worker (default: on)")
    up.add_argument("--prefect-port", type=int, help="Prefect server port (default 4200)")
    up.add_argument("--mlflow-port", type=int, help="MLflow server port (default 5000)")
    up.add_argument("--s3-port", type=int, help="S3 server port (default 9000)")
    up.add_argument("--work-pool", help="process work pool name (default captioning-local)")
    up.add_argument("--gpu-slots", type=int, help="limit of the `gpu` global concurrency limit (default 1)")
    up.add_argument("--workdir", type=Path, help="the worker's working folder (default: the current one)")
    actions.add_parser("down", parents=[common], help="stop the worker, then the servers")
    actions.add_parser("status", parents=[common], help="each component's state; exit 0 when all run")
    actions.add_parser("env", parents=[common], help="print the export lines for clients")


def _cmd_stack(args: argparse.Namespace, overrides: Sequence[str]) -> int:
    from captioning.stack import S3_BUCKET, LocalStack, StackError, export_lines, format_status, load_settings

    if overrides:
        raise ConfigError(f"stack takes no config overrides: {' '.join(overrides)}")
    state_dir = args.state_dir or Path(STACK_STATE_DIR)
    names = ("s3", "worker", "prefect_port", "mlflow_port", "s3_port", "work_pool", "gpu_slots", "workdir")
    stack = LocalStack(load_settings(state_dir, **{name: getattr(args, name, None) for name in names}))
    where = f" --state-dir {state_dir}" if args.state_dir else ""
    try:
        if args.stack_command == "up":
            start = time.perf_counter()
            stack.up()
            s = stack.settings
            print(f"local stack up in {time.perf_counter() - start:.1f} s (state {state_dir})")
            print(f"  Prefect UI: {s.prefect_url}   (work pool {s.work_pool})")
            print(f"  MLflow UI:  {s.mlflow_url}")
            if s.s3:
                print(f"  S3:         {s.s3_url}   (bucket s3://{S3_BUCKET})")
            print(f'clients: eval "$(captioning stack env{where})"  or  source {stack.env_path}')
            print(f"stop with: captioning stack down{where}")
            return 0
        if args.stack_command == "down":
            stack.down()
            print(f"local stack in {state_dir} stopped")
            return 0
        if args.stack_command == "status":
            status = stack.status()
            print(format_status(status))
            return 0 if all(c["running"] and c["healthy"] for c in status.values() if c["enabled"]) else 1
        if not stack.json_path.is_file():
            raise StackError(f"no stack recorded in {state_dir}: start one with `captioning stack up{where}`")
        print(export_lines(stack.env()), end="")
        return 0
    except StackError as exc:
        print(f"captioning stack {args.stack_command}: error: {exc}", file=sys.stderr)
        return 1


# --- end captioning stack -----------------------------------------------------------------------------


_COMMANDS = {
    "config": _cmd_config,
    "synth": _cmd_synth,
    "records": _cmd_records,
    "vocab": _cmd_vocab,
    "download": _cmd_download,
    "shards": _cmd_shards,
    "inspect": _cmd_inspect,
    "verify": _cmd_verify,
    "demo": _cmd_demo,
    "caption": _cmd_caption,
    "mlflow": _cmd_mlflow,
    "stack": _cmd_stack,
}


def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Separate dotted overrides (``--a.b=1`` or ``--a.b 1``) from the subcommand's own arguments.

    Done before argparse so that an override's value is never taken for a positional argument.
    Unknown dotted keys are kept as overrides, to fail later with the list of valid keys.
    """
    # Top-level config keys (``--seed``) are overrides too; ``--recipe`` is the subcommands' option.
    top_level = {k for k in valid_keys() if "." not in k} - {"recipe"}
    own: list[str] = []
    overrides: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        key = arg[2:].split("=", 1)[0]
        if arg.startswith("--") and ("." in key or key in top_level):
            overrides.append(arg)
            if "=" not in arg and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                overrides.append(argv[i + 1])
                i += 1
        else:
            own.append(arg)
        i += 1
    return own, overrides


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``captioning`` command; returns the process exit code."""
    own, overrides = split_overrides(list(sys.argv[1:] if argv is None else argv))
    args = _build_parser().parse_args(own)
    try:
        return _COMMANDS[args.command](args, overrides)
    except ConfigError as exc:
        print(f"captioning {args.command}: config error: {exc}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as exc:
        print(f"captioning {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
