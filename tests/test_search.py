"""Batched beam search against the plain per-image reference, token for token; no decoding loop
(beam search, greedy, sampling) makes the host wait on the device inside a step.

The model is a tiny attention decoder defined here (embedding + GRU cell + additive attention over
random features, float64 so that no near-tie flips between the two searches); where the real
``build_captioner`` exists, its Show-Attend-Tell decoder is checked the same way.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
from typing import Any

import pytest
import torch
from reference_search import reference_beam_search, reference_search_one
from torch import nn
from torch.overrides import TorchFunctionMode

from captioning.data.vocab import END_ID, PAD_ID, START_ID
from captioning.model.captioner import Method
from captioning.model.search import BeamResult, StepModel, beam_search

VOCAB, P, E, D, A, EMB = 30, 9, 8, 16, 12, 10


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class TinyDecoder(nn.Module):
    """The step interface of ``Captioner`` at toy size: init_state / step / greedy generate.

    ``end_bias`` is added to <end>'s logit: -inf makes a model that never ends.
    """

    def __init__(self, vocab_size: int = VOCAB, end_bias: float = 0.0, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(vocab_size, EMB)
        self.init_h = nn.Linear(E, D)
        self.att_feat = nn.Linear(E, A)
        self.att_hidden = nn.Linear(D, A)
        self.att_out = nn.Linear(A, 1)
        self.cell = nn.GRUCell(EMB + E, D)
        self.out = nn.Linear(D, vocab_size)
        with torch.no_grad():
            self.out.weight.mul_(6.0)  # peakier distributions: beams diverge from greedy more often
        self.end_bias = end_bias
        self.double()

    def init_state(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        return {
            "h": torch.tanh(self.init_h(features.mean(1))),  # (B, D)
            "features": features,  # (B, P, E)
            "att": self.att_feat(features),  # (B, P, A)
        }

    def step(
        self, tokens: torch.Tensor, state: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor | None]:
        h = state["h"]
        energy = self.att_out(torch.tanh(state["att"] + self.att_hidden(h).unsqueeze(1))).squeeze(2)
        alpha = torch.softmax(energy, dim=1)  # (N, P)
        context = torch.bmm(alpha.unsqueeze(1), state["features"]).squeeze(1)  # (N, E)
        h = self.cell(torch.cat([self.embed(tokens), context], 1), h)
        logits = self.out(h)  # (N, V)
        logits[:, END_ID] += self.end_bias
        return torch.log_softmax(logits, dim=1), {**state, "h": h}, alpha

    @torch.no_grad()
    def greedy(self, features: torch.Tensor, max_len: int) -> tuple[list[list[int]], list[float]]:
        """Plain greedy decoding, one image at a time: argmax until <end> or max_len words."""
        captions, scores = [], []
        for b in range(features.size(0)):
            state = self.init_state(features[b : b + 1])
            word, words, total = START_ID, [], 0.0
            for _ in range(max_len):
                logprobs, state, _ = self.step(torch.tensor([word]), state)
                allowed = logprobs[0].clone()
                allowed[[PAD_ID, START_ID]] = float("-inf")  # never emitted, as in Captioner
                word = int(allowed.argmax())
                total += float(logprobs[0, word])
                words.append(word)
                if word == END_ID:
                    break
            captions.append(words)
            scores.append(total)
        return captions, scores


def features_for(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, P, E, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def assert_same(batched: BeamResult, reference: BeamResult) -> None:
    """Same best caption (token for token), score, length and hypotheses; allclose scores/alphas."""
    assert torch.equal(batched.tokens, reference.tokens)
    assert torch.equal(batched.lengths, reference.lengths)
    assert torch.equal(batched.ended, reference.ended)
    torch.testing.assert_close(batched.scores, reference.scores)
    assert torch.equal(batched.hyp_lengths, reference.hyp_lengths)
    assert torch.equal(batched.hyp_tokens, reference.hyp_tokens)
    torch.testing.assert_close(batched.hyp_scores, reference.hyp_scores)
    assert batched.alphas is not None and reference.alphas is not None
    torch.testing.assert_close(batched.alphas, reference.alphas)


@pytest.mark.parametrize("length_normalization", [False, True])
@pytest.mark.parametrize("beam_size", [1, 3, 5])
def test_batched_equals_per_image_reference(beam_size: int, length_normalization: bool) -> None:
    model = TinyDecoder(end_bias=0.3).eval()
    features = features_for(64)
    kwargs: dict[str, Any] = dict(beam_size=beam_size, max_len=12, length_normalization=length_normalization)
    batched = beam_search(model, features, **kwargs)
    reference = reference_beam_search(model, features, **kwargs)
    assert_same(batched, reference)
    # The comparison means something: most captions end, at different lengths (12 is partial).
    assert batched.ended.float().mean() > 0.5
    assert len(set(batched.lengths.tolist())) >= 4


class RowCounter:
    """Wraps a model and records how many rows each decoding step ran on."""

    def __init__(self, model: StepModel) -> None:
        self.model = model
        self.rows: list[int] = []

    def init_state(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.model.init_state(features)

    def step(
        self, tokens: torch.Tensor, state: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor | None]:
        self.rows.append(tokens.numel())
        return self.model.step(tokens, state)


def test_images_finishing_at_different_steps_in_one_batch() -> None:
    model = TinyDecoder(end_bias=0.3).eval()
    features = features_for(32, seed=7)
    counter = RowCounter(model)
    batched = beam_search(counter, features, beam_size=3, max_len=15, sync_every=1)
    # Checked every step, done images leave the batch: rows shrink in several stages, yet some run
    # all 15 steps.
    assert counter.rows[0] == 32 * 3 and len(counter.rows) == 15
    assert len(set(counter.rows)) >= 4 and counter.rows == sorted(counter.rows, reverse=True)
    assert_same(batched, reference_beam_search(model, features, beam_size=3, max_len=15))
    # Checked every 4th step (the default), they leave only after steps 4, 8 and 12: same result.
    every_4th = RowCounter(model)
    assert_same(beam_search(every_4th, features, beam_size=3, max_len=15), batched)
    changes = [t for t in range(1, 15) if every_4th.rows[t] != every_4th.rows[t - 1]]  # after step t
    assert changes and set(changes) <= {4, 8, 12}
    # Each image's result does not depend on its batch-mates or its position in the batch.
    for b in (0, 5, 31):
        alone = beam_search(model, features[b : b + 1], beam_size=3, max_len=15)
        n = int(alone.lengths[0])
        assert torch.equal(alone.tokens[0, :n], batched.tokens[b, :n])
        torch.testing.assert_close(alone.scores[0], batched.scores[b])
    perm = torch.randperm(32, generator=torch.Generator().manual_seed(0))
    shuffled = beam_search(model, features[perm], beam_size=3, max_len=15)
    assert torch.equal(shuffled.lengths, batched.lengths[perm])
    torch.testing.assert_close(shuffled.scores, batched.scores[perm])


@pytest.mark.parametrize(("length_normalization", "end_bias"), [(False, 0.0), (True, 0.0), (True, 2.0)])
def test_sync_every_does_not_change_the_result(length_normalization: bool, end_bias: float) -> None:
    model = TinyDecoder(end_bias=end_bias).eval()
    features = features_for(32, seed=7)
    kwargs: dict[str, Any] = dict(beam_size=3, max_len=10, length_normalization=length_normalization)
    counter = RowCounter(model)
    every_step = beam_search(counter, features, sync_every=1, **kwargs)
    # The batch means something: best captions of several lengths, and images done at different
    # steps (rows shrink in stages) or partial captions (max_len words without <end>); the first
    # case has both, the second partials, the third stages.
    assert len(set(every_step.lengths.tolist())) >= 2
    assert len(set(counter.rows)) >= 3 or not every_step.ended.all()
    for sync_every in (2, 4, 7):
        result = beam_search(model, features, sync_every=sync_every, **kwargs)
        for field in dataclasses.fields(BeamResult):
            got, expected = getattr(result, field.name), getattr(every_step, field.name)
            if expected.is_floating_point():  # steps run on other row counts: a matmul's last bit may differ
                torch.testing.assert_close(got, expected, msg=field.name)
            else:
                assert torch.equal(got, expected), field.name


def test_tokens_end_with_end_then_pad() -> None:
    model = TinyDecoder(end_bias=1.0).eval()
    result = beam_search(model, features_for(16), beam_size=3, max_len=12, length_normalization=True)
    assert result.ended.all()
    for b in range(16):
        n = int(result.lengths[b])
        row = result.tokens[b].tolist()
        assert row[n - 1] == END_ID and END_ID not in row[: n - 1]
        assert all(t == PAD_ID for t in row[n:])
    # The finished hypotheses are distinct and best first (by the length-normalised key); empty
    # slots (fewer than K finished by max_len) come last.
    keys = (result.hyp_scores / result.hyp_lengths.clamp(min=1)).tolist()
    for b in range(16):
        filled = int((result.hyp_lengths[b] > 0).sum())
        assert (result.hyp_lengths[b, filled:] == 0).all()
        assert len({tuple(result.hyp_tokens[b, k].tolist()) for k in range(filled)}) == filled
        assert keys[b][:filled] == sorted(keys[b][:filled], reverse=True)


@pytest.mark.parametrize("length_normalization", [False, True])
def test_no_end_returns_best_partial_of_max_len(length_normalization: bool) -> None:
    model = TinyDecoder(end_bias=float("-inf")).eval()
    features = features_for(8)
    kwargs: dict[str, Any] = dict(beam_size=4, max_len=7, length_normalization=length_normalization)
    batched = beam_search(model, features, **kwargs)
    assert batched.tokens.shape == (8, 7)
    assert batched.lengths.tolist() == [7] * 8
    assert not batched.ended.any()
    assert not (batched.tokens == END_ID).any()
    assert torch.isfinite(batched.scores).all()
    assert_same(batched, reference_beam_search(model, features, **kwargs))


def test_greedy_equals_beam_size_one() -> None:
    model = TinyDecoder().eval()
    features = features_for(32, seed=3)
    result = beam_search(model, features, beam_size=1, max_len=10)
    captions, scores = model.greedy(features, max_len=10)
    for b in range(32):
        assert result.tokens[b, : result.lengths[b]].tolist() == captions[b]
    torch.testing.assert_close(result.scores, torch.tensor(scores, dtype=torch.float64))


def test_alphas_follow_each_caption_and_sum_to_one() -> None:
    model = TinyDecoder().eval()
    features = features_for(16)
    result = beam_search(model, features, beam_size=4, max_len=12)
    assert result.alphas is not None
    assert result.alphas.shape == (16, result.tokens.size(1), P)
    for b in range(16):
        n = int(result.lengths[b])
        torch.testing.assert_close(result.alphas[b, :n].sum(1), torch.ones(n, dtype=torch.float64))
        assert (result.alphas[b, n:] == 0).all()
        # Replaying the returned caption through the model gives the same attention maps.
        state = model.init_state(features[b : b + 1])
        word = START_ID
        for t in range(n):
            _, state, alpha = model.step(torch.tensor([word]), state)
            assert alpha is not None
            torch.testing.assert_close(alpha[0], result.alphas[b, t])
            word = int(result.tokens[b, t])


def test_first_words_are_distinct_and_vocab_smaller_than_beam() -> None:
    model = TinyDecoder(vocab_size=4).eval()  # 4 words, beam 6: dead beams from the first step
    features = features_for(6)
    kwargs: dict[str, Any] = dict(beam_size=6, max_len=5)
    batched = beam_search(model, features, **kwargs)
    assert_same(batched, reference_beam_search(model, features, **kwargs))
    # Only beam 0 expands at step 1: with 4 words allowed (not <pad>, <start>, <end>), a beam of 4
    # holds each once.
    no_end = TinyDecoder(vocab_size=7, end_bias=float("-inf")).eval()
    first = beam_search(no_end, features, beam_size=4, max_len=1)
    for b in range(6):
        assert sorted(first.hyp_tokens[b, :, 0].tolist()) == [3, 4, 5, 6]


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="beam_size"):
        beam_search(TinyDecoder(), features_for(1), beam_size=0, max_len=3)
    with pytest.raises(ValueError, match="max_len"):
        beam_search(TinyDecoder(), features_for(1), beam_size=2, max_len=0)
    with pytest.raises(ValueError, match="sync_every"):
        beam_search(TinyDecoder(), features_for(1), beam_size=2, max_len=3, sync_every=0)


def test_reference_one_image_matches_packed() -> None:
    model = TinyDecoder().eval()
    features = features_for(2)
    hyps = reference_search_one(model, features[1:2], beam_size=3, max_len=12)
    packed = reference_beam_search(model, features, beam_size=3, max_len=12)
    assert hyps[0].tokens == packed.tokens[1, : packed.lengths[1]].tolist()


# --- the real Show-Attend-Tell decoder, once captioning.model.factory exists ---------------------

_HAS_FACTORY = importlib.util.find_spec("captioning.model.factory") is not None


@pytest.mark.skipif(not _HAS_FACTORY, reason="captioning.model.factory not written yet")
@pytest.mark.parametrize("length_normalization", [False, True])
def test_real_show_attend_tell_matches_reference(length_normalization: bool) -> None:
    from captioning.config import ModelConfig
    from captioning.model.factory import build_captioner

    torch.manual_seed(0)
    cfg = ModelConfig(
        encoder="resnet18", encoder_weights=None, encoded_image_size=3, emb_dim=16, attention_dim=16,
        decoder_dim=24, dropout=0.0,
    )  # fmt: skip
    model = build_captioner(cfg, 30).double().eval()
    features = torch.randn(24, 9, 512, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    for beam_size in (1, 3, 5):
        kwargs: dict[str, Any] = dict(
            beam_size=beam_size, max_len=12, length_normalization=length_normalization
        )
        assert_same(beam_search(model, features, **kwargs), reference_beam_search(model, features, **kwargs))


@pytest.mark.skipif(not _HAS_FACTORY, reason="captioning.model.factory not written yet")
def test_real_generate_greedy_equals_beam_size_one() -> None:
    from captioning.config import ModelConfig
    from captioning.model.factory import build_captioner

    torch.manual_seed(0)
    cfg = ModelConfig(
        encoder="resnet18", encoder_weights=None, encoded_image_size=3, emb_dim=16, attention_dim=16,
        decoder_dim=24, dropout=0.0,
    )  # fmt: skip
    model = build_captioner(cfg, 30).double().eval()
    features = torch.randn(24, 9, 512, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    greedy = model.generate(features, method="greedy", max_len=12)  # tokens (B, 1, T)
    beam = beam_search(model, features, beam_size=1, max_len=12)
    assert torch.equal(greedy.lengths[:, 0], beam.lengths)
    T = beam.tokens.size(1)
    assert torch.equal(greedy.tokens[:, 0, :T], beam.tokens)
    torch.testing.assert_close(greedy.scores[:, 0], beam.scores)
    assert greedy.alphas is not None and beam.alphas is not None
    torch.testing.assert_close(greedy.alphas[:, 0, :T], beam.alphas)
    # generate(method="beam") is this search's best caption.
    via_generate = model.generate(features, method="beam", beam_size=3, max_len=12)
    direct = beam_search(model, features, beam_size=3, max_len=12)
    assert torch.equal(via_generate.tokens[:, 0], direct.tokens)
    assert torch.equal(via_generate.lengths[:, 0], direct.lengths)


# --- no host sync inside a decoding step ----------------------------------------------------------

# Tensor methods that read a value on the host: on a GPU each one waits for the queued work to finish.
HOST_READS = frozenset(
    (
        "__bool__", "__int__", "__float__", "__index__", "item", "tolist", "numpy", "cpu",
        "nonzero", "argwhere", "masked_select", "unique", "equal", "allclose",
    )
)  # fmt: skip


def _reads_host(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    if name in HOST_READS:
        return True
    if name == "to":  # a copy to the host; .to(dtype) is not one
        targets = [*args[1:], kwargs.get("device")]
        return any(isinstance(a, str | torch.device) and torch.device(a).type == "cpu" for a in targets)
    if name in ("__getitem__", "__setitem__"):  # boolean-mask indexing: its size is read first
        index = args[1] if isinstance(args[1], tuple) else (args[1],)
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in index)
    if name == "repeat_interleave":  # tensor repeats without output_size: the size is read first
        return isinstance(args[1], torch.Tensor) and kwargs.get("output_size") is None
    return False


class HostReadCounter(TorchFunctionMode):
    """Records every torch call made under it that reads a tensor's value on the host.

    It sees Python-level calls (``bool(t)``, ``t.item()``, ``t.nonzero()``, ``t[mask]``, ...), which
    is where a decoding loop would sync; these tests run on the CPU, where the count is the same.
    """

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if _reads_host(name, args, kwargs):
            self.reads.append(name)
        return func(*args, **kwargs)


def test_host_read_counter_sees_the_usual_syncs() -> None:
    x = torch.tensor([0.5, -1.0, 2.0])
    with HostReadCounter() as counter:
        bool(x.any()), x.nonzero(), int(x.argmax()), float(x.sum()), x[0].item(), x.tolist()
        [1, 2, 3][x.argmin()], x.to("cpu"), x.cpu(), x[x > 0], x.to(torch.float64)
    assert counter.reads == [
        "__bool__", "nonzero", "__int__", "__float__", "item", "tolist", "__index__", "to", "cpu",
        "__getitem__",
    ]  # fmt: skip


def end_biased_captioner(end_bias: float) -> Any:
    """The real Show-Attend-Tell at toy size, output layer sharpened (x8) and <end> made likelier
    by ``end_bias``: captions end at different steps, some not within 16."""
    from captioning.config import ModelConfig
    from captioning.model.factory import build_captioner

    torch.manual_seed(0)
    cfg = ModelConfig(
        encoder="resnet18", encoder_weights=None, encoded_image_size=3, emb_dim=16, attention_dim=16,
        decoder_dim=24, dropout=0.0,
    )  # fmt: skip
    model = build_captioner(cfg, 30).eval()
    with torch.no_grad():
        model.decoder.fc.weight.mul_(8.0)
        model.decoder.fc.bias[END_ID] += end_bias
    return model


def captioner_features() -> torch.Tensor:
    return torch.randn(16, 9, 512, generator=torch.Generator().manual_seed(5)).relu()  # (B, P, E)


def assert_few_host_reads(reads: dict[int | None, tuple[int, int]]) -> None:
    """``reads``: sync_every -> (host reads, steps) of one decoding call, for sync_every 1 and 4.

    At most one read per sync_every steps, plus one after the loop (the output's length). Checked
    every step (the loop before sync_every), the count breaks that bound: the check can fail.
    """
    count, steps = reads[4]
    assert count <= math.ceil(steps / 4) + 1 and count < steps, reads
    count, steps = reads[1]
    assert count >= steps > math.ceil(steps / 4) + 1, reads


class EndsFrom(RowCounter):
    """From the step written in an image's ``features[0, 0]`` on, its beams can only say <end>:
    every beam ends then, so the image is done at that step."""

    def step(
        self, tokens: torch.Tensor, state: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor | None]:
        logprobs, stepped, alpha = super().step(tokens, state)  # (N, V)
        only_end = torch.full_like(logprobs, float("-inf"))
        only_end[:, END_ID] = 0.0
        force = state["features"][:, 0, 0] <= len(self.rows)  # (N,) on the device: no host read
        return torch.where(force.unsqueeze(1), only_end, logprobs), stepped, alpha


@pytest.mark.skipif(not _HAS_FACTORY, reason="captioning.model.factory not written yet")
@pytest.mark.parametrize("done_at_chosen_steps", [False, True])
@pytest.mark.parametrize("length_normalization", [False, True])
@pytest.mark.parametrize("beam_size", [1, 3, 5])
def test_beam_search_reads_the_host_once_every_sync_every_steps(
    beam_size: int, length_normalization: bool, done_at_chosen_steps: bool
) -> None:
    model, features = end_biased_captioner(0.0), captioner_features()
    # As is, some images are never done: all 16 steps run. Else images are done at steps 3 to 11
    # and the search stops early (after 11 steps, or 12 checking every 4th).
    if done_at_chosen_steps:
        features[:, 0, 0] = 3 + torch.arange(16) % 9
    reads = {}
    for sync_every in (1, 4, None):  # None: the default, 4
        steps = (EndsFrom if done_at_chosen_steps else RowCounter)(model)
        kwargs: dict[str, Any] = dict(
            beam_size=beam_size, max_len=16, length_normalization=length_normalization
        )
        if sync_every is not None:
            kwargs["sync_every"] = sync_every
        with HostReadCounter() as counter:
            beam_search(steps, features, **kwargs)
        reads[sync_every] = (len(counter.reads), len(steps.rows))
    assert_few_host_reads(reads)
    assert reads[None] == reads[4]


@pytest.mark.skipif(not _HAS_FACTORY, reason="captioning.model.factory not written yet")
@pytest.mark.parametrize(("method", "end_bias"), [("greedy", 0.0), ("sample", 0.0), ("sample", 2.0)])
def test_greedy_and_sampling_read_the_host_once_every_sync_every_steps(
    method: Method, end_bias: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, features = end_biased_captioner(end_bias), captioner_features()
    # Greedy and sampling with end bias 0 run all 16 steps (some captions never end); sampling with
    # end bias 2 stops once every caption has ended. Sampling runs with gradients, as in SCST.
    step, steps = model.step, 0

    def counted_step(tokens: torch.Tensor, state: dict[str, torch.Tensor]) -> Any:
        nonlocal steps
        steps += 1
        return step(tokens, state)

    monkeypatch.setattr(model, "step", counted_step)
    reads = {}
    for sync_every in (1, 4, None):  # None: the default, 1 on the CPU (a sync there waits for nothing)
        steps = 0
        with HostReadCounter() as counter:
            model.generate(
                features, method=method, num_samples=3 if method == "sample" else 1, max_len=16,
                generator=torch.Generator().manual_seed(0), sync_every=sync_every,
            )  # fmt: skip
        reads[sync_every] = (len(counter.reads), steps)
    assert_few_host_reads(reads)
    assert reads[None] == reads[1]
