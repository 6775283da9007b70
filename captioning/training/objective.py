"""The cross-entropy objective of stages 1 and 2 (seed 004) and the forward passes DDP wraps.

Shapes: B images, S captions per image, L padded caption length (<start> .. <end>), T = L - 1
teacher-forced steps, P pixels, E encoder dim, V vocab.

    objective = CaptionObjective(alpha_c=1.0)
    forward = XeForward(model, train_encoder=False)           # DDP wraps this, not the Captioner
    out = ddp(batch.images, batch.captions, batch.lengths)     # encoder once per image, S captions each
    parts = objective(out, batch.captions, batch.lengths, batch.is_pad)
    parts.loss.backward()

Loss (seed 004): cross-entropy over every caption token after <start> up to and including <end>,
averaged over those tokens, plus ``alpha_c * mean((1 - sum_t alpha_t)^2)`` (the "doubly stochastic"
attention term: every pixel should receive about one unit of attention over the caption). Padding
rows of the exact-once epoch plan (``is_pad``) weigh zero.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from captioning.model.captioner import Captioner
from captioning.model.decoders import CaptionOutput


@dataclass
class LossParts:
    """One step's loss and what it is made of (sums, so ranks and steps can be pooled exactly)."""

    loss: torch.Tensor  # scalar with grad: what backward() runs on
    # Detached scalars on the loss's device: reading them would wait for the device, so the
    # trainer sums them there and reads them once per logging window.
    ce_sum: torch.Tensor  # summed token cross-entropy over real rows
    num_tokens: torch.Tensor  # tokens the cross-entropy averaged over
    attention: torch.Tensor  # the attention term's value (0 without attention)


def token_mask(lengths: torch.Tensor, num_steps: int) -> torch.Tensor:
    """(B, S) lengths counting <start>..<end> -> (B, S, T) bool: steps that predict a real token."""
    steps = torch.arange(num_steps, device=lengths.device)  # (T,)
    return steps < (lengths - 1).unsqueeze(-1)  # (B, S, T)


class CaptionObjective:
    """Masked cross-entropy plus seed 004's doubly stochastic attention regularisation."""

    def __init__(self, alpha_c: float = 1.0) -> None:
        if alpha_c < 0:
            raise ValueError(f"alpha_c must be >= 0, got {alpha_c}")
        self.alpha_c = alpha_c

    def __call__(
        self, out: CaptionOutput, captions: torch.Tensor, lengths: torch.Tensor, is_pad: torch.Tensor
    ) -> LossParts:
        logits = out.logits  # (B, S, T, V)
        B, S, T, V = logits.shape
        targets = captions[:, :, 1 : T + 1]  # (B, S, T)
        real = (~is_pad).to(logits.dtype)  # (B,)
        mask = token_mask(lengths, T).to(logits.dtype) * real.view(B, 1, 1)  # (B, S, T)
        ce = F.cross_entropy(logits.reshape(-1, V).float(), targets.reshape(-1), reduction="none")  # (B*S*T,)
        ce_sum = (ce.view(B, S, T) * mask).sum()
        num_tokens = mask.sum()
        loss = ce_sum / num_tokens.clamp(min=1.0)
        attention = torch.zeros((), device=logits.device)
        if out.alphas is not None and self.alpha_c > 0:
            # alphas are zero past each caption's end, so the sum over steps is the caption's own.
            coverage = out.alphas.float().sum(dim=2)  # (B, S, P)
            per_caption = ((1.0 - coverage) ** 2).mean(dim=2)  # (B, S)
            num_captions = (real.sum() * S).clamp(min=1.0)
            attention = self.alpha_c * (per_caption * real.view(B, 1)).sum() / num_captions
            loss = loss + attention
        return LossParts(
            loss=loss, ce_sum=ce_sum.detach(), num_tokens=num_tokens.detach(), attention=attention.detach()
        )


class ImageForward(nn.Module):
    """What DDP wraps in a stage: the captioner, with its encoder trained or frozen in that stage;
    each stage's forward starts from ``self.encode(images)``, once per image."""

    def __init__(self, model: Captioner, *, train_encoder: bool) -> None:
        super().__init__()
        self.model = model
        self.train_encoder = train_encoder

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, P, E), once per image; a frozen encoder runs without building a graph."""
        if self.train_encoder:
            return self.model.encode(images)
        with torch.no_grad():
            return self.model.encode(images)


class XeForward(ImageForward):
    """Stages 1-2: images -> features (once per image) -> teacher-forced outputs.

    With ``scheduled_sampling > 0`` each step's input is, with that probability, a token drawn from
    the model's own previous prediction instead of the reference (stepwise decoding; slower).
    """

    def forward(
        self,
        images: torch.Tensor,
        captions: torch.Tensor,
        lengths: torch.Tensor,
        scheduled_sampling: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> CaptionOutput:
        features = self.encode(images)  # (B, P, E)
        if scheduled_sampling > 0:
            return scheduled_sampling_forward(
                self.model, features, captions, lengths, scheduled_sampling, generator
            )
        return self.model(features, captions, lengths)


def scheduled_sampling_forward(
    model: Captioner,
    features: torch.Tensor,
    captions: torch.Tensor,
    lengths: torch.Tensor,
    prob: float,
    generator: torch.Generator | None,
) -> CaptionOutput:
    """Teacher forcing where each input token after <start> is, with probability ``prob``, drawn
    from the model's previous output distribution (Bengio et al. 2015; ruotianluo's ss_prob).

    Returns log-probs as logits (cross-entropy of log-softmax output is unchanged) and alphas with
    zeros past each caption's end, like the teacher-forced pass.
    """
    B, S, L = captions.shape
    T, N = L - 1, B * S
    state = {k: v.repeat_interleave(S, dim=0) for k, v in model.init_state(features).items()}  # (N, ...)
    rows = captions.reshape(N, L)  # (N, L)
    tokens = rows[:, 0]  # <start>
    all_logprobs: list[torch.Tensor] = []
    all_alphas: list[torch.Tensor] = []
    for t in range(T):
        if t > 0:
            draw = torch.rand(N, generator=generator, device=rows.device) < prob  # (N,)
            if bool(draw.any()):
                probs = all_logprobs[-1].detach().exp()  # (N, V)
                sampled = torch.multinomial(probs, 1, generator=generator).squeeze(1)  # (N,)
                tokens = torch.where(draw, sampled, rows[:, t])
            else:
                tokens = rows[:, t]
        logprobs, state, alpha = model.step(tokens, state)  # (N, V), state, (N, P) | None
        all_logprobs.append(logprobs)
        if alpha is not None:
            all_alphas.append(alpha)
    mask = token_mask(lengths, T).reshape(N, T)  # (N, T)
    logits = torch.stack(all_logprobs, dim=1)  # (N, T, V)
    alphas = None
    if all_alphas:
        alphas = (torch.stack(all_alphas, dim=1) * mask.unsqueeze(-1)).view(B, S, T, -1)  # (B, S, T, P)
    return CaptionOutput(logits=logits.view(B, S, T, -1), alphas=alphas)
