"""evaluate() on tiny synthetic shards with a random-weights checkpoint, at world size 1 and over 2
gloo ranks with an uneven split (13 images, batches of 2: 4 batches on rank 0, 3 on rank 1).

The shards come from ``prepare_data`` on the synthetic dataset (32 px images, 13 val images in 3
shards); the model is a ResNet-18 Show-Attend-Tell with a tiny decoder, saved once and loaded by
every run, so the 1-rank and 2-rank captions must agree word for word.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
from gloo import join_gloo
from s3server import free_port
from torch import nn

from captioning.config import EvalConfig, LoaderConfig, load_config
from captioning.data.batch import Batch
from captioning.data.format import read_references
from captioning.data.loader import build_loader
from captioning.data.prepare import prepare_data
from captioning.data.vocab import END_ID, SPECIALS, START_ID, UNK_ID, Vocab
from captioning.evaluation.evaluate import (
    EvalResult,
    caption_text,
    decode_split,
    evaluate,
    evaluate_checkpoint,
    merge_ranks,
)
from captioning.evaluation.metrics import METRICS, read_coco_results
from captioning.model.checkpoint import captioner_from_checkpoint, save_checkpoint
from captioning.model.factory import build_captioner
from captioning.training import dist as D
from captioning.training.dist import DistInfo

pytestmark = pytest.mark.usefixtures("one_torch_thread")

NUM_VAL = 13
SIDE = 32
DECODING: dict[str, Any] = dict(beam_size=2, max_len=8, length_normalization=False)
EVAL = EvalConfig(**DECODING)  # and the defaults: no SPICE, the default Java timeout


@dataclasses.dataclass(frozen=True)
class Artefacts:
    shard_dir: str
    checkpoint: str
    vocab: Vocab


@pytest.fixture(scope="module")
def artefacts(tmp_path_factory: pytest.TempPathFactory) -> Artefacts:
    root = tmp_path_factory.mktemp("eval")
    cfg = load_config(
        "demo",
        [
            f"--data.raw_dir={root / 'raw'}",
            f"--data.shard_dir={root / 'shards'}",
            "--data.synthetic.num_train=20",
            f"--data.synthetic.num_val={NUM_VAL}",
            "--data.synthetic.num_test=3",
            f"--data.synthetic.image_size={SIDE}",
            f"--data.shards.image_size={SIDE}",
            "--data.shards.samples_per_shard=5",
            "--data.shards.num_procs=1",
            "--data.min_word_freq=1",
        ],
    )
    prepare_data(cfg, progress=False)
    vocab = Vocab.load(root / "shards" / "vocab.json")
    model_cfg = dataclasses.replace(
        cfg.model,
        encoder_weights=None,
        encoded_image_size=2,
        emb_dim=16,
        attention_dim=16,
        decoder_dim=24,
        dropout=0.0,
    )
    torch.manual_seed(0)
    model = build_captioner(model_cfg, len(vocab))
    checkpoint = str(root / "model.pt")
    config = dataclasses.replace(cfg, model=model_cfg).to_dict()
    save_checkpoint(checkpoint, model=model, vocab=vocab, config=config, step=0)
    return Artefacts(str(root / "shards"), checkpoint, vocab)


@pytest.fixture(scope="module")
def one_rank(
    artefacts: Artefacts, tmp_path_factory: pytest.TempPathFactory, java: str
) -> tuple[EvalResult, str]:
    results = str(tmp_path_factory.mktemp("results") / "val-results.json")
    result = evaluate_checkpoint(
        artefacts.checkpoint,
        artefacts.shard_dir,
        "val",
        EVAL,
        batch_size=2,
        num_workers=1,
        results_uri=results,
        device="cpu",
    )
    return result, results


def test_world_one_captions_every_image_once_and_scores_them(
    artefacts: Artefacts, one_rank: tuple[EvalResult, str]
) -> None:
    result, _ = one_rank
    stored = read_references(artefacts.shard_dir, "val")
    assert len(stored) == NUM_VAL
    assert list(result.captions) == sorted(stored) and list(result.references) == sorted(stored)
    assert result.num_images == NUM_VAL
    assert tuple(result.scores) == METRICS and result.skipped == {}
    assert set(result.per_image) == set(stored)
    assert result.duration_s > 0 and result.images_per_s > 0
    vocab = artefacts.vocab
    for image_id, caption in result.captions.items():
        words = caption.split()
        assert 1 <= len(words) <= DECODING["max_len"]
        assert all(w in vocab and w not in SPECIALS for w in words)
        # references: every one of the image's, as stored (ids) in references.json
        refs = result.references[image_id]
        assert [vocab.encode(r.split())[1:-1] for r in refs] == stored[image_id]


def test_results_file_is_coco_results_json(one_rank: tuple[EvalResult, str]) -> None:
    result, path = one_rank
    entries = json.loads(Path(path).read_text())
    assert [e["image_id"] for e in entries] == sorted(result.captions)
    assert all(set(e) == {"image_id", "caption"} for e in entries)
    assert read_coco_results(path) == result.captions


def test_decode_split_restores_modes_and_unwraps(
    artefacts: Artefacts, one_rank: tuple[EvalResult, str]
) -> None:
    model, vocab, _ = captioner_from_checkpoint(artefacts.checkpoint)
    model.train()
    model.encoder.eval()  # a frozen encoder kept in eval mode while the decoder trains

    class Wrapper(nn.Module):  # stands in for DistributedDataParallel: the model under .module
        def __init__(self, module: nn.Module) -> None:
            super().__init__()
            self.module = module

    wrapped = Wrapper(model)
    modes = {name: m.training for name, m in wrapped.named_modules()}
    loader = build_loader(
        LoaderConfig(num_workers=0),
        artefacts.shard_dir,
        "val",
        train=False,
        dist=DistInfo(),
        image_size=SIDE,
        seed=0,
        batch_size=5,
    )
    captions, references = decode_split(wrapped, loader, vocab, DistInfo(), **DECODING)
    assert {name: m.training for name, m in wrapped.named_modules()} == modes
    result, _ = one_rank
    assert captions == result.captions  # other batch size, same captions
    assert references == result.references


def test_decode_split_refuses_an_image_twice(artefacts: Artefacts) -> None:
    model, vocab, _ = captioner_from_checkpoint(artefacts.checkpoint)
    loader = build_loader(
        LoaderConfig(num_workers=0),
        artefacts.shard_dir,
        "val",
        train=False,
        dist=DistInfo(),
        image_size=SIDE,
        seed=0,
        batch_size=4,
    )
    first = next(iter(loader))
    with pytest.raises(RuntimeError, match="came twice on rank 0"):
        decode_split(model, [first, first], vocab, DistInfo(), **DECODING)


def test_caption_text_stops_at_end_and_drops_specials() -> None:
    vocab = Vocab((*SPECIALS, "a", "cat"), (0, 0, 0, 0, 3, 2), min_word_freq=1)
    assert caption_text([4, UNK_ID, 5, END_ID, 4, 4], vocab) == "a cat"
    assert caption_text([START_ID, END_ID], vocab) == ""


def test_merge_ranks_refuses_an_image_on_two_ranks() -> None:
    parts = [({1: "a", 3: "c"}, {1: ["x"], 3: ["z"]}), ({2: "b"}, {2: ["y"]})]
    captions, references = merge_ranks(parts)
    assert list(captions) == [1, 2, 3] and references == {1: ["x"], 2: ["y"], 3: ["z"]}
    with pytest.raises(RuntimeError, match="image 3 was decoded on ranks 0 and 1"):
        merge_ranks([*parts[:1], ({3: "c"}, {3: ["z"]})])


# --------------------------------------------------------------------------------------------------
# 2 ranks (gloo), 1 DataLoader worker each, 13 images: uneven batch counts
# --------------------------------------------------------------------------------------------------


def failing_loader() -> Iterator[Batch]:
    """Rank 1's loader in the failure run: dies before its first batch."""
    raise RuntimeError("the shard reader exploded")
    yield  # a generator: it raises when evaluate iterates it


def eval_rank(rank: int, world: int, port: int, artefacts: Artefacts, out: str) -> None:
    torch.set_num_threads(1)
    dist = join_gloo(rank, world, port)
    try:
        model, vocab, _ = captioner_from_checkpoint(artefacts.checkpoint)
        loader = build_loader(
            LoaderConfig(num_workers=1),
            artefacts.shard_dir,
            "val",
            train=False,
            dist=dist,
            image_size=SIDE,
            seed=0,
            batch_size=2,
        )
        record: dict[str, Any] = {"batches": len(loader)}
        result = evaluate(model, loader, vocab, dist, EVAL, results_uri=str(Path(out, "results.json")))
        record["result"] = dataclasses.asdict(result)
        errors: dict[str, str] = {}
        # rank 1's loader fails: every rank raises instead of waiting in a collective
        broken: Any = failing_loader() if rank == 1 else loader
        try:
            evaluate(model, broken, vocab, dist, EVAL)
        except RuntimeError as e:
            errors["decode"] = f"{type(e).__name__}: {e}"
        # no java on rank 0's PATH: its ScoringError reaches every rank
        empty = Path(out, f"empty{rank}")
        empty.mkdir()
        os.environ["PATH"] = str(empty)
        try:
            evaluate(model, loader, vocab, dist, EVAL)
        except RuntimeError as e:
            errors["scoring"] = f"{type(e).__name__}: {e}"
        record["errors"] = errors
        Path(out, f"rank{rank}.json").write_text(json.dumps(record))
    finally:
        D.destroy_process_group(dist)


def test_two_ranks_uneven_split_agree_with_one_rank(
    artefacts: Artefacts, one_rank: tuple[EvalResult, str], tmp_path: Path
) -> None:
    mp.spawn(eval_rank, args=(2, free_port(), artefacts, str(tmp_path)), nprocs=2, join=True)
    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["batches"] for r in records] == [4, 3]  # 7 + 6 images in batches of 2
    first, second = (r["result"] for r in records)
    assert first == second  # the same result on both ranks, timings included

    single, _ = one_rank
    captions = {int(k): v for k, v in first["captions"].items()}
    assert sorted(captions) == list(single.captions) and len(captions) == first["num_images"] == NUM_VAL
    assert captions == single.captions
    assert {int(k): v for k, v in first["references"].items()} == single.references
    assert first["scores"] == pytest.approx(single.scores, rel=1e-9)
    assert read_coco_results(str(tmp_path / "results.json")) == single.captions

    for r in records:
        assert r["errors"]["scoring"].startswith("ScoringError: no `java` on PATH")
    assert records[0]["errors"]["decode"] == (
        "RuntimeError: evaluation failed on rank 1: RuntimeError: the shard reader exploded"
    )
    assert records[1]["errors"]["decode"] == "RuntimeError: the shard reader exploded"
