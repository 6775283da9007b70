"""Stage 3: self-critical sequence training on a CIDEr-D reward (Rennie et al.; seed 000's "new" variant).

Shapes: B images, K samples per image, T sampled steps, P pixels, E encoder dim.

    reward = CiderReward(read_references(shard_dir, "train"))   # df and every image's vectors, once
    logger.info(reward.describe())                                # what that took, and COCO's estimate
    forward = ScstForward(model, train_encoder=False)             # DDP wraps this
    gen, features = ddp(images, num_samples=5, max_len=16)       # sampled with grad
    rewards = reward(gen.tokens, gen.lengths, image_ids)          # (B, K) CIDEr-D of each sample
    baseline = mean_of_others(rewards)                            # new SCST; or greedy_baseline(...)
    loss = scst_loss(gen.token_logprobs, gen.mask, rewards - baseline, is_pad)

The advantage multiplies the log-probability of every sampled token up to and including <end>
(the end token is part of the decision), averaged over those tokens.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from captioning.data.vocab import END_ID, PAD_ID, START_ID
from captioning.evaluation.cider import CiderD, estimate_prepared_bytes
from captioning.model.captioner import Captioner, Generation
from captioning.training.objective import ImageForward

_SPECIALS = (PAD_ID, START_ID, END_ID)


def caption_ids(tokens: torch.Tensor, lengths: torch.Tensor) -> list[list[int]]:
    """(N, T) tokens and (N,) lengths -> each caption's word ids (no <end>, no padding)."""
    out = []
    for row, n in zip(tokens.tolist(), lengths.tolist(), strict=True):
        out.append([t for t in row[:n] if t not in _SPECIALS])
    return out


class CiderReward:
    """CIDEr-D of sampled captions against their image's training references.

    Document frequencies come once from every training image's references (``corpus``: image id
    -> captions as ids without <start>/<end>), as in seed 000, not from each batch; so do the
    references' vectors (``CiderD.prepare``): an epoch's batches only vectorise their samples.
    Every DDP process builds its own (memory: ``describe``).
    """

    def __init__(self, corpus: Mapping[int, Sequence[Sequence[int]]]) -> None:
        if not corpus:
            raise ValueError("the CIDEr-D corpus is empty: no training references")
        self.references = {int(k): [list(c) for c in v] for k, v in corpus.items()}
        start = time.perf_counter()
        self.cider = CiderD(list(self.references.values()))
        built = time.perf_counter()
        self.cider.prepare(list(self.references), list(self.references.values()))
        self.df_seconds, self.prepare_seconds = built - start, time.perf_counter() - built

    def describe(self) -> str:
        """One line for the stage's log: the prepared references, their cost, COCO's estimate."""
        size = self.cider.prepared_size
        coco = estimate_prepared_bytes(size)  # COCO's Karpathy train, from the bytes measured here
        return (
            f"CIDEr-D reward, per process: df in {self.df_seconds:.1f} s, then the references of "
            f"{size.sets:,} training images prepared in {self.prepare_seconds:.1f} s ({size.entries:,} n-gram "
            f"entries, {size.nbytes / 2**20:.1f} MiB); COCO's Karpathy train (113,287 images x 5 "
            f"references of ~10.5 words) would take about {coco / 2**20:,.0f} MiB"
        )

    def __call__(self, tokens: torch.Tensor, lengths: torch.Tensor, image_ids: torch.Tensor) -> torch.Tensor:
        """tokens (B, K, T), lengths (B, K), image_ids (B,) -> rewards (B, K) float32 on tokens' device."""
        B, K, T = tokens.shape
        ids = [int(i) for i in image_ids.tolist()]
        missing = [i for i in ids if i not in self.references]
        if missing:
            raise KeyError(f"no training references for image ids {missing[:5]} (references.json is stale?)")
        candidates = caption_ids(tokens.reshape(B * K, T).cpu(), lengths.reshape(B * K).cpu())
        keys = [i for i in ids for _ in range(K)]
        scores = self.cider.score(candidates, [self.references[k] for k in keys], keys=keys)
        return torch.as_tensor(np.asarray(scores, dtype=np.float32)).view(B, K).to(tokens.device)


def mean_of_others(rewards: torch.Tensor) -> torch.Tensor:
    """New self-critical baseline: for each sample, the mean reward of the image's other K-1 samples."""
    K = rewards.shape[1]
    if K < 2:
        raise ValueError("the mean-of-others baseline needs at least 2 samples per image")
    return (rewards.sum(dim=1, keepdim=True) - rewards) / (K - 1)  # (B, K)


def scst_loss(
    token_logprobs: torch.Tensor, mask: torch.Tensor, advantage: torch.Tensor, is_pad: torch.Tensor
) -> torch.Tensor:
    """-(advantage * log p(token)) over sampled tokens (<end> included), averaged over those tokens.

    token_logprobs (B, K, T) with grad, mask (B, K, T) bool, advantage (B, K), is_pad (B,).
    """
    weights = mask.to(token_logprobs.dtype) * (~is_pad).to(token_logprobs.dtype).view(-1, 1, 1)  # (B, K, T)
    total = -(advantage.detach().unsqueeze(-1) * token_logprobs * weights).sum()
    return total / weights.sum().clamp(min=1.0)


class ScstForward(ImageForward):
    """Stage 3: images -> features -> K sampled captions with log-prob gradients."""

    def forward(
        self,
        images: torch.Tensor,
        num_samples: int,
        max_len: int,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> tuple[Generation, torch.Tensor]:
        features = self.encode(images)  # (B, P, E)
        gen = self.model.generate(
            features,
            method="sample",
            num_samples=num_samples,
            max_len=max_len,
            temperature=temperature,
            generator=generator,
        )
        return gen, features.detach()


def greedy_baseline(
    model: Captioner, features: torch.Tensor, reward: CiderReward, image_ids: torch.Tensor, max_len: int
) -> torch.Tensor:
    """SCST's baseline: the reward of the model's greedy caption (eval mode, no grad) -> (B, 1)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            gen = model.generate(features, method="greedy", max_len=max_len)
    finally:
        model.train(was_training)
    return reward(gen.tokens, gen.lengths, image_ids)  # (B, 1)
