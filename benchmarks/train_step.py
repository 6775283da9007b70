"""Show-Attend-Tell training step: the project's decoder vs a straightforward seed-004-style one.

Both run one teacher-forced training step (forward, cross-entropy + doubly stochastic attention
loss, backward, Adam step) on the same batch: B images x S captions each, captions up to L tokens
(<start> .. <end>, lengths drawn between L/2 and L), random encoder features (B, P, E) so that only
the decoders are compared (the encoder is the same for both).

- project: ``captioning.model.decoders.ShowAttendTell``. Per image, once: mean encoding, initial
  h and c, the attention's encoder projection (B, P, A); features are never copied per caption
  (the attention-weighted sum is one bmm per image over its S captions); only the captions still
  running take part in a step (seed 004's trick, kept); the output layer runs once after the loop,
  on the valid (caption, step) pairs only.
- reference: written here the way seed 004's DecoderWithAttention does it, with seq_per_img=1
  data: each caption carries its own copy of its image's features (B*S rows), rows are sorted by
  length and only the still-active rows are processed at each step, the attention recomputes the
  encoder projection of the active rows' features at every step, and the output layer runs per step.

Shapes: B images, S captions per image, P pixels, E encoder dim, D decoder dim, A attention dim,
T steps, V vocab. Before timing, the reference gets the project's weights and both compute the
loss on the same inputs in eval mode (no dropout): they must agree.

Steps alternate between the two (drift in machine speed hits both); the figures are best-of-N
(other processes on shared cores only ever add time) with medians alongside. Last line:
``RESULT step_speedup=X`` (reference step time / project step time, best of --repeats). Run::

    .venv/bin/python benchmarks/train_step.py                  # B=32 x 5, L=20, P=196, E=2048, V=10000
    .venv/bin/python benchmarks/train_step.py --repeats 5 --vocab 5000
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from captioning.model.decoders import ShowAttendTell

# --------------------------------------------------------------------------------------------------
# The reference: seed 004's structure
# --------------------------------------------------------------------------------------------------


class ReferenceAttention(nn.Module):
    def __init__(self, encoder_dim: int, decoder_dim: int, attention_dim: int) -> None:
        super().__init__()
        self.encoder_att = nn.Linear(encoder_dim, attention_dim)
        self.decoder_att = nn.Linear(decoder_dim, attention_dim)
        self.full_att = nn.Linear(attention_dim, 1)

    def forward(self, features: torch.Tensor, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        enc = self.encoder_att(features)  # (n, P, A): recomputed at every call, i.e. every step
        dec = self.decoder_att(hidden)  # (n, A)
        alpha = torch.softmax(self.full_att(torch.relu(enc + dec.unsqueeze(1))).squeeze(2), dim=1)  # (n, P)
        context = (features * alpha.unsqueeze(2)).sum(dim=1)  # (n, E)
        return context, alpha


class ReferenceDecoder(nn.Module):
    """Same parameters (names and shapes) as ShowAttendTell, seed 004's forward."""

    def __init__(
        self,
        vocab_size: int,
        encoder_dim: int,
        emb_dim: int,
        decoder_dim: int,
        attention_dim: int,
        dropout: float,
    ) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, emb_dim)
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(decoder_dim, vocab_size)
        self.attention = ReferenceAttention(encoder_dim, decoder_dim, attention_dim)
        self.decode_step = nn.LSTMCell(emb_dim + encoder_dim, decoder_dim)
        self.init_h = nn.Linear(encoder_dim, decoder_dim)
        self.init_c = nn.Linear(encoder_dim, decoder_dim)
        self.f_beta = nn.Linear(decoder_dim, encoder_dim)

    def forward(
        self, features: torch.Tensor, captions: torch.Tensor, lengths: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
        """features (n, P, E), captions (n, L), lengths (n,) -> scores (n, T, V), alphas (n, T, P),
        the sorted captions and decode lengths."""
        lengths, order = lengths.sort(descending=True)
        features, captions = features[order], captions[order]
        n, P = features.shape[0], features.shape[1]
        embedded = self.embedding(captions)  # (n, L, Em)
        mean = features.mean(dim=1)
        h, c = self.init_h(mean), self.init_c(mean)  # (n, D)
        decode_lengths = (lengths - 1).tolist()
        T = max(decode_lengths)
        scores = features.new_zeros(n, T, self.fc.out_features)  # (n, T, V)
        alphas = features.new_zeros(n, T, P)  # (n, T, P)
        for t in range(T):
            m = sum(length > t for length in decode_lengths)  # active rows (sorted: the first m)
            context, alpha = self.attention(features[:m], h[:m])
            gate = torch.sigmoid(self.f_beta(h[:m]))
            h, c = self.decode_step(torch.cat([embedded[:m, t], gate * context], dim=1), (h[:m], c[:m]))
            scores[:m, t] = self.fc(self.dropout(h))
            alphas[:m, t] = alpha
        return scores, alphas, captions, decode_lengths


def reference_loss(
    model: ReferenceDecoder,
    features: torch.Tensor,
    captions: torch.Tensor,
    lengths: torch.Tensor,
    alpha_c: float,
) -> torch.Tensor:
    """seq_per_img=1: every caption gets its own copy of its image's features."""
    B, S, L = captions.shape
    per_caption = features.repeat_interleave(S, dim=0)  # (B*S, P, E)
    scores, alphas, sorted_caps, decode_lengths = model(
        per_caption, captions.view(B * S, L), lengths.view(-1)
    )
    targets = sorted_caps[:, 1:]
    packed_scores = nn.utils.rnn.pack_padded_sequence(scores, decode_lengths, batch_first=True).data
    packed_targets = nn.utils.rnn.pack_padded_sequence(targets, decode_lengths, batch_first=True).data
    return F.cross_entropy(packed_scores, packed_targets) + alpha_c * ((1.0 - alphas.sum(dim=1)) ** 2).mean()


def project_loss(
    model: ShowAttendTell,
    features: torch.Tensor,
    captions: torch.Tensor,
    lengths: torch.Tensor,
    alpha_c: float,
) -> torch.Tensor:
    """The same loss from the project's (B, S, T, ...) outputs, padded steps masked out."""
    out = model(features, captions, lengths)
    assert out.alphas is not None
    T = out.logits.shape[2]
    mask = torch.arange(T) < (lengths - 1).unsqueeze(-1)  # (B, S, T)
    ce = F.cross_entropy(out.logits[mask], captions[:, :, 1:][mask])
    attention_sum = (out.alphas * mask.unsqueeze(-1)).sum(dim=2)  # (B, S, P)
    return ce + alpha_c * ((1.0 - attention_sum) ** 2).mean()


# --------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------


def make_batch(args: argparse.Namespace, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    B, S, L = args.batch, args.seq_per_img, args.max_len
    features = torch.randn(B, args.pixels, args.encoder_dim, generator=generator).relu()  # (B, P, E)
    lengths = torch.randint(L // 2, L + 1, (B, S), generator=generator)  # (B, S)
    lengths[0, 0] = L  # the batch's longest caption sets L, as the loader's collate does
    captions = torch.randint(4, args.vocab, (B, S, L), generator=generator)  # (B, S, L)
    captions[:, :, 0] = 1  # <start>
    steps = torch.arange(L)
    captions[steps == (lengths - 1).unsqueeze(-1)] = 2  # <end>
    captions[steps > (lengths - 1).unsqueeze(-1)] = 0  # <pad>
    return features, captions, lengths


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=32, help="images per batch")
    parser.add_argument("--seq-per-img", type=int, default=5, help="captions per image")
    parser.add_argument("--max-len", type=int, default=20, help="L: longest caption, <start>/<end> included")
    parser.add_argument("--pixels", type=int, default=196, help="P (14x14)")
    parser.add_argument("--encoder-dim", type=int, default=2048, help="E (ResNet-101)")
    parser.add_argument("--dim", type=int, default=512, help="embedding, decoder and attention size")
    parser.add_argument("--vocab", type=int, default=10000, help="V (COCO at min_word_freq=5: ~10k)")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per implementation")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    alpha_c = 1.0
    dims = (args.vocab, args.encoder_dim, args.dim, args.dim, args.dim, 0.5)
    project = ShowAttendTell(*dims)
    reference = ReferenceDecoder(*dims)
    reference.load_state_dict(project.state_dict())
    features, captions, lengths = make_batch(args, torch.Generator().manual_seed(0))
    B, S, L = captions.shape
    print(
        f"batch {B} images x {S} captions, L={L} (mean length {lengths.float().mean():.1f}), "
        f"P={args.pixels}, E={args.encoder_dim}, D=A=Em={args.dim}, V={args.vocab}, "
        f"{torch.get_num_threads()} threads"
    )

    # Same weights, same inputs, no dropout: the same loss.
    project.eval()
    reference.eval()
    with torch.no_grad():
        loss_p = project_loss(project, features, captions, lengths, alpha_c).item()
        loss_r = reference_loss(reference, features, captions, lengths, alpha_c).item()
    print(
        f"loss on the same weights: project {loss_p:.6f}  reference {loss_r:.6f}  |diff| {abs(loss_p - loss_r):.2e}"
    )
    if abs(loss_p - loss_r) > 1e-4 * max(1.0, abs(loss_r)):
        raise SystemExit("the two implementations disagree")
    project.train()
    reference.train()

    def training_step(model: nn.Module, loss_fn: Any) -> Callable[[], float]:
        """One Adam step of ``model`` on the fixed batch (its own optimiser, lr 4e-4)."""
        opt = torch.optim.Adam(model.parameters(), lr=4e-4)

        def step() -> float:
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model, features, captions, lengths, alpha_c)
            loss.backward()
            opt.step()
            return float(loss.item())

        return step

    times: dict[str, list[float]] = {"project": [], "reference": []}
    steps = {
        "project": training_step(project, project_loss),
        "reference": training_step(reference, reference_loss),
    }
    for fn in steps.values():  # warm-up: allocator, Adam state
        fn()
    for _ in range(args.repeats):  # alternate, so drift in machine speed hits both
        for name, fn in steps.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    best = {name: min(t) for name, t in times.items()}
    med = {name: statistics.median(t) for name, t in times.items()}
    for name, t in times.items():
        print(
            f"{name:9s} step: best {best[name]:.3f} s  median {med[name]:.3f} s  max {max(t):.3f} s  (n={len(t)})"
        )
    print(f"images/s (best): project {B / best['project']:.1f}  reference {B / best['reference']:.1f}")
    print(f"median speedup {med['reference'] / med['project']:.2f}")
    speedup = best["reference"] / best["project"]
    print(f"RESULT step_speedup={speedup:.2f}")
    return speedup


if __name__ == "__main__":
    main()
