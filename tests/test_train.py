"""Training: one stage per process (``captioning.train``), the stage sequence (``captioning.stages``) in
process at world size 1 and under torchrun with 2 gloo processes, kill-and-resume equivalence.

The shards come from the real pipeline (synthetic dataset -> records -> vocabulary -> shards), small
enough that a stage takes seconds on 2 CPU cores.
"""

from __future__ import annotations

import io
import ipaddress
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import psutil
import pytest
import torch
from PIL import Image
from s3server import free_port

from captioning import stages, storage
from captioning.config import load_config
from captioning.data.prepare import prepare_data
from captioning.model.checkpoint import load_checkpoint
from captioning.stages import StageError, train_pipeline
from captioning.tracking.jsonl import metric_history, read_jsonl
from captioning.train import TrainError, main
from captioning.training.stage import SettingsChanged, StageResult

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[1]


def data_overrides(root: Path) -> list[str]:
    return [
        f"--data.raw_dir={root / 'raw'}",
        f"--data.shard_dir={root / 'shards'}",
        "--data.synthetic.num_train=96",
        "--data.synthetic.num_val=12",
        "--data.synthetic.num_test=10",
        "--data.shards.samples_per_shard=24",
        "--data.shards.num_procs=1",
    ]


TINY = [
    "--data.loader.batch_size=8",
    "--data.loader.num_workers=1",
    "--data.loader.shuffle_buffer=16",
    "--data.loader.seq_per_img=2",
    "--model.encoded_image_size=2",
    "--model.emb_dim=16",
    "--model.attention_dim=16",
    "--model.decoder_dim=32",
    "--train.checkpoint_every_steps=2",
    "--train.log_every_steps=2",
    "--train.xe.epochs=1",
    "--train.finetune.epochs=1",
    "--train.scst.epochs=1",
    "--train.scst.num_samples=3",
    "--train.scst.max_len=8",
    "--eval.beam_size=2",
    "--eval.max_len=8",
    "--eval.java_timeout_s=120",
]


def tiny(*changes: str) -> list[str]:
    """TINY with some settings replaced (an override may be given only once)."""
    keys = {c.split("=", 1)[0] for c in changes}
    return [o for o in TINY if o.split("=", 1)[0] not in keys] + list(changes)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Data overrides of a prepared synthetic dataset (96 train images in 4 shards, 12 val, 10 test)."""
    root = tmp_path_factory.mktemp("train-data")
    overrides = data_overrides(root)
    prepare_data(load_config("demo", overrides), progress=False)
    return overrides


def in_process(
    recipe: str,
    stage: str,
    output: str,
    overrides: list[str],
    *,
    init_from: str | None,
    parent_run_id: str | None,
    tracker: str,
    **_: Any,
) -> StageResult:
    """``train_pipeline``'s launch, in this process at world size 1 (what torchrun would run on one rank)."""
    argv = stages.stage_args(
        recipe, stage, output, overrides, init_from=init_from, parent_run_id=parent_run_id, tracker=tracker
    )
    return main(argv)


def start_torchrun(args: list[str], **kwargs: Any) -> subprocess.Popen[str]:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={free_port()}",
        "-m", "captioning.train", *args,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True, **kwargs,
    )  # fmt: skip


class ListeningSockets:
    """Every (address, port) that a process whose command line names ``marker`` listens on, polled while
    the ``with`` block runs."""

    def __init__(self, marker: str) -> None:
        self.marker = marker
        self.found: set[tuple[str, int]] = set()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> ListeningSockets:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()

    def _poll(self) -> None:
        while not self._done.wait(0.2):
            for process in psutil.process_iter(["cmdline"]):
                if self.marker not in " ".join(process.info["cmdline"] or []):
                    continue
                try:
                    sockets = process.net_connections(kind="inet")
                except psutil.Error:
                    continue
                self.found |= {(c.laddr.ip, c.laddr.port) for c in sockets if c.status == psutil.CONN_LISTEN}


def run_to_end(args: list[str], timeout: float = 600) -> str:
    proc = start_torchrun(args)
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-6000:]
    return out


def model_state(uri: str) -> dict[str, torch.Tensor]:
    return load_checkpoint(uri)["model"]


def same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], prefix: str = "") -> bool:
    keys = [k for k in a if k.startswith(prefix)]
    assert keys and set(keys) == {k for k in b if k.startswith(prefix)}
    return all(torch.equal(a[k], b[k]) for k in keys)


def test_world_one_runs_xe_then_scst_and_refuses_to_overwrite(
    data: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, java: str
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "run"
    overrides = [*data, *TINY]
    summary = train_pipeline(
        "demo", overrides, output=str(out), stages=["xe", "scst"], launch=in_process, on_line=print
    )
    assert [s["stage"] for s in summary["stages"]] == ["xe", "scst"]
    assert all(s["world_size"] == 1 for s in summary["stages"])
    assert set(summary["test_scores"]) >= {"BLEU-1", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr"}
    assert summary["best_stage"] in ("xe", "scst") and summary["registered"] is None  # no MLflow here
    for stage in ("xe", "scst"):
        for name in ("last.pt", "best.pt", "result.json", "test-captions.json", "val/epoch-001.json"):
            assert (out / stage / name).exists(), f"{stage}/{name}"
    captions = storage.read_json(str(out / "scst" / "test-captions.json"))
    assert len(captions) == 10 and len({c["image_id"] for c in captions}) == 10
    records = read_jsonl(out / "metrics.jsonl")
    assert metric_history(records, "run/xe", "train/loss")
    assert metric_history(records, "run/scst", "train/reward")
    assert metric_history(records, "run/scst", "val/CIDEr")
    assert metric_history(records, "run/scst", "test/CIDEr")
    assert metric_history(records, "run", "scst/test_CIDEr")  # the parent's closing metrics
    artifacts = out / "artifacts" / "run"
    for name in ("config.json", "vocab.json", "manifest.json"):
        assert (artifacts / "run" / name).is_file()
    params = {
        k: v for r in records if r["kind"] == "params" and r["run"] == "run" for k, v in r["params"].items()
    }
    assert params["train.scst.num_samples"] == "3" and params["model.decoder_dim"] == "32"
    tags = {k: v for r in records if r["kind"] == "tags" and r["run"] == "run" for k, v in r["tags"].items()}
    assert tags["recipe"] == "demo" and len(tags["dataset_manifest_sha256"]) == 64 and tags["git_commit"]
    sheets = sorted((artifacts / "xe" / "attention" / "epoch-001").glob("*.png"))
    assert len(sheets) == 4 and all(Image.open(p).size[0] > 100 for p in sheets)
    assert (artifacts / "xe" / "checkpoints" / "best.pt").is_file()
    assert (artifacts / "scst" / "plots" / "curves.png").is_file()
    assert (artifacts / "scst" / "val" / "epoch-001.json").is_file()
    test_run = artifacts / "scst" / "scst-test"
    assert "<table" in (test_run / "samples.html").read_text()
    assert len(storage.read_json(str(test_run / "test-captions.json"))) == 10
    assert metric_history(records, "run/scst/scst-test", "CIDEr")
    with pytest.raises(StageError, match="--resume"):
        train_pipeline("demo", overrides, output=str(out), stages=["xe", "scst"], launch=in_process)
    before = {s: (out / s / "result.json").stat().st_mtime_ns for s in ("xe", "scst")}
    again = train_pipeline(  # both stages done: nothing retrained, same results
        "demo", overrides, output=str(out), stages=["xe", "scst"], launch=in_process, resume=True
    )
    assert again["test_scores"] == summary["test_scores"] and again["stages"] == summary["stages"]
    assert {s: (out / s / "result.json").stat().st_mtime_ns for s in ("xe", "scst")} == before


def test_one_stage_per_process_and_a_finished_stage_returns_its_result(
    data: list[str], tmp_path: Path, java: str
) -> None:
    out = str(tmp_path / "run")
    args = ["--stage", "xe", "--config", "demo", "--output", out, "--tracker", "none", *data, *TINY]
    first = main(args)
    assert first.stage == "xe" and first.world_size == 1 and first.run_id is None
    assert not (tmp_path / "run" / "finetune").exists()  # exactly one stage
    assert StageResult.from_json(storage.read_json(f"{out}/xe/result.json")) == first
    before = (tmp_path / "run" / "xe" / "best.pt").stat().st_mtime_ns
    assert main(args) == first  # the rule: result.json means done
    assert (tmp_path / "run" / "xe" / "best.pt").stat().st_mtime_ns == before
    # ... but only for the same settings: another epoch count is refused, naming the difference.
    changed = ["--stage", "xe", "--config", "demo", "--output", out, "--tracker", "none", *data]
    with pytest.raises(TrainError, match=r"train\.xe\.epochs: 1 -> 2"):
        main([*changed, *tiny("--train.xe.epochs=2")])
    # An interrupted stage (last.pt, no result) is not continued under other settings either.
    (tmp_path / "run" / "xe" / "result.json").unlink()
    with pytest.raises(SettingsChanged, match=r"data\.loader\.batch_size: 8 -> 4"):
        main([*changed, *tiny("--data.loader.batch_size=4")])
    assert not (tmp_path / "run" / "xe" / "result.json").exists()


def test_missing_shards_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(TrainError, match="captioning shards"):
        main(
            [
                "--stage",
                "xe",
                "--config",
                "demo",
                "--output",
                str(tmp_path / "o"),
                f"--data.shard_dir={tmp_path / 'none'}",
            ]
        )


def test_torchrun_two_processes_runs_all_three_stages_into_mlflow(
    data: list[str],
    tmp_path: Path,
    mlflow_server: Any,
    monkeypatch: pytest.MonkeyPatch,
    torchrun: str,
    java: str,
) -> None:
    out = tmp_path / "run"
    name = f"sat-{uuid.uuid4().hex[:8]}"
    tracking = [f"--tracking.tracking_uri={mlflow_server.url}", f"--tracking.experiment={name}"]
    tracking.append(f"--tracking.registered_model={name}")
    lines: list[str] = []
    with ListeningSockets(str(out)) as listening:
        summary = train_pipeline("demo", [*data, *TINY, *tracking], output=str(out), on_line=lines.append)
    log = "\n".join(lines)
    # The stores of each stage's agent and the workers' gloo sockets, all on loopback only.
    assert len(listening.found) >= 3 * 3, listening.found
    assert all(ipaddress.ip_address(host).is_loopback for host, _ in listening.found), listening.found
    assert [s["stage"] for s in summary["stages"]] == ["xe", "finetune", "scst"]
    assert all(s["world_size"] == 2 for s in summary["stages"])
    assert "[rank 1]" not in log or "INFO" not in log.split("[rank 1]")[1][:20]  # rank 1 logs warnings only
    assert sum(line.startswith("torchrun --nproc-per-node=2") for line in lines) == 3  # one launch per stage
    # Stage 1 keeps the encoder frozen, stage 2 trains it, stage 3 (lr_encoder 0) keeps it again.
    from captioning.data.vocab import Vocab
    from captioning.model import build_captioner

    vocab = Vocab.from_json(storage.read_json(str(Path(data[1].split("=", 1)[1]) / "vocab.json")))
    torch.manual_seed(load_config("demo").seed)
    initial = build_captioner(load_config("demo", TINY).model, len(vocab)).state_dict()
    xe, ft, scst = (model_state(str(out / s / "best.pt")) for s in ("xe", "finetune", "scst"))
    assert same_tensors(initial, xe, "encoder.")
    assert not same_tensors(initial, xe, "decoder.")
    assert not same_tensors(xe, ft, "encoder.backbone.layer1.")  # demo fine-tunes from block 1
    assert same_tensors(ft, scst, "encoder.")
    assert not same_tensors(ft, scst, "decoder.")
    for stage in summary["stages"]:
        assert stage["epochs"] == 1 and stage["steps"] == 6  # 96 images / (2 ranks x 8)
        assert set(stage["test_scores"]) >= {"BLEU-4", "CIDEr", "METEOR", "ROUGE-L"}
    # MLflow: one pipeline run with a child per stage and one per test evaluation (rank 0 only: no run per process).
    client = mlflow.MlflowClient(mlflow_server.url)
    experiment = client.get_experiment_by_name(name)
    assert experiment is not None
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    parent = runs.pop(next(n for n, r in runs.items() if "mlflow.parentRunId" not in r.data.tags))
    assert summary["tracking_run_id"] == parent.info.run_id and parent.info.status == "FINISHED"
    assert sorted(runs) == ["finetune", "finetune-test", "scst", "scst-test", "xe", "xe-test"]
    for stage in ("xe", "finetune", "scst"):
        assert runs[stage].data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert runs[f"{stage}-test"].data.tags["mlflow.parentRunId"] == runs[stage].info.run_id
        assert runs[stage].info.status == "FINISHED"
        assert next(s for s in summary["stages"] if s["stage"] == stage)["run_id"] == runs[stage].info.run_id
    assert parent.data.params["train.scst.num_samples"] == "3"
    assert parent.data.tags["recipe"] == "demo" and len(parent.data.tags["dataset_manifest_sha256"]) == 64
    assert parent.data.metrics["test_CIDEr"] == summary["test_scores"]["CIDEr"]
    scst_id = runs["scst"].info.run_id
    rewards = client.get_metric_history(scst_id, "train/reward")
    assert [m.step for m in rewards] == [2, 4, 6] and all(0.0 <= m.value <= 10.0 for m in rewards)
    assert client.get_metric_history(runs["scst-test"].info.run_id, "CIDEr")
    artifacts = {f.path for f in client.list_artifacts(scst_id)}
    assert {"attention", "checkpoints", "plots", "val"} <= artifacts
    assert {f.path for f in client.list_artifacts(parent.info.run_id, "run")} >= {
        "run/config.json",
        "run/vocab.json",
    }
    # Registered once, after the sequence: the best stage's model, which becomes champion (the first one).
    versions = client.search_model_versions(f"name='{name}'")
    scores = {s["stage"]: s["test_scores"]["CIDEr"] for s in summary["stages"]}
    best = max(reversed(["xe", "finetune", "scst"]), key=lambda s: scores[s])
    assert [v.tags["stage"] for v in versions] == [best] and summary["best_stage"] == best
    assert summary["registered"]["alias"] == "champion" and summary["registered"]["promoted"]
    assert client.get_model_version_by_alias(name, "champion").run_id == runs[best].info.run_id
    assert "model" in {f.path for f in client.list_artifacts(runs[best].info.run_id)}
    # Resumed when every stage is done: nothing launched, nothing registered twice.
    lines.clear()
    again = train_pipeline(
        "demo", [*data, *TINY, *tracking], output=str(out), resume=True, on_line=lines.append
    )
    assert not any(line.startswith("torchrun") for line in lines)
    assert again["registered"]["already_registered"] and again["registered"]["version"] == versions[0].version
    assert len(client.search_model_versions(f"name='{name}'")) == 1
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)  # models:/ URIs resolve through it
    captioner = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(buffer, format="JPEG")
    image = buffer.getvalue()
    caption = captioner.predict(pd.DataFrame({"image": [image]}))["caption"][0]
    assert isinstance(caption, str) and caption


def test_unreachable_tracking_server_stops_the_run_before_training(data: list[str], tmp_path: Path) -> None:
    out = tmp_path / "run"
    dead = f"--tracking.tracking_uri=http://127.0.0.1:{free_port()}"
    fast = "--tracking.connect_timeout_s=1"  # nothing will start there: do not wait the default 10 s
    with pytest.raises(TrainError, match="captioning mlflow start"):
        main(["--stage", "xe", "--config", "demo", "--output", str(out), *data, *TINY, dead, fast])
    assert not (out / "xe").exists()
    with pytest.raises(RuntimeError, match="captioning mlflow start"):  # the pipeline: before any launch
        train_pipeline("demo", [*data, *TINY, dead, fast], output=str(out), launch=in_process)
    assert not (out / "xe").exists()


def test_killed_stage_resumes_to_the_same_result(
    data: list[str], tmp_path: Path, torchrun: str, java: str
) -> None:
    common = [*data, *tiny("--train.xe.epochs=2", "--train.checkpoint_every_steps=1"), "--tracker", "none"]
    straight = tmp_path / "straight"
    run_to_end(["--stage", "xe", "--config", "demo", "--output", str(straight), *common])

    killed = tmp_path / "killed"
    proc = start_torchrun(["--stage", "xe", "--config", "demo", "--output", str(killed), *common])
    last = killed / "xe" / "last.pt"
    deadline = time.monotonic() + 300
    while not last.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # a few more steps, so the kill lands in the middle of the run
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher's group; its workers have sessions of their own
    proc.communicate(timeout=60)  # returns once every holder of the output pipe (the workers) is gone
    assert not [
        p for p in psutil.process_iter(["cmdline"]) if str(killed) in " ".join(p.info["cmdline"] or [])
    ]
    assert last.exists(), "no checkpoint was written before the kill"
    assert not (killed / "xe" / "result.json").exists(), "the run finished before it was killed"
    step_at_kill = load_checkpoint(str(last))["train_state"]
    assert step_at_kill["step"] < 12

    log = run_to_end(
        ["--stage", "xe", "--config", "demo", "--output", str(killed), *common]
    )  # the rule resumes
    assert "resumed stage xe" in log
    a, b = (load_checkpoint(str(d / "xe" / "last.pt")) for d in (straight, killed))
    assert a["train_state"]["step"] == b["train_state"]["step"] == 12
    assert same_tensors(a["model"], b["model"])
    assert a["train_state"]["history"] == b["train_state"]["history"]
    sa, sb = (storage.read_json(str(d / "xe" / "result.json")) for d in (straight, killed))
    assert sa["test_scores"] == sb["test_scores"]
    assert storage.read_json(str(straight / "xe" / "test-captions.json")) == storage.read_json(
        str(killed / "xe" / "test-captions.json")
    )


def test_a_crash_mid_epoch_loses_at_most_one_checkpoint_interval(
    data: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, java: str
) -> None:
    """Each step takes one minute on the checkpoints' clock; checkpoints every 2 minutes (and never by
    step count); the process dies during step 6: last.pt holds step 4, and the resumed stage ends with
    the weights of an uninterrupted one."""
    from captioning.training import steps, trainer

    now = [0.0]
    monkeypatch.setattr(trainer, "CLOCK", lambda: now[0])
    crash_at: list[int | None] = [6]
    calls = [0]
    original = steps.XeStep.__call__

    def timed(self: Any, batch: Any) -> Any:
        calls[0] += 1
        if calls[0] == crash_at[0]:
            raise RuntimeError("the machine died")
        now[0] += 60.0
        return original(self, batch)

    monkeypatch.setattr(steps.XeStep, "__call__", timed)
    settings = tiny("--train.checkpoint_every_steps=0", "--train.log_every_steps=1")
    interval = ["--train.checkpoint_every_minutes=2"]
    args = ["--stage", "xe", "--config", "demo", "--tracker", "none", *data, *settings]
    out = tmp_path / "crashed"
    with pytest.raises(RuntimeError, match="the machine died"):
        main([*args, *interval, "--output", str(out)])
    saved = load_checkpoint(str(out / "xe" / "last.pt"))
    done = 5  # steps finished before the crash
    assert saved["step"] == saved["train_state"]["batch_in_epoch"] == 4
    assert done - saved["step"] <= 2  # at most one interval's steps lost
    crash_at[0] = None
    resumed = main([*args, "--train.checkpoint_every_minutes=0.5", "--output", str(out)])  # free to change
    assert resumed.steps == 12
    whole = main([*args, *interval, "--output", str(tmp_path / "whole")])
    assert same_tensors(model_state(resumed.checkpoint), model_state(whole.checkpoint), "")
    # Without the clock nothing was saved before the crash: the interval is what bounded the loss.
    calls[0], crash_at[0] = 0, 6
    with pytest.raises(RuntimeError, match="the machine died"):
        main([*args, "--train.checkpoint_every_minutes=0", "--output", str(tmp_path / "no-clock")])
    assert not (tmp_path / "no-clock" / "xe" / "last.pt").exists()


FULL_DISK = """
import builtins, errno, os, runpy, sys

import captioning.storage as storage

def full_disk_open(file, mode="r", *args, **kwargs):
    if "w" in mode and ".last.pt." in os.path.basename(str(file)):  # the tmp file of last.pt
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(file))
    return builtins.open(file, mode, *args, **kwargs)

storage.open = full_disk_open
sys.argv = ["captioning.train", *sys.argv[1:]]
runpy.run_module("captioning.train", run_name="__main__")
"""


def test_a_full_disk_stops_training_with_one_line(
    data: list[str], tmp_path: Path, subprocess_tree: None
) -> None:
    out = tmp_path / "run"
    args = ["--stage", "xe", "--config", "demo", "--tracker", "none", "--output", str(out), *data, *TINY]
    done = subprocess.run(
        [sys.executable, "-c", FULL_DISK, *args],
        cwd=REPO, capture_output=True, text=True, timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert done.returncode == 2, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: [Errno 28] cannot write {out / 'xe' / 'last.pt'}: no space left"), last
    assert "MiB needed" in last and "MiB free there" in last
    assert "Traceback" not in done.stderr
    assert not list((out / "xe").glob(".*.tmp"))
