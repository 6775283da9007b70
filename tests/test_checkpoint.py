"""Checkpoints: round trips give identical models, plain data only, wrappers stripped."""

from __future__ import annotations

import dataclasses
import errno
import os
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from captioning.config import Config, ModelConfig
from captioning.data.vocab import SPECIALS, Vocab
from captioning.model import (
    Captioner,
    build_captioner,
    captioner_from_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from captioning.model.checkpoint import FORMAT_VERSION, clean_state_dict
from captioning.storage import StorageFull

WORDS = ("a", "red", "blue", "circle", "square", "on", "left", "right")
VOCAB = Vocab(SPECIALS + WORDS, (0,) * len(SPECIALS) + (3,) * len(WORDS), min_word_freq=1)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny(arch: str) -> tuple[ModelConfig, dict[str, object]]:
    model_cfg = ModelConfig(
        arch=arch,  # type: ignore[arg-type]
        encoder="resnet18",
        encoder_weights="imagenet",  # recorded as configured; rebuilding must not download
        encoded_image_size=2,
        emb_dim=8,
        attention_dim=8,
        decoder_dim=12,
        dropout=0.3,
    )
    return model_cfg, dataclasses.replace(Config(), model=model_cfg).to_dict()


def trained_model(arch: str) -> Captioner:
    """A captioner with non-default weights and BatchNorm statistics (one training step)."""
    model_cfg, _ = tiny(arch)
    torch.manual_seed(0)
    model = build_captioner(dataclasses.replace(model_cfg, encoder_weights=None), len(VOCAB))
    model.model_config = model_cfg
    model.encoder.set_fine_tuning(True, from_block=4)
    model.train()
    captions = torch.tensor([[[1, 4, 5, 7, 2, 0]], [[1, 6, 7, 2, 0, 0]]])
    lengths = torch.tensor([[5], [4]])
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    out = model(model.encode(torch.randn(2, 3, 32, 32)), captions, lengths)
    out.logits.logsumexp(-1).mean().backward()
    optimizer.step()
    return model.eval()


@pytest.mark.parametrize("arch", ["show_attend_tell", "fc", "show_tell"])
def test_round_trip_gives_identical_outputs(tmp_path: Path, arch: str) -> None:
    model = trained_model(arch)
    _, config = tiny(arch)
    path = str(tmp_path / "ckpt.pt")
    save_checkpoint(path, model=model, vocab=VOCAB, config=config, step=7, extra={"best_cider": 0.5})
    loaded, vocab, ckpt = captioner_from_checkpoint(path)
    assert not loaded.training and vocab == VOCAB
    assert ckpt["step"] == 7 and ckpt["best_cider"] == 0.5 and ckpt["config"] == config
    assert loaded.model_config == model.model_config  # encoder_weights="imagenet" kept for later saves

    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    captions = torch.tensor([[[1, 4, 5, 2], [1, 6, 2, 0]]] * 3)
    lengths = torch.tensor([[4, 3]] * 3)
    with torch.no_grad():
        expected = model(model.encode(images), captions, lengths)
        got = loaded(loaded.encode(images), captions, lengths)
        greedy = model.generate(model.encode(images), method="greedy", max_len=6)
        greedy_loaded = loaded.generate(loaded.encode(images), method="greedy", max_len=6)
    assert torch.equal(expected.logits, got.logits)
    assert torch.equal(greedy.tokens, greedy_loaded.tokens)
    assert torch.equal(greedy.scores, greedy_loaded.scores)


def test_checkpoint_is_plain_data_loadable_with_weights_only(tmp_path: Path) -> None:
    model = trained_model("show_attend_tell")
    _, config = tiny("show_attend_tell")
    path = tmp_path / "sub" / "ckpt.pt"  # parents are created
    save_checkpoint(str(path), model=model, vocab=VOCAB, config=config, step=3)
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert set(raw) == {"format_version", "model", "model_config", "vocab", "config", "step"}
    assert raw["format_version"] == FORMAT_VERSION
    assert raw["model_config"] == dataclasses.asdict(model.model_config)  # type: ignore[arg-type]
    assert raw["vocab"] == VOCAB.to_json()
    assert all(isinstance(v, torch.Tensor) for v in raw["model"].values())
    assert raw.keys() == load_checkpoint(str(path)).keys()
    assert [p.name for p in path.parent.iterdir()] == ["ckpt.pt"]  # no temporary left behind
    # a dict works as well as a path
    rebuilt, _, _ = captioner_from_checkpoint(raw)
    assert rebuilt.arch == "show_attend_tell"


class Wrapper(nn.Module):
    """Stands in for DistributedDataParallel: the model as ``.module``, keys prefixed with ``module.``."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module


def test_wrapped_models_are_saved_unwrapped(tmp_path: Path) -> None:
    model = trained_model("fc")
    _, config = tiny("fc")
    assert all(k.startswith("module.") for k in Wrapper(model).state_dict())
    save_checkpoint(str(tmp_path / "c.pt"), model=Wrapper(model), vocab=VOCAB, config=config, step=1)
    ckpt = load_checkpoint(str(tmp_path / "c.pt"))
    assert ckpt["model"].keys() == model.state_dict().keys()
    assert clean_state_dict({"module._orig_mod.fc.weight": torch.zeros(1)}).keys() == {"fc.weight"}


def test_bad_saves_and_loads_are_clear_errors(tmp_path: Path) -> None:
    model = trained_model("fc")
    _, config = tiny("fc")
    with pytest.raises(ValueError, match="overwrite"):
        save_checkpoint(
            str(tmp_path / "c.pt"), model=model, vocab=VOCAB, config=config, step=1, extra={"step": 2}
        )
    bare = Captioner(model.encoder, model.decoder)
    with pytest.raises(ValueError, match="build_captioner"):
        save_checkpoint(str(tmp_path / "c.pt"), model=bare, vocab=VOCAB, config=config, step=1)
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a captioning checkpoint"):
        load_checkpoint(str(tmp_path / "other.pt"))


class _FillsUp:
    """A file whose disk fills up after ``room`` bytes (ENOSPC, as a full disk answers write())."""

    def __init__(self, path: str, room: int) -> None:
        self.file = open(path, "wb")  # noqa: SIM115 (closed in __exit__)
        self.room = room

    def __enter__(self) -> _FillsUp:
        return self

    def __exit__(self, *exc: object) -> None:
        self.file.close()

    def write(self, data: bytes) -> int:
        if len(data) > self.room:
            self.file.write(data[: self.room])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.file.write(data)

    def flush(self) -> None:
        self.file.flush()

    def fileno(self) -> int:
        return self.file.fileno()


def test_a_full_disk_names_the_file_and_the_space_and_keeps_the_last_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import captioning.storage as storage_module

    model = trained_model("show_attend_tell")
    _, config = tiny("show_attend_tell")
    path = tmp_path / "last.pt"
    save_checkpoint(str(path), model=model, vocab=VOCAB, config=config, step=3)
    size = path.stat().st_size

    def full_disk_open(file: str, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        return _FillsUp(file, 1000) if "w" in mode else open(file, mode, *args, **kwargs)

    monkeypatch.setattr(storage_module, "open", full_disk_open, raising=False)
    with pytest.raises(StorageFull) as info:
        save_checkpoint(str(path), model=model, vocab=VOCAB, config=config, step=4)
    message = str(info.value)
    assert "\n" not in message and info.value.errno == errno.ENOSPC
    assert f"cannot write {path}: no space left on the device ({size / 2**20:.1f} MiB needed, " in message
    assert re.search(r"\d+\.\d MiB free there\); the previous file there is unchanged$", message), message
    assert load_checkpoint(str(path))["step"] == 3  # the last good one, whole
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no partial temporary left
