"""Attention, the three decoders, the captioner's interface and decoding, GloVe embeddings."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from captioning.config import ModelConfig
from captioning.data.vocab import END_ID, PAD_ID, START_ID
from captioning.model import Captioner, Generation, build_captioner, build_embeddings
from captioning.model.attention import SoftAttention
from captioning.model.captioner import Method
from captioning.model.decoders import DecodeState, FCDecoder, ShowAttendTell, ShowTell
from captioning.model.embeddings import load_glove

ARCHS = ("show_attend_tell", "fc", "show_tell")
V, P, E = 23, 4, 512  # vocab, pixels (2x2 grid), ResNet-18 channels


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_config(arch: str = "show_attend_tell", **overrides: object) -> ModelConfig:
    base = ModelConfig(
        arch=arch,  # type: ignore[arg-type]
        encoder="resnet18",
        encoder_weights=None,
        encoded_image_size=2,
        emb_dim=8,
        attention_dim=10,
        decoder_dim=12,
        dropout=0.1,
    )
    return dataclasses.replace(base, **overrides)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def models() -> dict[str, Captioner]:
    torch.manual_seed(0)
    out = {arch: build_captioner(tiny_config(arch), V).eval() for arch in ARCHS}
    with torch.no_grad():  # non-trivial BatchNorm statistics for show_tell
        out["show_tell"].train()(torch.randn(6, P, E), *random_captions(6, 1, 5))
        out["show_tell"].eval()
    return out


def random_captions(B: int, S: int, L: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, S, L) captions <start> w.. <end> <pad>.. with lengths in [2, L], and the lengths."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, L + 1, (B, S), generator=g)
    lengths[0, 0] = L
    captions = torch.randint(4, V, (B, S, L), generator=g)
    captions[:, :, 0] = START_ID
    steps = torch.arange(L)
    captions[steps == (lengths - 1).unsqueeze(-1)] = END_ID
    captions[steps >= lengths.unsqueeze(-1)] = PAD_ID
    return captions, lengths


def features_for(B: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(B, P, E, generator=torch.Generator().manual_seed(seed)).relu()


def valid_steps(lengths: torch.Tensor, T: int) -> torch.Tensor:
    return torch.arange(T) < (lengths - 1).unsqueeze(-1)  # (B, S, T)


# --------------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------------


def test_attention_shapes_and_weights() -> None:
    attention = SoftAttention(encoder_dim=6, decoder_dim=5, attention_dim=7)
    features = torch.randn(3, 4, 6)  # (B, P, E)
    att_proj = attention.project(features)
    assert att_proj.shape == (3, 4, 7)
    hidden = torch.randn(3, 5)
    context, alpha = attention(features, att_proj, hidden)
    assert context.shape == (3, 6) and alpha.shape == (3, 4)
    torch.testing.assert_close(alpha.sum(-1), torch.ones(3))
    torch.testing.assert_close(context, (features * alpha.unsqueeze(-1)).sum(1))
    # the textbook formula, written out
    scores = attention.full_att(
        torch.relu(attention.encoder_att(features) + attention.decoder_att(hidden)[:, None])
    )
    torch.testing.assert_close(alpha, torch.softmax(scores.squeeze(-1), dim=-1))
    # scratch mode computes the same weights and consumes its input
    scratch = att_proj.clone()
    torch.testing.assert_close(attention.weights(scratch, hidden, scratch=True), alpha)
    assert not torch.equal(scratch, att_proj)


# --------------------------------------------------------------------------------------------------
# Teacher forcing
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_shapes(models: dict[str, Captioner], arch: str) -> None:
    model = models[arch]
    with torch.no_grad():
        features = model.encode(torch.randn(2, 3, 32, 32))
        assert features.shape == (2, P, E)
        captions, lengths = random_captions(2, 3, 7)
        out = model(features, captions, lengths)
    assert out.logits.shape == (2, 3, 6, V)
    if arch == "show_attend_tell":
        assert out.alphas is not None and out.alphas.shape == (2, 3, 6, P)
        mask = valid_steps(lengths, 6)
        torch.testing.assert_close(out.alphas.sum(-1), mask.float())  # zero past the end
    else:
        assert out.alphas is None


@pytest.mark.parametrize("arch", ARCHS)
def test_captions_per_image_equal_duplicated_images(models: dict[str, Captioner], arch: str) -> None:
    """S captions sharing an image's features == each caption with its own copy (seq_per_img)."""
    model = models[arch]
    features = features_for(3)
    captions, lengths = random_captions(3, 4, 8)
    with torch.no_grad():
        shared = model(features, captions, lengths)
        copied = model(features.repeat_interleave(4, dim=0), captions.view(12, 1, 8), lengths.view(12, 1))
    torch.testing.assert_close(shared.logits, copied.logits.view(3, 4, 7, V))
    if shared.alphas is not None:
        assert copied.alphas is not None
        torch.testing.assert_close(shared.alphas, copied.alphas.view(3, 4, 7, P))


def test_encoder_projection_runs_once_per_image(models: dict[str, Captioner]) -> None:
    decoder = models["show_attend_tell"].decoder
    assert isinstance(decoder, ShowAttendTell)
    calls: list[int] = []
    handle = decoder.attention.encoder_att.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    try:
        captions, lengths = random_captions(2, 5, 11)  # 10 teacher-forced steps
        with torch.no_grad():
            decoder(features_for(2), captions, lengths)
    finally:
        handle.remove()
    assert calls == [2]  # one call, on the 2 images (not 10 steps x 10 captions)


@pytest.mark.parametrize("arch", ARCHS)
def test_step_by_step_equals_teacher_forcing(models: dict[str, Captioner], arch: str) -> None:
    """init_state + step over the reference tokens gives forward's log-probs (beam search relies on it)."""
    model = models[arch]
    features = features_for(2)
    captions, lengths = random_captions(2, 1, 6)
    with torch.no_grad():
        expected = F.log_softmax(model(features, captions, lengths).logits[:, 0], dim=-1)  # (B, T, V)
        state = model.init_state(features)
        for t in range(5):
            logprobs, state, alpha = model.step(captions[:, 0, t], state)
            mask = t < lengths[:, 0] - 1
            torch.testing.assert_close(logprobs[mask], expected[mask, t], atol=1e-5, rtol=1e-5)
            assert logprobs.shape == (2, V)
            assert (alpha is None) == (arch != "show_attend_tell")


@pytest.mark.parametrize("arch", ARCHS)
def test_decode_state_rows_come_first(models: dict[str, Captioner], arch: str) -> None:
    model = models[arch]
    with torch.no_grad():
        state = model.init_state(features_for(3))
        assert all(v.shape[0] == 3 for v in state.values())
        # a search reorders and expands rows generically
        idx = torch.tensor([2, 2, 0, 1])
        picked = {k: v.index_select(0, idx) for k, v in state.items()}
        logprobs, new_state, _ = model.step(torch.full((4,), START_ID), picked)
        alone, _, _ = model.step(torch.full((3,), START_ID), state)
    assert logprobs.shape == (4, V)
    assert all(v.shape[0] == 4 for v in new_state.values())
    torch.testing.assert_close(logprobs, alone[idx])
    torch.testing.assert_close(logprobs.exp().sum(-1), torch.ones(4))


def test_bad_inputs_are_clear_errors(models: dict[str, Captioner]) -> None:
    model = models["fc"]
    captions, lengths = random_captions(2, 1, 5)
    with pytest.raises(ValueError, match="images but captions"):
        model(features_for(3), captions, lengths)
    with pytest.raises(ValueError, match=r"captions \(B, S, L\)"):
        model(features_for(2), captions[:, 0], lengths)


def test_decoders_take_plain_numbers() -> None:
    assert ShowAttendTell(V, 16, 8, 12, 10, 0.0).decode_step.input_size == 8 + 16
    assert FCDecoder(V, 16, 8, 12, 0.0).core.i2h.out_features == 5 * 12
    assert ShowTell(V, 16, 8, 12, 0.0).lstm.hidden_size == 12


# --------------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------------


def check_generation(gen: Generation, B: int, K: int, max_len: int, attention: bool) -> None:
    T = gen.tokens.shape[2]
    assert gen.tokens.shape == (B, K, T) and max_len >= T
    assert gen.tokens.dtype == torch.long
    assert gen.scores.shape == (B, K) and gen.lengths.shape == (B, K)
    assert not ((gen.tokens == START_ID).any())
    for b in range(B):
        for k in range(K):
            row, n = gen.tokens[b, k].tolist(), int(gen.lengths[b, k])
            ends = [i for i, tok in enumerate(row) if tok == END_ID]
            assert n == (ends[0] + 1 if ends else T)  # <end> counted
            assert PAD_ID not in row[:n] and all(tok == PAD_ID for tok in row[n:])
    assert torch.equal(gen.mask, torch.arange(T) < gen.lengths.unsqueeze(-1))
    if attention:
        assert gen.alphas is not None and gen.alphas.shape == (B, K, T, P)
    else:
        assert gen.alphas is None


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_and_sample_shapes(models: dict[str, Captioner], arch: str) -> None:
    model = models[arch]
    attention = arch == "show_attend_tell"
    with torch.no_grad():
        greedy = model.generate(features_for(3), method="greedy", max_len=6)
        sampled = model.generate(features_for(3), method="sample", num_samples=4, max_len=6)
    check_generation(greedy, 3, 1, 6, attention)
    check_generation(sampled, 3, 4, 6, attention)
    assert sampled.token_logprobs is not None
    torch.testing.assert_close(sampled.scores, sampled.token_logprobs.sum(-1))


def test_sampling_is_reproducible_and_top_1_is_greedy(models: dict[str, Captioner]) -> None:
    model = models["show_attend_tell"]
    features = features_for(4)

    def sample(seed: int, num_samples: int = 1, top_k: int = 0, temperature: float = 1.0) -> Generation:
        with torch.no_grad():
            return model.generate(
                features,
                method="sample",
                max_len=8,
                num_samples=num_samples,
                top_k=top_k,
                temperature=temperature,
                generator=torch.Generator().manual_seed(seed),
            )

    first, again, other = sample(0, num_samples=3), sample(0, num_samples=3), sample(1, num_samples=3)
    assert torch.equal(first.tokens, again.tokens)
    assert not torch.equal(first.tokens, other.tokens)
    with torch.no_grad():
        greedy = model.generate(features, method="greedy", max_len=8)
    top1 = sample(5, top_k=1, temperature=0.7)
    assert torch.equal(top1.tokens, greedy.tokens)
    torch.testing.assert_close(top1.scores, greedy.scores)


@pytest.mark.parametrize("never_ends", [False, True])
@pytest.mark.parametrize("method", ["greedy", "sample"])
def test_stepwise_decoding_does_not_depend_on_sync_every(
    method: Method, never_ends: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(0)
    model = build_captioner(tiny_config(), V).eval()  # its greedy captions never end by themselves
    K, max_len = (2 if method == "sample" else 1), 12
    # Decoding row r (of 8) says <end> at step ends[r] at the latest: captions end at different
    # steps, the last at step 7 (decoding stops early; sync_every 2 and 4 run 8 steps, 7 breaks at
    # once), or row 1 can never say <end> (all 12 steps).
    ends = torch.tensor([3, 7, 5, 2, 6, 4, 7, 1])  # (N,)
    if never_ends:
        ends[1] = 0  # no step 0: not forced, and its <end> is banned below
    step, t = model.step, 0

    def step_with_ends(tokens: torch.Tensor, state: DecodeState) -> tuple[Any, ...]:
        nonlocal t
        t += 1
        logprobs, state, alpha = step(tokens, state)  # (N, V)
        only_end = torch.full_like(logprobs, -torch.inf).index_fill(1, torch.tensor([END_ID]), 0.0)
        logprobs = torch.where((ends == t).unsqueeze(1), only_end, logprobs)
        if never_ends:
            logprobs[1, END_ID] = -torch.inf
        return logprobs, state, alpha

    monkeypatch.setattr(model, "step", step_with_ends)
    results = []
    for sync_every in (1, 2, 4, 7):
        t, generator = 0, torch.Generator().manual_seed(0)
        with torch.no_grad():
            gen = model.generate(
                features_for(8 // K), method=method, num_samples=K, max_len=max_len, sync_every=sync_every,
                generator=generator,
            )  # fmt: skip
        results.append(gen)
    first = results[0]
    steps = first.tokens.shape[2]  # T
    assert len(set(first.lengths.flatten().tolist())) >= 3
    assert steps == int(first.lengths.max()) and (steps == max_len) == never_ends
    if method == "greedy":
        assert steps == (max_len if never_ends else 7)
    # Same shapes and values; sampling with the same seed draws the same captions, its extra steps'
    # draws come after theirs.
    for result in results[1:]:
        for name in ("tokens", "scores", "lengths", "alphas", "token_logprobs"):
            assert torch.equal(getattr(result, name), getattr(first, name)), name


@pytest.mark.parametrize("arch", ARCHS)
def test_sample_logprobs_have_grad_and_match_teacher_forcing(models: dict[str, Captioner], arch: str) -> None:
    model = models[arch]
    features = features_for(2)
    gen = model.generate(
        features, method="sample", num_samples=3, max_len=7, generator=torch.Generator().manual_seed(3)
    )
    assert gen.token_logprobs is not None and gen.token_logprobs.requires_grad
    (-(gen.token_logprobs * gen.mask).sum()).backward()
    assert model.decoder.fc.weight.grad is not None
    model.zero_grad(set_to_none=True)
    # teacher-force the sampled captions: <start> + tokens, lengths with <start> counted
    B, K, _ = gen.tokens.shape
    captions = torch.cat([torch.full((B, K, 1), START_ID), gen.tokens], dim=2)  # (B, K, T+1)
    with torch.no_grad():
        logprobs = F.log_softmax(model(features, captions, gen.lengths + 1).logits, dim=-1)  # (B, K, T, V)
    expected = logprobs.gather(3, gen.tokens.unsqueeze(-1)).squeeze(-1) * gen.mask
    torch.testing.assert_close(gen.token_logprobs.detach(), expected, atol=1e-5, rtol=1e-5)


def test_generate_rejects_bad_options(models: dict[str, Captioner]) -> None:
    model = models["fc"]
    for kwargs, match in [
        ({"method": "nucleus"}, "unknown decoding method"),
        ({"method": "greedy", "num_samples": 2}, "num_samples"),
        ({"method": "sample", "temperature": 0.0}, "temperature"),
        ({"method": "sample", "top_k": -1}, "top_k"),
        ({"max_len": 0}, "max_len"),
        ({"method": "sample", "sync_every": 0}, "sync_every"),
        ({"method": "beam", "sync_every": 0}, "sync_every"),
    ]:
        with pytest.raises(ValueError, match=match):
            model.generate(features_for(1), **kwargs)  # type: ignore[arg-type]


def test_beam_gives_the_best_caption_of_the_search(models: dict[str, Captioner]) -> None:
    search = pytest.importorskip("captioning.model.search")
    model = models["show_attend_tell"]
    features = features_for(3)
    gen = model.generate(features, method="beam", beam_size=2, max_len=5)
    result = search.beam_search(model, features, beam_size=2, max_len=5)
    check_generation(gen, 3, 1, 5, attention=True)
    assert torch.equal(gen.tokens[:, 0], result.tokens)
    assert torch.equal(gen.lengths[:, 0], result.lengths)
    torch.testing.assert_close(gen.scores[:, 0], result.scores)


# --------------------------------------------------------------------------------------------------
# GloVe
# --------------------------------------------------------------------------------------------------

WORDS = ("<pad>", "<start>", "<end>", "<unk>", "a", "dog", "runs", "zebra")


def write_glove(path: Path, dim: int = 8) -> dict[str, list[float]]:
    rows = {
        w: [round(0.1 * i + 0.01 * j, 3) for j in range(dim)]
        for i, w in enumerate(("the", "dog", "a", "runs"))
    }
    rows["dog"] = [9.0] * dim  # a later duplicate must not win
    lines = [f"{w} {' '.join(map(str, v))}" for w, v in rows.items()]
    lines.append("dog " + " ".join(["-1.0"] * dim))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return rows


def test_glove_rows_equal_the_file_and_missing_words_are_counted(tmp_path: Path) -> None:
    rows = write_glove(tmp_path / "glove.txt")
    emb = load_glove(str(tmp_path / "glove.txt"), WORDS, dim=8)
    assert emb.found.tolist() == [w in rows for w in WORDS]
    assert emb.missing == ("<pad>", "<start>", "<end>", "<unk>", "zebra")
    assert emb.num_found == 3 and emb.num_missing == 5
    for i, word in enumerate(WORDS):
        if word in rows:
            assert emb.vectors[i].tolist() == pytest.approx(rows[word])


def test_glove_dimension_mismatch_is_a_clear_error(tmp_path: Path) -> None:
    write_glove(tmp_path / "glove.txt", dim=8)
    with pytest.raises(ValueError, match=r"dimension 8, but model\.emb_dim is 6"):
        load_glove(str(tmp_path / "glove.txt"), WORDS, dim=6)


@pytest.mark.parametrize("fine_tune", [True, False])
def test_pretrained_embeddings_frozen_or_fine_tuned(tmp_path: Path, fine_tune: bool) -> None:
    rows = write_glove(tmp_path / "glove.txt")
    cfg = tiny_config("fc", embeddings_path=str(tmp_path / "glove.txt"), fine_tune_embeddings=fine_tune)
    with pytest.raises(ValueError, match="build_embeddings"):
        build_captioner(cfg, len(WORDS))  # the path is set but no vectors were passed
    torch.manual_seed(0)
    random_init = build_captioner(tiny_config("fc"), len(WORDS)).decoder.embedding.weight.detach()
    torch.manual_seed(0)
    model = build_captioner(cfg, len(WORDS), embeddings=build_embeddings(cfg, WORDS))
    weight = model.decoder.embedding.weight
    assert weight.requires_grad is fine_tune
    for i, word in enumerate(WORDS):
        if word in rows:
            assert weight[i].tolist() == pytest.approx(rows[word])
        else:  # kept its random init
            assert torch.equal(weight[i], random_init[i])
