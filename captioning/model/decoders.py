"""The caption decoders: Show-Attend-Tell (seed 004), FC (seed 000) and Show-Tell (seeds 001/002).

Shapes: B images, S captions per image, P pixels, E encoder dim, Em word-embedding dim, D decoder
(LSTM) dim, A attention dim, L padded caption length (<start> .. <end>), T = L - 1 teacher-forced
steps, V vocab, N decoding rows (B*S in training, B*K in decoding).

Every decoder offers the same three calls (``Captioner`` wraps them):

    out = decoder(features, captions, lengths)    # teacher forcing: logits (B, S, T, V), alphas
    state = decoder.init_state(features)          # DecodeState: every tensor (N, ...) rows first
    logprobs, state, alpha = decoder.step(tokens, state)   # tokens (N,) -> (N, V), (N, P) | None

Teacher forcing feeds tokens 0..L-2 (<start> first) and predicts tokens 1..L-1. The per-image work
(mean encoding, initial state, attention projection, FC/Show-Tell's image step) runs once per image
and is shared by its S captions. Steps past a caption's end (t >= length - 1) are not computed:
their logits and alphas are zero, and the loss masks them with ``lengths``.

For FC and Show-Tell the image is the LSTM's first input; ``init_state`` consumes it, so the first
``step`` (and teacher forcing's first input) is <start>, exactly as for Show-Attend-Tell.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from captioning.model.attention import SoftAttention

DecodeState = dict[str, torch.Tensor]  # every tensor has the row dimension first: (N, ...)
Arch = Literal["show_attend_tell", "fc", "show_tell"]


@dataclass
class CaptionOutput:
    """Teacher-forced outputs."""

    logits: torch.Tensor  # (B, S, T, V) unnormalised scores for tokens 1..L-1
    alphas: torch.Tensor | None  # (B, S, T, P) attention weights (Show-Attend-Tell), else None


class CaptionDecoder(nn.Module):
    """What the three decoders share: word embeddings, dropout + output layer, the interface."""

    arch: Arch
    has_attention = False

    def __init__(self, vocab_size: int, emb_dim: int, decoder_dim: int, dropout: float) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.emb_dim = emb_dim
        self.decoder_dim = decoder_dim
        self.embedding = nn.Embedding(vocab_size, emb_dim)
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(decoder_dim, vocab_size)

    def init_weights(self) -> None:
        """Seed 004's (and ruotianluo's) init: uniform(-0.1, 0.1) embeddings and output weights, zero bias."""
        nn.init.uniform_(self.embedding.weight, -0.1, 0.1)
        nn.init.uniform_(self.fc.weight, -0.1, 0.1)
        nn.init.zeros_(self.fc.bias)

    def load_pretrained_embeddings(self, vectors: torch.Tensor, found: torch.Tensor | None = None) -> None:
        """Copy ``vectors`` (V, Em) into the embedding; with ``found`` (V,) bool only those rows,
        so words without a pretrained vector keep their random init."""
        if tuple(vectors.shape) != tuple(self.embedding.weight.shape):
            raise ValueError(
                f"pretrained embeddings have shape {tuple(vectors.shape)}; the model needs "
                f"{tuple(self.embedding.weight.shape)} (vocab size, model.emb_dim)"
            )
        with torch.no_grad():
            weight = self.embedding.weight
            if found is None:
                weight.copy_(vectors)
            else:
                weight[found] = vectors[found].to(weight.dtype)

    def fine_tune_embeddings(self, enabled: bool) -> None:
        """Train the word embeddings (True) or keep them fixed."""
        self.embedding.weight.requires_grad_(enabled)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., D) -> (..., V): dropout, then the output layer."""
        return self.fc(self.dropout(hidden))

    def logits_where_valid(self, hiddens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """hiddens (N, T, D) -> logits (N, T, V) at the steps that have a target, zero past the end.

        The output layer is most of a step's arithmetic (V is ~10k); padded steps skip it.
        """
        N, T, D = hiddens.shape
        steps = torch.arange(T, device=hiddens.device)
        flat = (steps < lengths.reshape(N, 1) - 1).view(-1).nonzero().squeeze(1)  # (M,) valid (row, t)
        packed = self.logits(hiddens.reshape(N * T, D).index_select(0, flat))  # (M, V)
        return packed.new_zeros(N * T, packed.shape[1]).index_copy(0, flat, packed).view(N, T, -1)

    def forward(self, features: torch.Tensor, captions: torch.Tensor, lengths: torch.Tensor) -> CaptionOutput:
        raise NotImplementedError

    def init_state(self, features: torch.Tensor) -> DecodeState:
        raise NotImplementedError

    def step(
        self, tokens: torch.Tensor, state: DecodeState
    ) -> tuple[torch.Tensor, DecodeState, torch.Tensor | None]:
        raise NotImplementedError


def _per_caption(x: torch.Tensor, num_captions: int) -> torch.Tensor:
    """(B, ...) per image -> (B*S, ...) per caption, rows of an image consecutive."""
    return x.repeat_interleave(num_captions, dim=0)


def _check_inputs(features: torch.Tensor, captions: torch.Tensor, lengths: torch.Tensor) -> None:
    if features.dim() != 3 or captions.dim() != 3 or lengths.shape != captions.shape[:2]:
        raise ValueError(
            "expected features (B, P, E), captions (B, S, L), lengths (B, S); got "
            f"{tuple(features.shape)}, {tuple(captions.shape)}, {tuple(lengths.shape)}"
        )
    if features.shape[0] != captions.shape[0]:
        raise ValueError(f"{features.shape[0]} images but captions for {captions.shape[0]}")
    if captions.shape[2] < 2:
        raise ValueError("captions need at least <start> and one target token (L >= 2)")


class _ActiveRows:
    """Which caption rows run at which teacher-forced step (seed 004's trick, per image).

    Rows (captions, B*S of them, image-major) are sorted by decreasing length, so step t runs the
    first ``num_active[t]`` sorted rows; ``image`` is each sorted row's image. Step outputs stacked
    time-major (M rows, M = valid (caption, step) pairs) go back to a dense (B*S, T, ...) tensor,
    zero past each caption's end, with ``unpack``.
    """

    def __init__(self, lengths: torch.Tensor, steps: int) -> None:
        B, S = lengths.shape
        self.shape = (B, S)
        self.steps = steps
        decode_lengths = (lengths.reshape(-1) - 1).clamp(0, steps)  # (N,) targets per caption
        self.decode_lengths, self.order = decode_lengths.sort(descending=True, stable=True)  # (N,)
        self.image = self.order // S  # (N,) image of each sorted row
        counts = (
            self.decode_lengths.unsqueeze(0) > torch.arange(steps, device=lengths.device).unsqueeze(1)
        ).sum(1)
        self.num_active = [n for n in counts.tolist() if n > 0]  # rows running at each step
        if not self.num_active:
            raise ValueError("no caption has a target token: lengths count <start>..<end>, so >= 2")
        # Destination of each packed row in the dense (N*T, ...) layout: row * T + t.
        self.flat = torch.cat([self.order[:n] * steps + t for t, n in enumerate(self.num_active)])

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """(M, X) time-major packed step outputs -> (N, T, X), zeros where a caption has ended."""
        N = self.shape[0] * self.shape[1]
        dense = packed.new_zeros(N * self.steps, packed.shape[1])
        return dense.index_copy(0, self.flat, packed).view(N, self.steps, -1)


# --------------------------------------------------------------------------------------------------
# Show, Attend and Tell
# --------------------------------------------------------------------------------------------------


class ShowAttendTell(CaptionDecoder):
    """LSTM decoder with soft attention and a gated context (seed 004's DecoderWithAttention).

    Per step t, from the previous state (h, c): alpha, z = attention(features, h); z = sigmoid(f_beta(h)) * z;
    h, c = LSTMCell([embed(word_t); z], (h, c)); logits = fc(dropout(h)). The initial h and c are
    linear maps of the mean encoding. The alphas feed the doubly stochastic term of the loss.
    """

    arch: Arch = "show_attend_tell"
    has_attention = True

    def __init__(
        self,
        vocab_size: int,
        encoder_dim: int,
        emb_dim: int,
        decoder_dim: int,
        attention_dim: int,
        dropout: float,
    ) -> None:
        super().__init__(vocab_size, emb_dim, decoder_dim, dropout)
        self.encoder_dim = encoder_dim
        self.attention = SoftAttention(encoder_dim, decoder_dim, attention_dim)
        self.decode_step = nn.LSTMCell(emb_dim + encoder_dim, decoder_dim)
        self.init_h = nn.Linear(encoder_dim, decoder_dim)  # initial hidden state from the mean encoding
        self.init_c = nn.Linear(encoder_dim, decoder_dim)  # initial cell state from the mean encoding
        self.f_beta = nn.Linear(decoder_dim, encoder_dim)  # the sigmoid gate on the context
        self.init_weights()

    def _initial(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = features.mean(dim=1)  # (B, E)
        return self.init_h(mean), self.init_c(mean)  # (B, D), (B, D)

    def _cell(
        self,
        embedded: torch.Tensor,
        context: torch.Tensor,
        h: torch.Tensor,
        c: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One LSTM step on rows: embedded (N, Em), context (N, E), h and c (N, D) -> new h, c."""
        gate = torch.sigmoid(self.f_beta(h))  # (N, E)
        h, c = self.decode_step(torch.cat([embedded, gate * context], dim=1), (h, c))  # (N, D) each
        return h, c

    def forward(self, features: torch.Tensor, captions: torch.Tensor, lengths: torch.Tensor) -> CaptionOutput:
        _check_inputs(features, captions, lengths)
        B, S, L = captions.shape
        N, T = B * S, L - 1
        rows = _ActiveRows(lengths, T)  # caption rows sorted by length: step t runs rows[:n_t]
        h0, c0 = self._initial(features)  # (B, D) each: once per image
        h, c = h0[rows.image], c0[rows.image]  # (N, D), sorted
        att_proj = self.attention.project(features)  # (B, P, A): once per image, not per step
        embedded = self.embedding(captions.view(N, L)[rows.order, :-1])  # (N, T, Em), sorted
        hiddens, alphas = [], []
        for t, n in enumerate(rows.num_active):
            h, c = h[:n], c[:n]  # finished captions drop off the end
            context, alpha = self._attend_rows(features, att_proj, h, rows, n)  # (n, E), (n, P)
            h, c = self._cell(embedded[:n, t], context, h, c)
            hiddens.append(h)
            alphas.append(alpha)
        # The output layer does not feed back under teacher forcing: one matmul for all steps.
        logits = self.logits(torch.cat(hiddens))  # (M, V), M = valid (caption, step) pairs
        return CaptionOutput(
            logits=rows.unpack(logits).view(B, S, T, -1),  # (B, S, T, V)
            alphas=rows.unpack(torch.cat(alphas)).view(B, S, T, -1),  # (B, S, T, P)
        )

    def _attend_rows(
        self, features: torch.Tensor, att_proj: torch.Tensor, h: torch.Tensor, rows: _ActiveRows, n: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention for the first n sorted rows: features (B, P, E) and att_proj (B, P, A) per image."""
        B, S = rows.shape
        per_row = att_proj.index_select(0, rows.image[:n])  # (n, P, A): a copy, so scratch
        alpha = self.attention.weights(per_row, h, scratch=True)  # (n, P)
        # The weighted sum per image as one bmm over its S captions (rows not running weigh 0),
        # instead of gathering (n, P, E) feature copies.
        grid = alpha.new_zeros(B * S, alpha.shape[1]).index_copy(0, rows.order[:n], alpha)  # (N, P)
        context = torch.bmm(grid.view(B, S, -1), features).view(B * S, -1)  # (N, E)
        return context.index_select(0, rows.order[:n]), alpha  # (n, E), (n, P)

    def init_state(self, features: torch.Tensor) -> DecodeState:
        h, c = self._initial(features)
        return {"h": h, "c": c, "features": features, "att_proj": self.attention.project(features)}

    def step(
        self, tokens: torch.Tensor, state: DecodeState
    ) -> tuple[torch.Tensor, DecodeState, torch.Tensor | None]:
        features, att_proj = state["features"], state["att_proj"]  # (N, P, E), (N, P, A)
        context, alpha = self.attention(features, att_proj, state["h"])  # (N, E), (N, P)
        h, c = self._cell(self.embedding(tokens), context, state["h"], state["c"])  # (N, D)
        logprobs = F.log_softmax(self.logits(h), dim=-1)  # (N, V)
        return logprobs, {**state, "h": h, "c": c}, alpha


# --------------------------------------------------------------------------------------------------
# FC (seed 000: ruotianluo's FCModel)
# --------------------------------------------------------------------------------------------------


class MaxoutLSTMCell(nn.Module):
    """ruotianluo's LSTMCore: an LSTM cell whose input transform is a maxout of two linear pieces
    (5*D pre-activations: input, forget, output gates, then two candidates) instead of a tanh."""

    def __init__(self, input_dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.hidden_dim = hidden_dim
        self.i2h = nn.Linear(input_dim, 5 * hidden_dim)
        self.h2h = nn.Linear(hidden_dim, 5 * hidden_dim)

    def forward(
        self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        h, c = state  # (N, D) each
        sums = self.i2h(x) + self.h2h(h)  # (N, 5D)
        in_gate, forget_gate, out_gate = torch.sigmoid(sums[:, : 3 * self.hidden_dim]).chunk(3, dim=1)
        candidate = torch.maximum(*sums[:, 3 * self.hidden_dim :].chunk(2, dim=1))  # (N, D)
        c = forget_gate * c + in_gate * candidate
        h = out_gate * torch.tanh(c)
        return h, c


class PooledImageDecoder(CaptionDecoder):
    """The two decoders without attention (FC, Show-Tell): the pooled image feature, projected to Em,
    is the recurrent core's first input (its output is discarded), then <start> and the words. A
    subclass says how one image step runs (``_image_step``) and how the core runs over a sequence."""

    def __init__(
        self, vocab_size: int, encoder_dim: int, emb_dim: int, decoder_dim: int, dropout: float
    ) -> None:
        super().__init__(vocab_size, emb_dim, decoder_dim, dropout)
        self.encoder_dim = encoder_dim
        self.img_embed = nn.Linear(encoder_dim, emb_dim)

    def _image_step(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _teacher_forcing_inputs(
        self, features: torch.Tensor, captions: torch.Tensor, lengths: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(h, c) after the image step, once per image and repeated per caption, (N, D) each, and the
        embedded input words (N, T, Em); N = B*S captions, T = L-1 steps."""
        _check_inputs(features, captions, lengths)
        B, S, L = captions.shape
        h0, c0 = self._image_step(features)  # once per image: every caption starts from it
        embedded = self.embedding(captions[:, :, :-1]).reshape(B * S, L - 1, self.emb_dim)  # (N, T, Em)
        return _per_caption(h0, S), _per_caption(c0, S), embedded

    def init_state(self, features: torch.Tensor) -> DecodeState:
        h, c = self._image_step(features)
        return {"h": h, "c": c}


class FCDecoder(PooledImageDecoder):
    """No attention: the pooled image feature, projected to Em, is the LSTM's first input (its
    output is discarded), then <start> and the words. Zero initial state, maxout LSTM cell."""

    arch: Arch = "fc"

    def __init__(
        self, vocab_size: int, encoder_dim: int, emb_dim: int, decoder_dim: int, dropout: float
    ) -> None:
        super().__init__(vocab_size, encoder_dim, emb_dim, decoder_dim, dropout)
        self.core = MaxoutLSTMCell(emb_dim, decoder_dim)
        self.init_weights()

    def _image_step(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.img_embed(features.mean(dim=1))  # (B, Em)
        zeros = image.new_zeros(image.shape[0], self.decoder_dim)  # (B, D)
        return self.core(image, (zeros, zeros))  # (B, D) each

    def forward(self, features: torch.Tensor, captions: torch.Tensor, lengths: torch.Tensor) -> CaptionOutput:
        h, c, embedded = self._teacher_forcing_inputs(features, captions, lengths)  # (N, D) x2, (N, T, Em)
        hiddens = []
        for t in range(embedded.shape[1]):
            h, c = self.core(embedded[:, t], (h, c))
            hiddens.append(h)
        logits = self.logits_where_valid(torch.stack(hiddens, dim=1), lengths)  # (N, T, V)
        return CaptionOutput(logits=logits.view(*captions.shape[:2], embedded.shape[1], -1), alphas=None)

    def step(
        self, tokens: torch.Tensor, state: DecodeState
    ) -> tuple[torch.Tensor, DecodeState, torch.Tensor | None]:
        h, c = self.core(self.embedding(tokens), (state["h"], state["c"]))  # (N, D)
        return F.log_softmax(self.logits(h), dim=-1), {"h": h, "c": c}, None


# --------------------------------------------------------------------------------------------------
# Show and Tell (seeds 001/002: yunjey's EncoderCNN head + DecoderRNN)
# --------------------------------------------------------------------------------------------------


class ShowTell(PooledImageDecoder):
    """No attention: the pooled feature through Linear + BatchNorm1d is the LSTM's first input (its
    output is discarded), then <start> and the words, through one ``nn.LSTM`` call per sequence."""

    arch: Arch = "show_tell"

    def __init__(
        self, vocab_size: int, encoder_dim: int, emb_dim: int, decoder_dim: int, dropout: float
    ) -> None:
        super().__init__(vocab_size, encoder_dim, emb_dim, decoder_dim, dropout)
        self.img_bn = nn.BatchNorm1d(emb_dim, momentum=0.01)
        self.lstm = nn.LSTM(emb_dim, decoder_dim, batch_first=True)
        self.init_weights()

    def _image_step(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.img_bn(self.img_embed(features.mean(dim=1)))  # (B, Em)
        _, (h, c) = self.lstm(image.unsqueeze(1))  # (1, B, D) each, from a zero state
        return h[0], c[0]  # (B, D)

    def forward(self, features: torch.Tensor, captions: torch.Tensor, lengths: torch.Tensor) -> CaptionOutput:
        h, c, embedded = self._teacher_forcing_inputs(features, captions, lengths)  # (N, D) x2, (N, T, Em)
        hiddens, _ = self.lstm(
            embedded, (h.unsqueeze(0).contiguous(), c.unsqueeze(0).contiguous())
        )  # (N, T, D)
        logits = self.logits_where_valid(hiddens, lengths)  # (N, T, V)
        return CaptionOutput(logits=logits.view(*captions.shape[:2], embedded.shape[1], -1), alphas=None)

    def step(
        self, tokens: torch.Tensor, state: DecodeState
    ) -> tuple[torch.Tensor, DecodeState, torch.Tensor | None]:
        x = self.embedding(tokens).unsqueeze(1)  # (N, 1, Em)
        hc = (state["h"].unsqueeze(0).contiguous(), state["c"].unsqueeze(0).contiguous())  # (1, N, D)
        out, (h, c) = self.lstm(x, hc)  # (N, 1, D)
        return F.log_softmax(self.logits(out[:, 0]), dim=-1), {"h": h[0], "c": c[0]}, None
