"""Batched beam search: every image's K beams decoded together, one tensor program per step.

Usage::

    features = model.encode(images)                                   # (B, P, E)
    result = beam_search(model, features, beam_size=5, max_len=20)
    words = vocab.decode(result.tokens[0, : result.lengths[0]])       # best caption of image 0
    result.alphas                                                     # (B, T, P) or None

The model needs two methods (``StepModel``): ``init_state(features) -> dict`` of tensors whose
first dimension is the row (B), and ``step(tokens, state) -> (logprobs, state, alpha)``. The
state is expanded to B*K rows once; each step does one top-k over (B, K*V) candidates, and a
candidate's beam and word come from integer arithmetic (``idx // V``, ``idx % V``), so no Python
loop runs over images or beams. ``tests/reference_search.py`` (test-only code) is the same search
one image at a time, in plain Python; ``tests/test_search.py`` checks they agree token for token.

The rules, which the reference follows exactly:

- Words in ``banned_ids`` (default <pad> and <start>, as the captioner's greedy and sampling
  decoders) are never emitted: their log-probs count as -inf.
- Step 1 expands only beam 0 (the others start at -inf): the K first words are distinct.
- Each step keeps the K best candidates (summed log-probs) of an image. A candidate whose word
  is <end> moves to the image's finished set; its row is retired (score -inf, never extended),
  so the next step chooses again among the live rows' K*V candidates.
- Finished hypotheses are ranked by their key: summed log-prob, or summed log-prob / length with
  ``length_normalization`` (length counts the words and the <end>, not <start>). Each image keeps
  its K best (ties: the one that finished first, then the better candidate, stays).
- An image is done when nothing it could still finish can enter its K best: it has K finished
  hypotheses and the worst of them has key >= the best key any live beam could still reach, or
  no live beam remains. Log-probs are <= 0, so a live beam with summed log-prob s can finish with
  at most s (unnormalised), or at most s / max_len (normalised: s' / l' <= s / l' <= s / max_len
  for s' <= s <= 0 and l' <= max_len). Done images are dropped from the batch.
- After ``max_len`` steps, an image with no finished hypothesis returns its live beams instead
  (partial captions of ``max_len`` words without <end>; ``ended`` is False), best first.

Shapes: B images, K beams, V vocabulary, P attention pixels, T steps, L = max_len.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from captioning.data.vocab import END_ID, PAD_ID, START_ID

NEG_INF = float("-inf")


class StepModel(Protocol):
    """What beam search needs from a captioner (``captioning.model.captioner.Captioner`` has it)."""

    def init_state(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B, P, E) features -> decoder state; every tensor's first dimension is B."""
        ...

    def step(
        self, tokens: torch.Tensor, state: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor | None]:
        """(N,) previous words -> (N, V) log-probs, the new state, (N, P) attention or None.

        Must not modify state tensors in place: a tensor returned as the same object is taken
        as unchanged.
        """
        ...


@dataclass(frozen=True)
class BeamResult:
    """The best caption per image, and every image's K best hypotheses.

    ``tokens`` hold the words and the final <end> (not <start>), then PAD_ID; a partial caption
    (no <end> within max_len) holds max_len words. ``scores`` are summed log-probs (divide by
    ``lengths`` for the normalised key). ``alphas[b, t]`` is the attention that produced
    ``tokens[b, t]``, following that caption's own beam history; rows past the length are zero.
    ``hyp_*`` are the K best hypotheses per image, best first, under the same ranking; empty
    slots have score -inf and length 0.
    """

    tokens: torch.Tensor  # (B, T) long
    scores: torch.Tensor  # (B,) summed log-prob of the returned caption
    lengths: torch.Tensor  # (B,) long: words + <end>
    ended: torch.Tensor  # (B,) bool: False for a partial caption
    alphas: torch.Tensor | None  # (B, T, P)
    hyp_tokens: torch.Tensor  # (B, K, L) long
    hyp_scores: torch.Tensor  # (B, K)
    hyp_lengths: torch.Tensor  # (B, K) long


def reachable_bound(live_scores: torch.Tensor, max_len: int, length_normalization: bool) -> torch.Tensor:
    """Best key a live beam with summed log-prob ``live_scores`` can still finish with (see module doc)."""
    return live_scores / max_len if length_normalization else live_scores


def _expand_rows(tensor: torch.Tensor, keep: torch.Tensor, beam_size: int) -> torch.Tensor:
    """Rows of the kept images in the flat (b*K, ...) layout: image i -> rows i*K .. i*K+K-1."""
    rows = (keep.unsqueeze(1) * beam_size + torch.arange(beam_size, device=keep.device)).view(-1)  # (b'*K,)
    return tensor.index_select(0, rows)


@torch.no_grad()
def beam_search(
    model: StepModel,
    features: torch.Tensor,
    *,
    beam_size: int,
    max_len: int,
    length_normalization: bool = False,
    start_id: int = START_ID,
    end_id: int = END_ID,
    banned_ids: Sequence[int] = (PAD_ID, START_ID),
) -> BeamResult:
    """Decode every image of ``features`` (B, P, E) with a beam of ``beam_size``; see the module doc.

    Runs under ``torch.no_grad``; put the model in eval mode first (dropout would make beams
    stochastic).
    """
    if beam_size < 1:
        raise ValueError(f"beam_size must be >= 1, got {beam_size}")
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    K, L = beam_size, max_len
    B = features.size(0)
    device = features.device
    dtype = torch.promote_types(features.dtype, torch.float32)  # summed log-probs: never in half precision
    banned = torch.tensor(list(banned_ids), dtype=torch.long, device=device)

    state = model.init_state(features)  # rows: B
    first = torch.arange(B, device=device).repeat_interleave(K)  # (B*K,)
    state = {name: t.index_select(0, first) for name, t in state.items()}  # rows: B*K, image-major
    # Tensors that step hands back unchanged (the same object: features, their attention
    # projection) hold K identical rows per image, so reordering beams within an image cannot
    # change them: they skip the per-step gather (for ResNet features, most of the state's bytes).
    constant = set(state)
    scores = torch.full((B, K), NEG_INF, dtype=dtype, device=device)  # (B, K)
    scores[:, 0] = 0.0  # only beam 0 expands at step 1
    prev = torch.full((B * K,), start_id, dtype=torch.long, device=device)  # (B*K,)
    seqs = torch.zeros((B, K, 0), dtype=torch.long, device=device)  # (b, K, t) live words
    seq_alphas: torch.Tensor | None = None  # (b, K, t, P)

    # The K best finished hypotheses of every image, indexed by the image's original position.
    fin_keys = torch.full((B, K), NEG_INF, dtype=dtype, device=device)  # (B, K) ranking key
    fin_scores = torch.full((B, K), NEG_INF, dtype=dtype, device=device)  # (B, K)
    fin_lengths = torch.zeros((B, K), dtype=torch.long, device=device)  # (B, K)
    fin_ended = torch.zeros((B, K), dtype=torch.bool, device=device)  # (B, K)
    fin_tokens = torch.full((B, K, L), PAD_ID, dtype=torch.long, device=device)  # (B, K, L)
    fin_alphas: torch.Tensor | None = None  # (B, K, L, P)

    active = torch.arange(B, device=device)  # (b,) original positions of the images still searched
    for t in range(1, L + 1):
        b = active.numel()
        logprobs, stepped, alpha = model.step(prev, state)  # (b*K, V), rows b*K, (b*K, P)
        constant = {name for name in constant if stepped.get(name) is state[name]}
        state = stepped
        V = logprobs.size(1)
        candidates = scores.view(-1, 1) + logprobs.to(scores.dtype)  # (b*K, V)
        candidates.index_fill_(1, banned, NEG_INF)
        candidates = candidates.view(b, K * V)  # (b, K*V)
        top, idx = candidates.topk(K, dim=1)  # (b, K) best first
        parent = idx // V  # (b, K) which beam of the image each survivor extends
        word = idx % V  # (b, K)
        rows = (torch.arange(b, device=device).unsqueeze(1) * K + parent).view(-1)  # (b*K,) flat parents

        state = {name: s if name in constant else s.index_select(0, rows) for name, s in state.items()}
        seqs = torch.cat([seqs.view(b * K, -1).index_select(0, rows).view(b, K, -1), word.unsqueeze(2)], 2)
        if alpha is not None:
            step_alpha = alpha.to(dtype).index_select(0, rows).view(b, K, 1, -1)  # (b, K, 1, P)
            seq_alphas = (
                step_alpha
                if seq_alphas is None
                else torch.cat(
                    [
                        seq_alphas.view(b * K, t - 1, -1).index_select(0, rows).view(b, K, t - 1, -1),
                        step_alpha,
                    ],
                    2,
                )
            )  # (b, K, t, P)
            if fin_alphas is None:
                fin_alphas = torch.zeros((B, K, L, step_alpha.size(3)), dtype=dtype, device=device)

        ended = torch.isfinite(top) & (word == end_id)  # (b, K) -inf survivors are dead rows, not ends
        if bool(ended.any()):
            # Merge this step's ends into the K best: existing first, then candidates best first,
            # and a stable sort, so ties keep the earlier one (as the reference's list sort does).
            new_keys = torch.where(ended, top / t if length_normalization else top, NEG_INF)  # (b, K)
            keys = torch.cat([fin_keys[active], new_keys], 1)  # (b, 2K)
            order = keys.sort(dim=1, descending=True, stable=True).indices[:, :K]  # (b, K)
            fin_keys[active] = keys.gather(1, order)
            fin_scores[active] = torch.cat([fin_scores[active], top], 1).gather(1, order)
            fin_lengths[active] = torch.cat([fin_lengths[active], torch.full_like(word, t)], 1).gather(
                1, order
            )
            fin_ended[active] = torch.cat([fin_ended[active], ended], 1).gather(1, order)
            padded = torch.nn.functional.pad(seqs, (0, L - t), value=PAD_ID)  # (b, K, L)
            tok = torch.cat([fin_tokens[active], padded], 1)  # (b, 2K, L)
            fin_tokens[active] = tok.gather(1, order.unsqueeze(2).expand(-1, -1, L))
            if fin_alphas is not None and seq_alphas is not None:
                P = seq_alphas.size(3)
                pa = torch.nn.functional.pad(seq_alphas, (0, 0, 0, L - t))  # (b, K, L, P)
                al = torch.cat([fin_alphas[active], pa], 1)  # (b, 2K, L, P)
                fin_alphas[active] = al.gather(1, order.view(b, K, 1, 1).expand(-1, -1, L, P))

        scores = top.masked_fill(ended, NEG_INF)  # (b, K) ended rows retire
        prev = word.view(-1)  # (b*K,)
        bound = reachable_bound(scores.max(1).values, L, length_normalization)  # (b,)
        done = fin_keys[active, K - 1] >= bound  # (b,) -inf >= -inf: no live beam left
        if t == L or not bool(done.any()):
            continue
        keep = (~done).nonzero().squeeze(1)  # (b',)
        if keep.numel() == 0:
            active = keep
            break
        # Drop done images: their rows would only be carried along at -inf.
        active = active.index_select(0, keep)
        scores = scores.index_select(0, keep)
        seqs = seqs.index_select(0, keep)
        if seq_alphas is not None:
            seq_alphas = seq_alphas.index_select(0, keep)
        prev = _expand_rows(prev, keep, K)
        state = {name: _expand_rows(s, keep, K) for name, s in state.items()}

    # Images still searched after max_len steps with nothing finished return their live beams.
    if active.numel() > 0:
        fallback = fin_keys[active, 0] == NEG_INF  # (b,)
        if bool(fallback.any()):
            sel = fallback.nonzero().squeeze(1)  # (f,)
            images = active.index_select(0, sel)  # (f,)
            live = scores.index_select(0, sel)  # (f, K)
            keys = reachable_bound(live, L, length_normalization)  # a live beam at max_len has length L
            order = keys.sort(dim=1, descending=True, stable=True).indices  # (f, K)
            fin_keys[images] = keys.gather(1, order)
            fin_scores[images] = live.gather(1, order)
            fin_lengths[images] = torch.where(live.gather(1, order) > NEG_INF, L, 0)
            tokens = seqs.index_select(0, sel).gather(1, order.unsqueeze(2).expand(-1, -1, L))  # (f, K, L)
            fin_tokens[images] = tokens.masked_fill(fin_lengths[images].unsqueeze(2) == 0, PAD_ID)
            if fin_alphas is not None and seq_alphas is not None:
                P = seq_alphas.size(3)
                fin_alphas[images] = seq_alphas.index_select(0, sel).gather(
                    1, order.view(-1, K, 1, 1).expand(-1, -1, L, P)
                )

    lengths = fin_lengths[:, 0]  # (B,)
    T = int(lengths.max()) if B > 0 else 0
    return BeamResult(
        tokens=fin_tokens[:, 0, :T],
        scores=fin_scores[:, 0],
        lengths=lengths,
        ended=fin_ended[:, 0],
        alphas=None if fin_alphas is None else fin_alphas[:, 0, :T],
        hyp_tokens=fin_tokens,
        hyp_scores=fin_scores,
        hyp_lengths=fin_lengths,
    )
