"""Additive soft attention over the encoder's pixels (Show, Attend and Tell, seed 004).

Shapes: B images, N rows (captions or decoding rows), P pixels, E encoder dim, D decoder dim,
A attention dim.

    attention = SoftAttention(encoder_dim=2048, decoder_dim=512, attention_dim=512)
    att_proj = attention.project(features)              # (B, P, E) -> (B, P, A): once per image
    context, alpha = attention(features, att_proj, h)   # h (B, D) -> (B, E), (B, P)
    alpha = attention.weights(att_proj[rows], h_rows)   # rows sharing images: (N, P, A), (N, D) -> (N, P)

The encoder projection does not depend on the decoder state, so it is computed once per image
(``project``) and reused at every step and by every caption of the image; seed 004 recomputes it
inside its time loop, for every caption, which is most of its decoder's arithmetic.
"""

from __future__ import annotations

import torch
from torch import nn


class SoftAttention(nn.Module):
    """score_p = w . relu(W_e f_p + W_d h) + b; alpha = softmax_p(score); context = sum_p alpha_p f_p."""

    def __init__(self, encoder_dim: int, decoder_dim: int, attention_dim: int) -> None:
        super().__init__()
        self.encoder_att = nn.Linear(encoder_dim, attention_dim)  # projects the encoded image
        self.decoder_att = nn.Linear(decoder_dim, attention_dim)  # projects the decoder's hidden state
        self.full_att = nn.Linear(attention_dim, 1)  # one score per pixel

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """(B, P, E) -> (B, P, A): the encoder side of the scores, computed once per image."""
        return self.encoder_att(features)

    def weights(self, att_proj: torch.Tensor, hidden: torch.Tensor, *, scratch: bool = False) -> torch.Tensor:
        """att_proj (N, P, A) and hidden (N, D) -> alpha (N, P), softmax over pixels.

        ``scratch=True`` says att_proj is a temporary copy (e.g. gathered per caption) that may be
        overwritten: the (N, P, A) energies are then built in place, one large buffer instead of two.
        """
        query = self.decoder_att(hidden).unsqueeze(1)  # (N, 1, A)
        energy = att_proj.add_(query).relu_() if scratch else torch.relu(att_proj + query)  # (N, P, A)
        return torch.softmax(self.full_att(energy).squeeze(-1), dim=-1)  # (N, P)

    def forward(
        self, features: torch.Tensor, att_proj: torch.Tensor, hidden: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """features (N, P, E), att_proj (N, P, A) from ``project``, hidden (N, D) ->
        the attention-weighted encoding (N, E) and the weights alpha (N, P)."""
        alpha = self.weights(att_proj, hidden)  # (N, P)
        context = torch.bmm(alpha.unsqueeze(1), features).squeeze(1)  # (N, E)
        return context, alpha
