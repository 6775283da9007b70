"""The plain beam search, one image at a time: the reference ``search.beam_search`` must match.

Hypotheses are Python objects in lists; each step runs the model on the image's live hypotheses
only, takes each one's K best words, sorts the candidates in Python and applies the rules of
``captioning/model/search.py`` (its module doc) one hypothesis at a time. Scores and keys are
computed in the batched search's dtype (the features', at least float32) with the same operations,
so the two can differ only where the model's own arithmetic differs between row counts.
Test-only code: used by ``tests/test_search.py`` (exactness) and ``benchmarks/decode.py`` (speed,
which puts ``tests/`` on ``sys.path`` to import it); far too slow to decode with.

Shapes: P attention pixels, V vocabulary, K beams, L = max_len.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from captioning.data.vocab import END_ID, PAD_ID, START_ID
from captioning.model.search import BeamResult, StepModel


@dataclass
class Hypothesis:
    """One beam: its words (and <end> when finished), summed log-prob, attention per word."""

    tokens: list[int]
    score: float
    alphas: list[torch.Tensor] = field(default_factory=list)  # (P,) per token
    row: int = 0  # this hypothesis's row in the state of the step that made it
    ended: bool = False


def _key(score: float, length: int, length_normalization: bool, dtype: torch.dtype) -> float:
    """Ranking key, divided in ``dtype`` like the batched search divides its tensors."""
    if not length_normalization:
        return score
    return float(torch.tensor(score, dtype=dtype) / length)


@torch.no_grad()
def reference_search_one(
    model: StepModel,
    features: torch.Tensor,
    *,
    beam_size: int,
    max_len: int,
    length_normalization: bool = False,
    start_id: int = START_ID,
    end_id: int = END_ID,
    banned_ids: Sequence[int] = (PAD_ID, START_ID),
) -> list[Hypothesis]:
    """Beam search over one image's (1, P, E) features; the K best hypotheses, best first."""
    K, dtype = beam_size, torch.promote_types(features.dtype, torch.float32)
    state = model.init_state(features)  # rows: 1
    live = [Hypothesis(tokens=[], score=0.0)]  # one start hypothesis: beam 0 alone expands
    finished: list[tuple[float, Hypothesis]] = []  # (key, hypothesis), best first, at most K
    for t in range(1, max_len + 1):
        rows = torch.tensor([h.row for h in live], device=features.device)
        state = {name: s.index_select(0, rows) for name, s in state.items()}  # rows: len(live)
        prev = torch.tensor([h.tokens[-1] if h.tokens else start_id for h in live], device=features.device)
        logprobs, state, alpha = model.step(prev, state)  # (n, V), rows n, (n, P)
        allowed = logprobs.to(dtype)  # a copy when the dtype differs: never write the model's output
        if allowed is logprobs:
            allowed = logprobs.clone()
        allowed[:, list(banned_ids)] = float("-inf")
        best_lp, best_words = allowed.topk(min(K, allowed.size(1)), dim=1)  # (n, K)
        totals = torch.tensor([h.score for h in live], dtype=dtype, device=features.device)
        cand_scores = (totals.unsqueeze(1) + best_lp).tolist()
        candidates: list[tuple[float, int, int]] = []  # (score, hypothesis, word)
        for i in range(len(live)):
            for score, word in zip(cand_scores[i], best_words[i].tolist(), strict=True):
                if score > float("-inf"):
                    candidates.append((score, i, word))
        candidates.sort(key=lambda c: -c[0])  # stable: ties keep beam order, then word rank

        new_live: list[Hypothesis] = []
        for score, i, word in candidates[:K]:
            parent = live[i]
            alphas = [*parent.alphas, alpha[i].to(dtype)] if alpha is not None else []
            hyp = Hypothesis([*parent.tokens, word], score, alphas, row=i, ended=word == end_id)
            if hyp.ended:
                finished.append((_key(score, t, length_normalization, dtype), hyp))
            else:
                new_live.append(hyp)
        finished.sort(key=lambda f: -f[0])  # stable: the earlier finished stays ahead on ties
        del finished[K:]
        live = new_live
        if not live:
            break
        best_live = max(h.score for h in live)
        bound = _key(best_live, max_len, length_normalization, dtype)
        if len(finished) == K and finished[-1][0] >= bound:
            break

    if finished:
        return [h for _, h in finished]
    # Nothing ended within max_len: the live beams, best first, as partial captions.
    ranked = sorted(live, key=lambda h: -_key(h.score, max_len, length_normalization, dtype))
    return ranked[:K]


def reference_beam_search(
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
    """``reference_search_one`` for each image of (B, P, E) ``features``, packed like ``beam_search``."""
    B, K, L = features.size(0), beam_size, max_len
    dtype, device = torch.promote_types(features.dtype, torch.float32), features.device
    hyp_tokens = torch.full((B, K, L), PAD_ID, dtype=torch.long)
    hyp_scores = torch.full((B, K), float("-inf"), dtype=dtype)
    hyp_lengths = torch.zeros((B, K), dtype=torch.long)
    ended = torch.zeros(B, dtype=torch.bool)
    best_alphas: list[torch.Tensor | None] = []
    for b in range(B):
        hyps = reference_search_one(
            model,
            features[b : b + 1],
            beam_size=beam_size,
            max_len=max_len,
            length_normalization=length_normalization,
            start_id=start_id,
            end_id=end_id,
            banned_ids=banned_ids,
        )
        for k, h in enumerate(hyps):
            hyp_tokens[b, k, : len(h.tokens)] = torch.tensor(h.tokens, dtype=torch.long)
            hyp_scores[b, k] = h.score
            hyp_lengths[b, k] = len(h.tokens)
        ended[b] = bool(hyps) and hyps[0].ended
        best_alphas.append(torch.stack(hyps[0].alphas).cpu() if hyps and hyps[0].alphas else None)
    lengths = hyp_lengths[:, 0]
    T = int(lengths.max()) if B > 0 else 0
    alphas: torch.Tensor | None = None
    shapes = [a for a in best_alphas if a is not None]
    if shapes:
        alphas = torch.zeros((B, T, shapes[0].size(1)), dtype=dtype)  # (B, T, P)
        for b, a in enumerate(best_alphas):
            if a is not None:
                alphas[b, : a.size(0)] = a
    return BeamResult(
        tokens=hyp_tokens[:, 0, :T].to(device),
        scores=hyp_scores[:, 0].to(device),
        lengths=lengths.to(device),
        ended=ended.to(device),
        alphas=None if alphas is None else alphas.to(device),
        hyp_tokens=hyp_tokens.to(device),
        hyp_scores=hyp_scores.to(device),
        hyp_lengths=hyp_lengths.to(device),
    )
