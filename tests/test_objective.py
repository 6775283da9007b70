"""Stage 1-2 loss (seed 004), scheduled sampling, optimiser groups and learning-rate schedules, training state."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_model import V, random_captions, tiny_config

from captioning.model import build_captioner
from captioning.model.decoders import CaptionOutput
from captioning.training.objective import CaptionObjective, XeForward, scheduled_sampling_forward, token_mask
from captioning.training.optim import LrSchedule, build_optimizer, group_lrs
from captioning.training.state import TrainState, capture_rng, restore_rng

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def seed004_loss(
    out: CaptionOutput, captions: torch.Tensor, lengths: torch.Tensor, alpha_c: float
) -> torch.Tensor:
    """Seed 004's computation, caption by caption: mean CE over every real token + alpha_c * attention term."""
    B, S = out.logits.shape[:2]
    ces, regs = [], []
    for b in range(B):
        for s in range(S):
            n = int(lengths[b, s]) - 1  # predicted tokens: everything after <start>, <end> included
            ces.append(F.cross_entropy(out.logits[b, s, :n], captions[b, s, 1 : n + 1], reduction="none"))
            if out.alphas is not None:
                regs.append(((1.0 - out.alphas[b, s].sum(dim=0)) ** 2).mean())
    loss = torch.cat(ces).mean()
    if regs:
        loss = loss + alpha_c * torch.stack(regs).mean()
    return loss


def random_output(
    B: int, S: int, L: int, P: int = 4, seed: int = 0
) -> tuple[CaptionOutput, torch.Tensor, torch.Tensor]:
    captions, lengths = random_captions(B, S, L, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    T = L - 1
    logits = torch.randn(B, S, T, V, generator=g)
    alphas = torch.softmax(torch.randn(B, S, T, P, generator=g), dim=-1)
    mask = token_mask(lengths, T)
    logits = logits * mask.unsqueeze(-1)  # zero past the end, as the decoders return them
    alphas = alphas * mask.unsqueeze(-1)
    return CaptionOutput(logits=logits, alphas=alphas), captions, lengths


@pytest.mark.parametrize("alpha_c", [0.0, 1.0, 2.5])
def test_loss_equals_seed004_caption_by_caption(alpha_c: float) -> None:
    out, captions, lengths = random_output(5, 3, 9)
    parts = CaptionObjective(alpha_c)(out, captions, lengths, torch.zeros(5, dtype=torch.bool))
    torch.testing.assert_close(parts.loss, seed004_loss(out, captions, lengths, alpha_c))
    assert parts.num_tokens == int((lengths - 1).sum())


def test_padding_rows_weigh_nothing() -> None:
    out, captions, lengths = random_output(6, 2, 7, seed=3)
    is_pad = torch.tensor([False, False, True, False, True, True])
    parts = CaptionObjective(1.0)(out, captions, lengths, is_pad)
    keep = ~is_pad
    real = CaptionOutput(logits=out.logits[keep], alphas=out.alphas[keep] if out.alphas is not None else None)
    torch.testing.assert_close(parts.loss, seed004_loss(real, captions[keep], lengths[keep], 1.0))


def test_all_padding_gives_zero_loss_with_a_graph() -> None:
    out, captions, lengths = random_output(2, 1, 5)
    logits = out.logits.clone().requires_grad_(True)
    parts = CaptionObjective(1.0)(
        CaptionOutput(logits, out.alphas), captions, lengths, torch.ones(2, dtype=torch.bool)
    )
    assert float(parts.loss.detach()) == 0.0 and parts.num_tokens == 0
    parts.loss.backward()
    assert logits.grad is not None and float(logits.grad.abs().sum()) == 0.0


def test_loss_without_attention_is_pure_cross_entropy() -> None:
    out, captions, lengths = random_output(3, 2, 6)
    plain = CaptionOutput(out.logits, None)
    parts = CaptionObjective(1.0)(plain, captions, lengths, torch.zeros(3, dtype=torch.bool))
    torch.testing.assert_close(parts.loss, seed004_loss(plain, captions, lengths, 0.0))
    assert parts.attention == 0.0


def test_scheduled_sampling_at_zero_is_teacher_forcing() -> None:
    torch.manual_seed(0)
    model = build_captioner(tiny_config(), V).eval()
    captions, lengths = random_captions(3, 2, 7)
    features = torch.randn(3, 4, 512)
    with torch.no_grad():
        forced = model(features, captions, lengths)
        stepped = scheduled_sampling_forward(model, features, captions, lengths, 0.0, None)
    mask = token_mask(lengths, 6).unsqueeze(-1)
    torch.testing.assert_close(
        stepped.logits * mask, F.log_softmax(forced.logits, dim=-1) * mask, atol=1e-5, rtol=1e-5
    )
    assert forced.alphas is not None and stepped.alphas is not None
    torch.testing.assert_close(stepped.alphas, forced.alphas, atol=1e-6, rtol=1e-5)


def test_scheduled_sampling_feeds_own_tokens_reproducibly() -> None:
    torch.manual_seed(0)
    model = build_captioner(tiny_config(), V).eval()
    captions, lengths = random_captions(4, 2, 8)
    features = torch.randn(4, 4, 512)
    with torch.no_grad():
        a = scheduled_sampling_forward(
            model, features, captions, lengths, 1.0, torch.Generator().manual_seed(1)
        )
        b = scheduled_sampling_forward(
            model, features, captions, lengths, 1.0, torch.Generator().manual_seed(1)
        )
        forced = scheduled_sampling_forward(model, features, captions, lengths, 0.0, None)
    torch.testing.assert_close(a.logits, b.logits)
    assert not torch.allclose(a.logits[:, :, 1:], forced.logits[:, :, 1:])
    torch.testing.assert_close(a.logits[:, :, 0], forced.logits[:, :, 0])  # step 0 always reads <start>


def test_frozen_encoder_gets_no_gradient_and_no_graph() -> None:
    torch.manual_seed(0)
    model = build_captioner(tiny_config(), V)
    model.encoder.set_fine_tuning(False)
    forward = XeForward(model, train_encoder=False)
    captions, lengths = random_captions(2, 3, 6)
    out = forward(torch.randn(2, 3, 64, 64), captions, lengths)
    CaptionObjective(1.0)(out, captions, lengths, torch.zeros(2, dtype=torch.bool)).loss.backward()
    assert all(p.grad is None for p in model.encoder.parameters())
    assert all(p.grad is not None for p in model.decoder.parameters() if p.requires_grad)


def test_fine_tuning_trains_the_chosen_blocks_with_their_own_rate() -> None:
    model = build_captioner(tiny_config(), V)
    model.encoder.set_fine_tuning(True, 3)
    opt = build_optimizer(model, lr_decoder=4e-4, lr_encoder=1e-4, train_encoder=True)
    assert group_lrs(opt) == {"lr_decoder": 4e-4, "lr_encoder": 1e-4}
    encoder_ids = {id(p) for p in opt.param_groups[1]["params"]}
    trainable = {
        id(p)
        for n, p in model.encoder.named_parameters()
        if n.startswith(("backbone.layer3", "backbone.layer4"))
    }
    assert encoder_ids == trainable
    with pytest.raises(ValueError, match="no encoder parameter"):
        model.encoder.set_fine_tuning(False)
        build_optimizer(model, lr_decoder=1e-3, lr_encoder=1e-4, train_encoder=True)


def _opt(lr: float = 1.0) -> torch.optim.Optimizer:
    return torch.optim.Adam([{"name": "decoder", "params": [torch.nn.Parameter(torch.zeros(1))], "lr": lr}])


def test_plateau_decays_every_patience_epochs_without_improvement() -> None:
    opt = _opt()
    schedule = LrSchedule(opt, kind="plateau", total_steps=10, decay_factor=0.8, decay_patience=3)
    decays = [schedule.step_epoch(n) for n in [0, 1, 2, 3, 4, 5, 6, 0, 3]]
    assert decays == [False, False, False, True, False, False, True, False, True]
    assert opt.param_groups[0]["lr"] == pytest.approx(0.8**3)


def test_cosine_anneals_to_zero_and_state_round_trips() -> None:
    opt = _opt(2.0)
    schedule = LrSchedule(opt, kind="cosine", total_steps=4, decay_factor=0.8, decay_patience=8)
    lrs = []
    for _ in range(4):
        schedule.step_batch()
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs == pytest.approx([2.0 * 0.5 * (1 + np.cos(np.pi * k / 4)) for k in (1, 2, 3, 4)])
    other = LrSchedule(_opt(2.0), kind="cosine", total_steps=4, decay_factor=0.8, decay_patience=8)
    other.load_state_dict(schedule.state_dict())
    assert other.optimizer.param_groups[0]["lr"] == pytest.approx(0.0)
    with pytest.raises(ValueError, match="schedule"):
        LrSchedule(_opt(), kind="plateau", total_steps=4, decay_factor=0.8, decay_patience=8).load_state_dict(
            schedule.state_dict()
        )


def test_train_state_tracks_the_best_epoch() -> None:
    state = TrainState(stage="xe")
    for epoch, score in enumerate([0.5, 0.7, 0.6, 0.7, 0.9]):
        state.epoch = epoch
        state.improved(score)
    assert (state.best_score, state.best_epoch, state.epochs_since_improvement) == (0.9, 4, 0)
    state.epoch = 5
    state.improved(0.1)
    assert state.epochs_since_improvement == 1
    restored = TrainState(stage="xe")
    restored.load_state_dict(state.state_dict())
    assert restored == state
    with pytest.raises(ValueError, match="stage"):
        TrainState(stage="scst").load_state_dict(state.state_dict())


def test_rng_states_round_trip_through_a_weights_only_checkpoint() -> None:
    gen = torch.Generator().manual_seed(3)
    saved = capture_rng(gen)
    buffer = io.BytesIO()
    torch.save({"rng": saved}, buffer)
    loaded = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)["rng"]
    first = (random.random(), np.random.rand(), torch.rand(2), torch.rand(2, generator=gen))
    random.seed(99), np.random.seed(99), torch.manual_seed(99), gen.manual_seed(99)
    restore_rng(loaded, gen)
    again = (random.random(), np.random.rand(), torch.rand(2), torch.rand(2, generator=gen))
    assert first[:2] == again[:2]
    torch.testing.assert_close(first[2], again[2])
    torch.testing.assert_close(first[3], again[3])
