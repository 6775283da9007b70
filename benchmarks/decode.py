"""Batched beam search vs the per-image reference: same weights, same features, same captions.

The model is the real Show-Attend-Tell from ``build_captioner`` at seed 004's sizes: ResNet-101
features (P = 14 x 14 = 196, E = 2048, random here: the encoder is not run), emb = attention =
decoder = 512, a 10,000-word vocabulary, float32, eval mode. Random weights give near-uniform
word distributions, so the output layer is sharpened (x8: top words at log-prob -6 instead of -9,
fewer near-ties). A random model never says <end> (and an <end> bias only makes every beam stop
at the first word, beam search's short-caption bias), so every image runs all max_len steps: the
worst case for both sides. The tests cover images that finish at different steps.

- batched: ``captioning.model.search.beam_search`` on --chunk images per call (the state is
  B*K rows; done images leave the batch every 4th step); 16 images per call is the fastest on 2 CPU cores
  (larger calls spill the (B*K, P, A) attention energies out of cache);
- reference: ``reference_search_one`` from ``tests/reference_search.py`` (test-only code: this
  script puts the repository's ``tests/`` folder on ``sys.path`` to import it), one image at a
  time, hypotheses in Python lists, the model run on the image's live beams (seed 004's way).

Both decode all --num-images images (no extrapolation), chunk by chunk in alternation so that
other load on the machine hits both alike, and every caption is compared token for token. Last line: ``RESULT beam_speedup=X identical=true|false`` (reference seconds over batched
seconds; goal >= 20). Run::

    .venv/bin/python benchmarks/decode.py                    # 512 images, beam 5, max_len 20
    .venv/bin/python benchmarks/decode.py --num-images 64 --chunk 32
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from captioning.config import ModelConfig
from captioning.data.vocab import END_ID
from captioning.model.factory import build_captioner
from captioning.model.search import BeamResult, beam_search

# The per-image reference search is test-only code: it lives in tests/, next to its exactness tests.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from reference_search import reference_beam_search


def build_model(vocab_size: int, sharpen: float, end_bias: float) -> Any:
    cfg = ModelConfig(
        encoder="resnet101",
        encoder_weights=None,
        encoded_image_size=14,
        emb_dim=512,
        attention_dim=512,
        decoder_dim=512,
        dropout=0.5,
    )
    torch.manual_seed(0)
    model = build_captioner(cfg, vocab_size).eval()
    # The output layer: the decoder's Linear onto the vocabulary.
    out = [m for m in model.decoder.modules() if isinstance(m, nn.Linear) and m.out_features == vocab_size]
    with torch.no_grad():
        out[-1].weight.mul_(sharpen)
        out[-1].bias[END_ID] += end_bias
    return model


def concat(parts: list[BeamResult]) -> BeamResult:
    """Results of consecutive image chunks as one (best captions and hypotheses; no alphas)."""
    T = max(p.tokens.size(1) for p in parts)
    return BeamResult(
        tokens=torch.cat([nn.functional.pad(p.tokens, (0, T - p.tokens.size(1))) for p in parts]),
        scores=torch.cat([p.scores for p in parts]),
        lengths=torch.cat([p.lengths for p in parts]),
        ended=torch.cat([p.ended for p in parts]),
        alphas=None,
        hyp_tokens=torch.cat([p.hyp_tokens for p in parts]),
        hyp_scores=torch.cat([p.hyp_scores for p in parts]),
        hyp_lengths=torch.cat([p.hyp_lengths for p in parts]),
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--num-images", type=int, default=512)
    parser.add_argument("--beam-size", type=int, default=5)
    parser.add_argument("--max-len", type=int, default=20)
    parser.add_argument("--vocab-size", type=int, default=10_000)
    parser.add_argument("--chunk", type=int, default=16, help="images per batched beam_search call")
    parser.add_argument("--sharpen", type=float, default=8.0, help="factor on the output layer's weights")
    parser.add_argument("--end-bias", type=float, default=0.0, help="added to <end>'s output bias")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    args = parser.parse_args()

    dtype = getattr(torch, args.dtype)
    model = build_model(args.vocab_size, args.sharpen, args.end_bias).to(dtype)
    gen = torch.Generator().manual_seed(1)
    features = torch.relu(torch.randn(args.num_images, 196, 2048, generator=gen)).to(dtype)  # (N, P, E)
    kwargs: dict[str, Any] = dict(beam_size=args.beam_size, max_len=args.max_len)
    print(
        f"images={args.num_images} beam={args.beam_size} max_len={args.max_len} V={args.vocab_size} "
        f"P=196 E=2048 D=A=emb=512 {args.dtype} threads={torch.get_num_threads()} cpus={os.cpu_count()} "
        f"chunk={args.chunk} load={os.getloadavg()[0]:.1f}"
    )

    # Chunk by chunk, the two side by side: a busy machine slows both alike, not one of them.
    batched_parts, reference_parts = [], []
    t_batched = t_reference = 0.0
    ratios: list[float] = []  # per chunk: robust to load that comes and goes
    with torch.no_grad():
        beam_search(model, features[: args.chunk], **kwargs)  # warm-up (allocator, kernels)
        for i in range(0, args.num_images, args.chunk):
            chunk = features[i : i + args.chunk]
            start = time.perf_counter()
            batched_parts.append(beam_search(model, chunk, **kwargs))
            mid = time.perf_counter()
            reference_parts.append(reference_beam_search(model, chunk, **kwargs))
            end = time.perf_counter()
            t_batched += mid - start
            t_reference += end - mid
            ratios.append((end - mid) / (mid - start))
    batched, reference = concat(batched_parts), concat(reference_parts)
    for name, seconds in (("batched", t_batched), ("reference", t_reference)):
        print(f"{name + ':':<11}{seconds:8.2f} s  ({1000 * seconds / args.num_images:7.2f} ms/image)")

    T = max(batched.tokens.size(1), reference.tokens.size(1))
    same_tokens = (
        nn.functional.pad(batched.tokens, (0, T - batched.tokens.size(1)))
        == nn.functional.pad(reference.tokens, (0, T - reference.tokens.size(1)))
    ).all(1) & (batched.lengths == reference.lengths)  # (N,)
    same_scores = torch.isclose(batched.scores, reference.scores, rtol=1e-5, atol=1e-5)
    identical = bool(same_tokens.all()) and bool(same_scores.all())
    lengths = batched.lengths.float()
    print(
        f"captions: length mean {lengths.mean():.1f} (min {int(lengths.min())}, max {int(lengths.max())}), "
        f"ended {batched.ended.float().mean():.0%}; identical captions {int(same_tokens.sum())}/"
        f"{args.num_images}, scores allclose {int(same_scores.sum())}/{args.num_images}"
    )
    ratios.sort()
    print(
        f"per-chunk speedup: median {ratios[len(ratios) // 2]:.1f} (min {ratios[0]:.1f}, max {ratios[-1]:.1f}); "
        f"load average at the end: {os.getloadavg()[0]:.1f}"
    )
    print(f"RESULT beam_speedup={t_reference / t_batched:.1f} identical={'true' if identical else 'false'}")


if __name__ == "__main__":
    main()
