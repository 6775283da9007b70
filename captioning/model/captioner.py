"""The captioner: an encoder and a decoder behind one interface for training and decoding.

Shapes: B images, S captions per image, P pixels, E encoder dim, V vocab, L padded caption length,
T steps, K captions per image in decoding (samples or beams), N rows = B*K in decoding.

    model = build_captioner(cfg.model, len(vocab))             # captioning.model.factory
    features = model.encode(images)                             # (B, 3, H, W) -> (B, P, E)
    out = model(features, captions, lengths)                    # logits (B, S, T=L-1, V), alphas
    gen = model.generate(features, method="greedy")             # tokens (B, 1, T)
    gen = model.generate(features, method="sample", num_samples=5, top_k=0)   # SCST: (B, 5, T)
    gen = model.generate(features, method="beam", beam_size=3)  # best of 3 beams: (B, 1, T)

Stepwise decoding (greedy, sampling, beam search) goes through ``init_state`` and ``step``; a
``DecodeState`` is a dict of tensors with the row dimension first, so a search can reorder or
expand any state with ``{k: v.index_select(0, idx)}`` without knowing the decoder. The first
``step`` always takes <start>.

Generated tokens never include <start>; a caption ends with <end> (counted in ``lengths``),
then PAD_ID. Decoding never emits <pad> or <start> (those two logits are masked out).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
from torch import nn

from captioning.data.vocab import END_ID, PAD_ID, START_ID
from captioning.model.decoders import CaptionDecoder, CaptionOutput, DecodeState
from captioning.model.encoder import ResNetEncoder
from captioning.model.search import SYNC_EVERY, beam_search

if TYPE_CHECKING:
    from captioning.config import ModelConfig

Method = Literal["greedy", "sample", "beam"]
METHODS: tuple[str, ...] = ("greedy", "sample", "beam")


@dataclass
class Generation:
    """Decoded captions, K per image."""

    tokens: torch.Tensor  # (B, K, T) long: words, then <end>, then PAD_ID; never <start>
    scores: torch.Tensor  # (B, K) float: summed log-probs (beam: the search's ranking score)
    lengths: torch.Tensor  # (B, K) long: tokens up to and including <end> (T if it never ended)
    alphas: torch.Tensor | None = None  # (B, K, T, P) attention weights, zero past the end
    token_logprobs: torch.Tensor | None = None  # (B, K, T) model log-prob of each token, 0 past the end

    @property
    def mask(self) -> torch.Tensor:
        """(B, K, T) bool: True on the caption's tokens, <end> included."""
        steps = torch.arange(self.tokens.shape[-1], device=self.tokens.device)  # (T,)
        return steps < self.lengths.unsqueeze(-1)


class Captioner(nn.Module):
    """Encoder CNN + caption decoder. ``model_config`` (set by ``build_captioner``) goes into checkpoints."""

    def __init__(self, encoder: ResNetEncoder, decoder: CaptionDecoder) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.model_config: ModelConfig | None = None

    @property
    def arch(self) -> str:
        return self.decoder.arch

    @property
    def vocab_size(self) -> int:
        return self.decoder.vocab_size

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised images -> (B, P, E) features, once per image."""
        return self.encoder(images)

    def forward(self, features: torch.Tensor, captions: torch.Tensor, lengths: torch.Tensor) -> CaptionOutput:
        """Teacher forcing: features (B, P, E), captions (B, S, L), lengths (B, S) ->
        logits (B, S, L-1, V) for tokens 1..L-1, alphas (B, S, L-1, P) or None."""
        return self.decoder(features, captions, lengths)

    def init_state(self, features: torch.Tensor) -> DecodeState:
        """(B, P, E) -> the decoding state of B rows, ready for a first ``step`` on <start>."""
        return self.decoder.init_state(features)

    def step(
        self, tokens: torch.Tensor, state: DecodeState
    ) -> tuple[torch.Tensor, DecodeState, torch.Tensor | None]:
        """tokens (N,) -> log-probs (N, V) of the next token, the new state, alpha (N, P) or None."""
        return self.decoder.step(tokens, state)

    def generate(
        self,
        features: torch.Tensor,
        *,
        method: Method = "greedy",
        max_len: int = 20,
        beam_size: int = 3,
        length_normalization: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        num_samples: int = 1,
        generator: torch.Generator | None = None,
        sync_every: int | None = None,
    ) -> Generation:
        """Decode captions for features (B, P, E).

        greedy: K = 1, the most likely token each step. sample: K = ``num_samples`` draws per image
        from softmax(logprobs / temperature), restricted to the ``top_k`` most likely tokens when
        top_k > 0, with ``generator`` for reproducibility; ``token_logprobs`` are the model's own
        log-probs of the drawn tokens (what teacher forcing gives, before temperature and top-k),
        with gradients when called in grad mode (SCST). beam: K = 1, the best caption of
        ``captioning.model.search.beam_search`` (always without gradients; call it directly for
        every beam's hypotheses). ``sync_every``: steps between the host syncs that stop decoding
        once every caption has ended (1: every step; None: ``SYNC_EVERY`` = 4, except greedy and
        sampling on the CPU: 1, see ``_decode_stepwise``); the captions do not depend on it, nor,
        for a given ``generator`` seed, the sampled ones.
        Runs in the caller's grad mode and module mode: use ``torch.no_grad()`` and ``eval()`` to
        evaluate.
        """
        if method not in METHODS:
            raise ValueError(f"unknown decoding method {method!r}; valid: {', '.join(METHODS)}")
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        if method == "beam":
            result = beam_search(
                self,
                features,
                beam_size=beam_size,
                max_len=max_len,
                length_normalization=length_normalization,
                start_id=START_ID,
                end_id=END_ID,
                sync_every=SYNC_EVERY if sync_every is None else sync_every,
            )
            return Generation(
                tokens=result.tokens.unsqueeze(1),  # (B, 1, T): the best caption
                scores=result.scores.unsqueeze(1),  # (B, 1) summed log-prob
                lengths=result.lengths.unsqueeze(1),  # (B, 1)
                alphas=None if result.alphas is None else result.alphas.unsqueeze(1),  # (B, 1, T, P)
            )
        if method == "greedy" and num_samples != 1:
            raise ValueError("greedy decoding gives one caption per image: num_samples must be 1")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0: no restriction), got {top_k}")
        if sync_every is not None and sync_every < 1:
            raise ValueError(f"sync_every must be >= 1, got {sync_every}")
        return self._decode_stepwise(
            features,
            sample=method == "sample",
            max_len=max_len,
            temperature=temperature,
            top_k=top_k,
            num_samples=num_samples,
            generator=generator,
            sync_every=sync_every,
        )

    def _decode_stepwise(
        self,
        features: torch.Tensor,
        *,
        sample: bool,
        max_len: int,
        temperature: float,
        top_k: int,
        num_samples: int,
        generator: torch.Generator | None,
        sync_every: int | None,
    ) -> Generation:
        """Greedy or sampled decoding of K = ``num_samples`` captions per image of features (B, P, E).

        No step waits on the device: whether every caption has ended is asked (one host sync) only
        every ``sync_every`` steps, so up to sync_every - 1 steps may run after the last caption
        ended; the outputs are then cut to T = the longest caption's length, the step at which a
        check after every step would have stopped (max_len if a caption never ends): shapes and
        values do not depend on ``sync_every``. Sampling draws those extra steps from
        ``generator`` too: the captions are those of the same seed with any ``sync_every`` (the
        extra draws come after theirs), but the generator's state after the call depends on it.
        """
        B, K = features.shape[0], num_samples
        if sync_every is None:
            # No finished row leaves the batch: a step run after the last caption ended costs as
            # much as any, and on the CPU a sync waits for nothing (measured there: checking every
            # 4th step, 16 steps ran where 13 were needed, +25% time).
            sync_every = 1 if features.device.type == "cpu" else SYNC_EVERY
        state = self.init_state(features)
        if K > 1:
            state = {name: v.repeat_interleave(K, dim=0) for name, v in state.items()}  # (N, ...) rows
        N = B * K
        tokens = torch.full((N,), START_ID, dtype=torch.long, device=features.device)  # (N,)
        finished = torch.zeros(N, dtype=torch.bool, device=features.device)  # (N,)
        lengths = torch.zeros(N, dtype=torch.long, device=features.device)  # (N,)
        all_tokens, all_logprobs, all_alphas = [], [], []
        for t in range(1, max_len + 1):
            logprobs, state, alpha = self.step(tokens, state)  # (N, V), state, (N, P) | None
            choice = logprobs.detach().clone()  # (N, V)
            choice[:, PAD_ID] = -torch.inf  # never emit <pad> or <start>
            choice[:, START_ID] = -torch.inf
            if sample:
                choice = choice / temperature
                if 0 < top_k < choice.shape[1]:
                    kth = choice.topk(top_k, dim=1).values[:, -1:]  # (N, 1)
                    choice = choice.masked_fill(choice < kth, -torch.inf)
                probs = torch.softmax(choice, dim=1)  # (N, V)
                next_tokens = torch.multinomial(probs, 1, generator=generator).squeeze(1)  # (N,)
            else:
                next_tokens = choice.argmax(dim=1)  # (N,)
            next_tokens = next_tokens.masked_fill(finished, PAD_ID)
            token_logprobs = logprobs.gather(1, next_tokens.unsqueeze(1)).squeeze(1)  # (N,)
            all_tokens.append(next_tokens)
            all_logprobs.append(token_logprobs.masked_fill(finished, 0.0))
            if alpha is not None:
                all_alphas.append(alpha.masked_fill(finished.unsqueeze(1), 0.0))
            lengths += (~finished).long()
            finished = finished | (next_tokens == END_ID)
            tokens = next_tokens
            if t % sync_every == 0 and bool(finished.all()):
                break
        # Steps past the last caption's end hold only PAD_ID, log-prob 0 and zero attention.
        T = int(lengths.max()) if N > 0 else 1  # an empty batch stopped after its first step
        all_tokens, all_logprobs, all_alphas = all_tokens[:T], all_logprobs[:T], all_alphas[:T]
        token_lp = torch.stack(all_logprobs, dim=1).view(B, K, T)  # (B, K, T)
        return Generation(
            tokens=torch.stack(all_tokens, dim=1).view(B, K, T),  # (B, K, T)
            scores=token_lp.sum(dim=2),  # (B, K)
            lengths=lengths.view(B, K),
            alphas=torch.stack(all_alphas, dim=1).view(B, K, T, -1) if all_alphas else None,  # (B, K, T, P)
            token_logprobs=token_lp,
        )
