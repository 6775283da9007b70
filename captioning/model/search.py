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
loop runs over images or beams. Each step records its words, their parent beams and attention
maps; a hypothesis's words are read back through the parents once, at the end, instead of being
copied along with its beam every step. No step waits on the device (a host sync would leave a
GPU idle between steps): which images are done is asked once every ``sync_every`` steps
(default ``SYNC_EVERY`` = 4). ``tests/reference_search.py`` (test-only code) is the same search
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
  for s' <= s <= 0 and l' <= max_len).
- A done image retires in place: its live beams' scores become -inf, so it never extends a beam
  nor adds a finished hypothesis again. Every ``sync_every`` steps the search stops if every image
  is done, and otherwise drops the done images from the batch (they would only cost compute), so
  ``sync_every`` changes which rows a step runs, never the result.
- After ``max_len`` steps, an image that is not done and has no finished hypothesis returns its
  live beams instead (partial captions of ``max_len`` words without <end>; ``ended`` is False),
  best first.

Shapes: B images, K beams, V vocabulary, P attention pixels, T steps, L = max_len.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from captioning.data.vocab import END_ID, PAD_ID, START_ID

NEG_INF = float("-inf")
# Decoding steps between host syncs (on a GPU each one waits for every queued step to finish). On
# the CPU, where a sync waits for nothing, 4 measured no slower than 1 for beam search: done images
# run up to 3 more steps before they leave the batch, but it is compacted (its B*K-row state
# copied) less often.
SYNC_EVERY = 4


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


def _write_back(
    out: dict[str, torch.Tensor], fin: dict[str, torch.Tensor], active: torch.Tensor, num_images: int
) -> None:
    """Copies the searched images' finished hypotheses (b, K) to their rows of ``out`` (B, K)."""
    for name, field in fin.items():
        if name not in out:  # every image is written back before the result is read
            out[name] = field.new_empty((num_images, *field.shape[1:]))
        out[name].index_copy_(0, active, field)


def _trace_back(
    beams: torch.Tensor,
    lengths: torch.Tensor,
    words: torch.Tensor,
    parents: torch.Tensor,
    step_alphas: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Words (B, n, L) and attention (B, n, L, P) of the n hypotheses per image whose last word is
    that of beam ``beams`` (B, n) at step ``lengths`` (B, n), read back through each step's
    ``parents`` (L, B, K) from ``words`` (L, B, K) and ``step_alphas`` (L, B, K, P) or None;
    PAD_ID and zeros after the length."""
    L = words.size(0)
    tokens = torch.full((*beams.shape, L), PAD_ID, dtype=torch.long, device=beams.device)  # (B, n, L)
    alphas = None if step_alphas is None else step_alphas.new_zeros((*beams.shape, L, step_alphas.size(3)))
    beam = beams  # (B, n) each hypothesis's beam at step s
    for s in range(L, 0, -1):
        on = s <= lengths  # (B, n) the hypothesis has a word at step s
        tokens[:, :, s - 1] = torch.where(on, words[s - 1].gather(1, beam), PAD_ID)
        if alphas is not None and step_alphas is not None:
            index = beam.unsqueeze(2).expand(-1, -1, step_alphas.size(3))  # (B, n, P)
            alphas[:, :, s - 1] = step_alphas[s - 1].gather(1, index).masked_fill(~on.unsqueeze(2), 0.0)
        beam = torch.where(on, parents[s - 1].gather(1, beam), beam)
    return tokens, alphas


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
    sync_every: int = SYNC_EVERY,
) -> BeamResult:
    """Decode every image of ``features`` (B, P, E) with a beam of ``beam_size``; see the module doc.

    ``sync_every``: steps between the host syncs that stop the search once every image is done and
    drop done images from the batch (1: every step). The result does not depend on it.
    Runs under ``torch.no_grad``; put the model in eval mode first (dropout would make beams
    stochastic).
    """
    if beam_size < 1:
        raise ValueError(f"beam_size must be >= 1, got {beam_size}")
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    if sync_every < 1:
        raise ValueError(f"sync_every must be >= 1, got {sync_every}")
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

    # What every step chose, by original image: a hypothesis's words and attention maps are read
    # back through the parents once at the end, not copied along with its beam at every step.
    words = torch.zeros((L, B, K), dtype=torch.long, device=device)  # word of beam k at step t
    parents = torch.zeros((L, B, K), dtype=torch.long, device=device)  # the beam at t-1 it extended
    step_alphas: torch.Tensor | None = None  # (L, B, K, P) the attention that produced the word
    # The K best finished hypotheses of each image still searched, best first, each (b, K): "beams"
    # is the beam of its last word (at step "lengths"). ``out`` gets an image's rows when it leaves.
    fin = {
        "keys": torch.full((B, K), NEG_INF, dtype=dtype, device=device),  # ranking key
        "scores": torch.full((B, K), NEG_INF, dtype=dtype, device=device),
        "lengths": torch.zeros((B, K), dtype=torch.long, device=device),
        "ended": torch.zeros((B, K), dtype=torch.bool, device=device),
        "beams": torch.zeros((B, K), dtype=torch.long, device=device),
    }
    out: dict[str, torch.Tensor] = {}  # the same fields for all B images, by original position
    beam_ids = torch.arange(K, device=device).expand(B, K)  # (B, K)

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
        words[t - 1].index_copy_(0, active, word)
        parents[t - 1].index_copy_(0, active, parent)
        if alpha is not None:
            if step_alphas is None:
                step_alphas = torch.zeros((L, B, K, alpha.size(1)), dtype=dtype, device=device)
            step_alphas[t - 1].index_copy_(0, active, alpha.to(dtype).index_select(0, rows).view(b, K, -1))

        # Merge this step's ends into the K best, every step (whether anything ended would be a host
        # sync): existing first, then candidates best first, and a stable sort, so ties keep the
        # earlier one (as the reference's list sort does); with nothing ended (new keys all -inf)
        # the existing entries stay as they were.
        ended = torch.isfinite(top) & (word == end_id)  # (b, K) -inf survivors are dead rows, not ends
        new = {
            "keys": torch.where(ended, top / t if length_normalization else top, NEG_INF),
            "scores": top,
            "lengths": torch.full_like(word, t),
            "ended": ended,
            "beams": beam_ids[:b],
        }
        both = {name: torch.cat([field, new[name]], 1) for name, field in fin.items()}  # (b, 2K)
        order = both["keys"].sort(dim=1, descending=True, stable=True).indices[:, :K]  # (b, K)
        fin = {name: field.gather(1, order) for name, field in both.items()}

        scores = top.masked_fill(ended, NEG_INF)  # (b, K) ended rows retire
        prev = word.view(-1)  # (b*K,)
        bound = reachable_bound(scores.max(1).values, L, length_normalization)  # (b,)
        done = fin["keys"][:, K - 1] >= bound  # (b,) -inf >= -inf: no live beam left
        # Done images retire in place: at -inf they never extend nor finish anything again.
        scores = scores.masked_fill(done.unsqueeze(1), NEG_INF)
        if t % sync_every != 0 or t == L:
            continue
        keep = (~done).nonzero().squeeze(1)  # (b',) the one host sync of these sync_every steps
        if keep.numel() == 0:
            break
        if keep.numel() == b:
            continue
        # Drop done images: their rows would only be carried along at -inf.
        _write_back(out, fin, active, B)
        fin = {name: field.index_select(0, keep) for name, field in fin.items()}
        active = active.index_select(0, keep)
        scores = scores.index_select(0, keep)
        prev = _expand_rows(prev, keep, K)
        state = {name: _expand_rows(s, keep, K) for name, s in state.items()}
    else:
        # After max_len steps (no break: some image was still searched), an image that is not done
        # and finished nothing returns its live beams; a mask, not a host-side choice of images.
        fallback = (~done & (fin["keys"][:, 0] == NEG_INF)).unsqueeze(1)  # (b, 1)
        keys = reachable_bound(scores, L, length_normalization)  # a live beam at max_len has length L
        order = keys.sort(dim=1, descending=True, stable=True).indices  # (b, K)
        live = scores.gather(1, order)  # (b, K)
        partial = {
            "keys": keys.gather(1, order),
            "scores": live,
            "lengths": torch.where(live > NEG_INF, L, 0),
            "ended": torch.zeros_like(fin["ended"]),
            "beams": order,
        }
        fin = {name: torch.where(fallback, partial[name], field) for name, field in fin.items()}
    _write_back(out, fin, active, B)

    hyp_tokens, _ = _trace_back(out["beams"], out["lengths"], words, parents, None)  # (B, K, L)
    # Attention maps of the best hypothesis only: the result has no others.
    _, alphas = _trace_back(out["beams"][:, :1], out["lengths"][:, :1], words, parents, step_alphas)
    lengths = out["lengths"][:, 0]  # (B,)
    T = int(lengths.max()) if B > 0 else 0
    return BeamResult(
        tokens=hyp_tokens[:, 0, :T],
        scores=out["scores"][:, 0],
        lengths=lengths,
        ended=out["ended"][:, 0],
        alphas=None if alphas is None else alphas[:, 0, :T],
        hyp_tokens=hyp_tokens,
        hyp_scores=out["scores"],
        hyp_lengths=out["lengths"],
    )
