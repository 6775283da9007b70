"""The `captioning` command: subcommands end to end on small synthetic data."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from captioning.cli import main
from captioning.config import split_overrides
from captioning.data.vocab import Vocab

SMALL = ["--data.synthetic.num_train=30", "--data.synthetic.num_val=6", "--data.synthetic.num_test=6"]


def test_help_lists_subcommands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for command in ("config", "synth", "records", "vocab", "demo"):
        assert command in out


def test_console_script_installed() -> None:
    exe = shutil.which("captioning", path=str(Path(sys.executable).parent))
    assert exe is not None, "the `captioning` console script is not installed in the venv"
    out = subprocess.run([exe, "config", "--list"], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.split() == ["coco", "demo", "flickr30k", "flickr8k"]


def test_split_overrides_never_takes_a_value_for_a_positional() -> None:
    own, overrides = split_overrides(["config", "--train.xe.epochs", "2", "demo", "--seed=3", "--describe"])
    assert own == ["config", "demo", "--describe"]
    assert overrides == ["--train.xe.epochs", "2", "--seed=3"]


def test_config_prints_resolved_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "demo", "--train.xe.epochs", "2", "--model.encoder=resnet34"]) == 0
    resolved = json.loads(capsys.readouterr().out)
    assert resolved["train"]["xe"]["epochs"] == 2
    assert resolved["model"]["encoder"] == "resnet34"
    assert resolved["recipe"] == "demo"


def test_config_errors_exit_2_with_message(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "--train.xe.epocs=2"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'train.xe.epocs'" in err and "train.xe.epochs" in err
    assert main(["config", "nosuchrecipe"]) == 2


def test_config_warns_about_inert_options(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "--train.xe.lr_encoder=1e-3"]) == 0
    assert "warning: train.xe.lr_encoder is set" in capsys.readouterr().err


def test_synth_records_vocab(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["synth", str(tmp_path / "raw"), *SMALL]) == 0
    json_path = tmp_path / "raw" / "dataset_coco.json"
    assert json_path.is_file()
    capsys.readouterr()

    assert main(["records", str(json_path)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["images"] == {"train": 30, "val": 6, "test": 6}
    assert summary["captions"]["train"] == 150

    assert main(["vocab", str(json_path), str(tmp_path / "vocab.json"), "--recipe", "demo"]) == 0
    report = json.loads(capsys.readouterr().out)
    vocab = Vocab.load(tmp_path / "vocab.json")
    assert report["vocab_size"] == len(vocab) > 4
    assert report["train_length_policy"]["num_captions"] == 150


def test_records_reports_malformed_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "dataset_coco.json"
    bad.write_text(json.dumps({"images": [{"filename": "a.jpg", "cocoid": 1, "sentences": []}]}))
    assert main(["records", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "images[0] (filename 'a.jpg', cocoid 1): missing field 'split'" in err


def small_dirs(tmp_path: Path) -> list[str]:
    return [f"--data.raw_dir={tmp_path / 'raw'}", f"--data.shard_dir={tmp_path / 'shards'}"]


def test_demo_builds_shards_and_reruns_as_a_no_op(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["demo", "--prepare-only", *SMALL, *small_dirs(tmp_path)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "[demo] shards: 3 built, 0 already complete" in out
    assert "[demo] train       30       1" in out
    assert (tmp_path / "shards" / "sizes.json").is_file()
    assert main(argv) == 0
    assert "[demo] shards: 0 built, 3 already complete" in capsys.readouterr().out


def test_demo_trains_under_torchrun_and_prints_the_scores(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], torchrun: str, java: str
) -> None:
    tiny = [
        "--train.nproc_per_node=1",
        "--train.stages=xe",
        "--train.xe.epochs=1",
        "--data.loader.batch_size=10",
        "--model.decoder_dim=16",
        "--eval.beam_size=1",
        "--eval.max_len=6",
    ]
    run = tmp_path / "run"
    assert main(["demo", *SMALL, *small_dirs(tmp_path), *tiny, "--output", str(run)]) == 0
    out = capfd.readouterr().out
    assert (
        "[demo] torchrun --nproc-per-node=1 --nnodes=1 --rdzv-backend=c10d --rdzv-endpoint=127.0.0.1:0 "
        "--local-addr=127.0.0.1 -m captioning.train --stage xe --config demo" in out
    )
    assert re.search(r"\[demo\] \| xe \| [0-9.]+ \| [0-9.]+", out), out[-3000:]
    assert f"[demo] final model: {run / 'xe' / 'best.pt'}" in out
    assert (run / "xe" / "result.json").is_file()
    # A second run into the same folder is refused, and the demo says how to continue it.
    assert main(["demo", *SMALL, *small_dirs(tmp_path), *tiny, "--output", str(run)]) != 0
    assert "--resume" in capfd.readouterr().err


def test_download_shards_inspect_verify(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    common = ["--recipe", "demo", *SMALL, *small_dirs(tmp_path)]
    assert main(["download", *common, "--no-progress"]) == 0
    raw = json.loads(capsys.readouterr().out)
    assert raw["dataset"] == "synthetic" and Path(raw["karpathy_json"]).is_file()

    assert main(["shards", *common, "--no-progress"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["splits"]["train"]["samples"] == 30 and report["built"] == 3

    assert (
        main(["inspect", *common, "--split", "val", "-n", "2", "--save-images", str(tmp_path / "seen")]) == 0
    )
    seen = json.loads(capsys.readouterr().out)
    samples = seen["samples"]["val"]
    assert len(samples) == 2 and len(samples[0]["captions"]) == 5
    assert Path(samples[0]["image_file"]).is_file()

    assert main(["verify", str(tmp_path / "shards")]) == 0
    assert "OK" in capsys.readouterr().out
    tar = next((tmp_path / "shards").glob("val-*.tar"))
    tar.write_bytes(tar.read_bytes()[:-10])
    assert main(["verify", str(tmp_path / "shards")]) == 1
    assert "val-000000.tar" in capsys.readouterr().err
