"""Evaluation: beam-search captions for a split on every rank, gather them, score them on rank 0.

    result = evaluate(ddp_model, loaders["val"], vocab, dist, cfg.eval)   # cfg.eval: beam size, max_len, ...
    result.scores["CIDEr"], result.captions[image_id]        # the same EvalResult on every rank
    scores = score_checkpoint("runs/x/best.pt", cfg, "test")   # the model's own decoding, cfg's loader

Why it cannot deadlock a DDP job: the eval loader (``train=False``) gives each image to exactly one
rank, with batch counts that may differ between ranks, so decoding runs no collective at all. Then
come exactly two collectives on every rank, whatever happens: one ``all_gather_object`` of each
rank's captions (or of its error), and one ``broadcast_object`` of rank 0's result (or of its
error). Scoring and the COCO results file happen on rank 0 only; a failure anywhere (a decoding
error on one rank, a ``ScoringError`` on rank 0) is raised on every rank.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from captioning.config import Config, EvalConfig, LoaderConfig
from captioning.data.batch import Batch
from captioning.data.loader import build_loader
from captioning.data.vocab import SPECIALS, Vocab
from captioning.evaluation.metrics import ScoringError, score_captions, write_coco_results
from captioning.model.captioner import Captioner
from captioning.model.checkpoint import captioner_from_checkpoint, decoding_of, load_checkpoint, unwrap_model
from captioning.progress import show_progress
from captioning.training.dist import DistInfo, all_gather_object, broadcast_object

log = logging.getLogger(__name__)


@dataclass
class EvalResult:
    """The scores of one split and what they were computed from."""

    scores: dict[str, float]  # overall metrics (METRICS, + "SPICE" when computed)
    captions: dict[int, str]  # image_id -> decoded caption (words joined by spaces, no specials)
    references: dict[int, list[str]]  # image_id -> reference strings
    per_image: dict[int, dict[str, float]]  # image_id -> metric -> score
    skipped: dict[str, str]  # metric -> why it was not computed
    num_images: int
    duration_s: float  # decoding, gathering and scoring
    images_per_s: float  # decoding throughput: all images / the slowest rank's decoding time


def caption_text(tokens: Iterable[int], vocab: Vocab) -> str:
    """Generated ids -> the caption string: words up to <end>, specials (<unk> too) dropped."""
    return " ".join(word for word in vocab.decode(tokens) if word not in SPECIALS)


def _rows_to_decode(batch: Batch, done: Mapping[int, str], rank: int) -> list[int]:
    """The first row of each image of the batch that is not padding and not seen before.

    In caption_mode="all" an image fills one row per reference; it is decoded once. An image that
    already came in an earlier batch means the loader broke its every-image-once contract.
    """
    rows: list[int] = []
    here: set[int] = set()
    for row, (image_id, is_pad) in enumerate(
        zip(batch.image_ids.tolist(), batch.is_pad.tolist(), strict=True)
    ):
        if is_pad or image_id in here:
            continue
        if image_id in done:
            raise RuntimeError(
                f"image {image_id} came twice on rank {rank}: the eval loader must give it once"
            )
        here.add(image_id)
        rows.append(row)
    return rows


def decode_split(
    model: nn.Module,
    loader: Iterable[Batch],
    vocab: Vocab,
    dist: DistInfo,
    *,
    beam_size: int,
    max_len: int,
    length_normalization: bool,
    device: torch.device | None = None,
) -> tuple[dict[int, str], dict[int, list[str]]]:
    """This rank's captions and references: image_id -> caption, image_id -> reference strings.

    Beam search (``beam_size=1`` is greedy) under ``torch.no_grad()`` in eval mode; every module's
    train/eval mode is restored afterwards. ``model`` may be DDP-wrapped. No collectives: ranks
    may hold different numbers of batches. ``device``: where to decode (default: the model's).
    """
    inner = unwrap_model(model)
    if not isinstance(inner, Captioner):
        raise TypeError(f"expected a Captioner (possibly DDP-wrapped), got {type(inner).__name__}")
    if device is None:
        device = next(inner.parameters()).device
    modes = {module: module.training for module in model.modules()}
    captions: dict[int, str] = {}
    references: dict[int, list[str]] = {}
    expected = getattr(loader, "num_samples", None)
    model.eval()
    try:
        with (
            torch.no_grad(),
            show_progress(  # rank 0's share: lines in a log (every LINE_EVERY_S), a bar on a terminal
                expected if isinstance(expected, int) else None,
                "decoding",
                unit="image",
                enabled=dist.is_main,
            ) as shown,
        ):
            for batch in loader:
                rows = _rows_to_decode(batch, captions, dist.rank)
                if not rows:
                    continue
                if len(batch.references) != len(batch):
                    raise ValueError(
                        f"batch of {len(batch)} rows has {len(batch.references)} reference lists"
                    )
                index = torch.tensor(rows, device=batch.images.device)
                images = batch.images.index_select(0, index).to(device)  # (B, 3, H, W)
                features = inner.encode(images)  # (B, P, E)
                generation = inner.generate(
                    features,
                    method="beam",
                    beam_size=beam_size,
                    max_len=max_len,
                    length_normalization=length_normalization,
                )
                tokens = generation.tokens[:, 0].tolist()  # (B, T)
                image_ids = batch.image_ids.tolist()
                for row, ids in zip(rows, tokens, strict=True):
                    captions[image_ids[row]] = caption_text(ids, vocab)
                    references[image_ids[row]] = [" ".join(ref) for ref in batch.references[row]]
                shown.update(len(rows))
    finally:
        for module, training in modes.items():
            module.training = training
    if isinstance(expected, int) and expected != len(captions):
        raise RuntimeError(f"rank {dist.rank} decoded {len(captions)} images, its loader plans {expected}")
    return captions, references


def merge_ranks(
    parts: Sequence[tuple[Mapping[int, str], Mapping[int, Sequence[str]]]],
) -> tuple[dict[int, str], dict[int, list[str]]]:
    """Union of the ranks' (captions, references), sorted by image id; an image on two ranks raises."""
    owner: dict[int, int] = {}
    captions: dict[int, str] = {}
    references: dict[int, list[str]] = {}
    for rank, (rank_captions, rank_references) in enumerate(parts):
        if set(rank_captions) != set(rank_references):
            raise RuntimeError(f"rank {rank}: captions and references cover different images")
        for image_id, caption in rank_captions.items():
            if image_id in owner:
                raise RuntimeError(
                    f"image {image_id} was decoded on ranks {owner[image_id]} and {rank}: "
                    "the eval loader must give every image to exactly one rank"
                )
            owner[image_id] = rank
            captions[image_id] = caption
            references[image_id] = list(rank_references[image_id])
    order = sorted(captions)
    return {i: captions[i] for i in order}, {i: references[i] for i in order}


def _raise_remote(error: tuple[str, str], where: str) -> None:
    kind, message = error
    if kind == ScoringError.__name__:
        raise ScoringError(message)
    raise RuntimeError(f"evaluation failed on {where}: {kind}: {message}")


def evaluate(
    model: nn.Module,
    loader: Iterable[Batch],
    vocab: Vocab,
    dist: DistInfo,
    ev: EvalConfig,
    *,
    results_uri: str | None = None,
) -> EvalResult:
    """Decode ``loader``'s split on every rank, score it on rank 0, return the same result everywhere.

    ``ev``: the ``eval`` section (beam size, max length, length normalisation, SPICE, the Java
    timeout). ``results_uri`` (local path or s3://): rank 0 writes the COCO results file there before
    scoring. Call on every rank; raises ScoringError on every rank when scoring fails.
    """
    started = time.perf_counter()
    local: dict[str, Any] = {"error": None}
    local_exc: BaseException | None = None
    try:
        local["captions"], local["references"] = decode_split(
            model,
            loader,
            vocab,
            dist,
            beam_size=ev.beam_size,
            max_len=ev.max_len,
            length_normalization=ev.length_normalization,
        )
    except Exception as e:  # every rank must reach the gather, or the others wait forever
        local_exc, local["error"] = e, (type(e).__name__, str(e))
    local["decode_s"] = time.perf_counter() - started
    gathered = all_gather_object(dist, local)
    for rank, part in enumerate(gathered):
        if part["error"] is not None:
            if local_exc is not None:
                raise local_exc
            _raise_remote(part["error"], f"rank {rank}")
    captions, references = merge_ranks([(p["captions"], p["references"]) for p in gathered])
    decode_s = max(p["decode_s"] for p in gathered)

    outcome: dict[str, Any] = {}
    main_exc: Exception | None = None
    if dist.is_main:
        try:
            if results_uri is not None:
                write_coco_results(results_uri, captions)
            scores = score_captions(captions, references, spice=ev.spice, timeout_s=ev.java_timeout_s)
            num_images = len(captions)
            outcome["result"] = EvalResult(
                scores=scores.overall,
                captions=captions,
                references=references,
                per_image=scores.per_image,
                skipped=scores.skipped,
                num_images=num_images,
                duration_s=time.perf_counter() - started,
                images_per_s=num_images / decode_s if decode_s > 0 else float("inf"),
            )
            log.info(
                "evaluated %d images (%.1f images/s decoding) in %.1f s: %s",
                num_images,
                outcome["result"].images_per_s,
                outcome["result"].duration_s,
                ", ".join(f"{k} {v:.4f}" for k, v in scores.overall.items()),
            )
        except Exception as e:  # broadcast it: the other ranks are waiting for the result
            main_exc, outcome["error"] = e, (type(e).__name__, str(e))
    outcome = broadcast_object(dist, outcome if dist.is_main else None)
    if "error" in outcome:
        if main_exc is not None:
            raise main_exc
        _raise_remote(outcome["error"], "rank 0")
    result: EvalResult = outcome["result"]
    return result


def _image_size_of(config: Mapping[str, Any], uri: str) -> int:
    try:
        return int(config["data"]["shards"]["image_size"])
    except (KeyError, TypeError, ValueError):
        raise ValueError(
            f"{uri}: the checkpoint's config has no data.shards.image_size; pass image_size="
        ) from None


def evaluate_checkpoint(
    uri: str,
    shard_dir: str,
    split: str,
    ev: EvalConfig,
    *,
    batch_size: int,
    num_workers: int,
    image_size: int | None = None,
    results_uri: str | None = None,
    dist: DistInfo | None = None,
    device: torch.device | str | None = None,
) -> EvalResult:
    """Evaluate the checkpoint at ``uri`` on ``split`` of the shards at ``shard_dir``.

    World size 1 unless ``dist`` is given (then call on every rank, with the process group up).
    ``image_size`` defaults to the checkpoint's ``data.shards.image_size``; ``device`` to
    ``dist.device``.
    """
    dist = dist or DistInfo()
    target = torch.device(device) if device is not None else dist.device
    model, vocab, ckpt = captioner_from_checkpoint(uri)
    model.to(target)
    loader = build_loader(
        LoaderConfig(num_workers=num_workers),  # evaluation reads only num_workers and seq_per_img
        shard_dir,
        split,
        train=False,
        dist=dist,
        image_size=image_size if image_size is not None else _image_size_of(ckpt.get("config", {}), uri),
        seed=0,
        batch_size=batch_size,
        device=target,
    )
    return evaluate(model, loader, vocab, dist, ev, results_uri=results_uri)


def score_checkpoint(
    checkpoint: str,
    cfg: Config,
    split: str,
    *,
    results_uri: str | None = None,
    explicit: Collection[str] = (),
) -> dict[str, Any]:
    """Score a checkpoint on ``split`` of ``cfg.data.shard_dir`` with the config's ``eval`` settings
    (and ``data.loader``'s batch size and workers): ``{"scores": {...}, "num_images": N, "decoding": {...}}``.

    Decoding is the model's own, as it was scored in training (``decoding_of``: the checkpoint's
    ``eval.beam_size``, ``max_len``, ``length_normalization``), except the settings named in
    ``explicit`` (``DECODING_KEYS`` given on purpose, e.g. as overrides), which come from ``cfg.eval``.
    """
    recorded = decoding_of(load_checkpoint(checkpoint))
    ev = dataclasses.replace(cfg.eval, **{k: v for k, v in recorded.items() if k not in explicit})
    lc = cfg.data.loader
    result = evaluate_checkpoint(
        checkpoint,
        cfg.data.shard_dir,
        split,
        ev,
        batch_size=lc.batch_size,
        num_workers=lc.num_workers,
        results_uri=results_uri,
    )
    decoding = {k: getattr(ev, k) for k in recorded}
    return {"scores": dict(result.scores), "num_images": len(result.captions), "decoding": decoding}
