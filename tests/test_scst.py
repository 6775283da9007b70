"""Stage 3 pieces: the new-SCST baseline, the policy loss, the CIDEr-D reward and the greedy baseline."""

from __future__ import annotations

import pytest
import torch
from test_cider import count_sequences
from test_model import V, tiny_config

from captioning.data.vocab import END_ID, PAD_ID
from captioning.evaluation.cider import CiderD
from captioning.model import build_captioner
from captioning.training.scst import (
    CiderReward,
    ScstForward,
    caption_ids,
    greedy_baseline,
    mean_of_others,
    scst_loss,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_mean_of_others_by_hand() -> None:
    rewards = torch.tensor([[1.0, 2.0, 3.0, 6.0], [0.0, 0.0, 4.0, 0.0]])
    expected = torch.tensor([[11 / 3, 10 / 3, 9 / 3, 6 / 3], [4 / 3, 4 / 3, 0.0, 4 / 3]])
    torch.testing.assert_close(mean_of_others(rewards), expected)
    # The advantages of an image sum to zero scaled by K/(K-1): r - mean_others = K/(K-1) * (r - mean).
    advantage = rewards - mean_of_others(rewards)
    torch.testing.assert_close(advantage, 4 / 3 * (rewards - rewards.mean(dim=1, keepdim=True)))
    with pytest.raises(ValueError, match="at least 2"):
        mean_of_others(torch.ones(3, 1))


def test_policy_loss_counts_end_and_ignores_padding() -> None:
    logp = torch.tensor([[[-1.0, -2.0, -3.0], [-0.5, -0.5, -9.0]], [[-7.0, -7.0, -7.0], [-7.0, -7.0, -7.0]]])
    logp.requires_grad_(True)
    lengths = torch.tensor([[3, 2], [1, 1]])  # <end> is the last counted token
    mask = torch.arange(3) < lengths.unsqueeze(-1)
    advantage = torch.tensor([[2.0, -1.0], [5.0, 5.0]])
    is_pad = torch.tensor([False, True])
    loss = scst_loss(logp, mask, advantage, is_pad)
    expected = -(2.0 * (-1 - 2 - 3) + -1.0 * (-0.5 - 0.5)) / 5
    assert float(loss.detach()) == pytest.approx(expected)
    loss.backward()
    assert logp.grad is not None
    assert float(logp.grad[1].abs().sum()) == 0.0  # padding image
    assert float(logp.grad[0, 1, 2]) == 0.0  # past the end
    assert float(logp.grad[0, 1, 1]) == pytest.approx(1.0 / 5)  # <end> itself carries the advantage


def test_caption_ids_strip_end_and_padding() -> None:
    tokens = torch.tensor([[5, 6, END_ID, PAD_ID], [7, 8, 9, 10]])
    assert caption_ids(tokens, torch.tensor([3, 4])) == [[5, 6], [7, 8, 9, 10]]


def test_reward_is_cider_d_with_training_document_frequencies() -> None:
    corpus = {1: [[5, 6, 7], [5, 6, 8]], 2: [[9, 10, 11], [9, 12]], 3: [[5, 9, 13, 14]]}
    reward = CiderReward(corpus)
    tokens = torch.tensor(
        [[[5, 6, 7, END_ID], [9, 10, END_ID, PAD_ID]], [[9, 12, END_ID, PAD_ID], [5, END_ID, PAD_ID, PAD_ID]]]
    )
    lengths = torch.tensor([[4, 3], [3, 2]])
    got = reward(tokens, lengths, torch.tensor([1, 2]))
    scorer = CiderD(list(corpus.values()))
    expected = scorer.score([[5, 6, 7], [9, 10], [9, 12], [5]], [corpus[1], corpus[1], corpus[2], corpus[2]])
    torch.testing.assert_close(got, torch.as_tensor(expected, dtype=torch.float32).view(2, 2))
    assert got[0, 0] > got[0, 1] and got[1, 0] > got[1, 1]  # the caption of the image beats the others
    with pytest.raises(KeyError, match="no training references"):
        reward(tokens, lengths, torch.tensor([1, 99]))
    with pytest.raises(ValueError, match="empty"):
        CiderReward({})


def test_reward_prepares_every_corpus_image(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every training image's references are vectorised once, at construction: a reward call
    counts its samples only, and caches nothing."""
    corpus = {i: [[4 + i % 7, 5, 6 + i % 3], [7, 8 + i % 5]] for i in range(50)}
    reward = CiderReward(corpus)
    size = reward.cider.prepared_size
    assert size.sets == 50 and size.entries > 0 and size.nbytes > 0
    counted = count_sequences(reward.cider, monkeypatch)
    tokens = torch.tensor([[[4, 5, END_ID], [7, 8, END_ID]], [[5, 6, END_ID], [9, END_ID, PAD_ID]]])
    lengths = torch.tensor([[3, 3], [3, 2]])
    got = reward(tokens, lengths, torch.tensor([0, 49]))
    assert counted == [4] and not reward.cider._cache  # the 4 samples; no reference vectorised
    expected = CiderD(list(corpus.values())).score(
        [[4, 5], [7, 8], [5, 6], [9]], [corpus[0], corpus[0], corpus[49], corpus[49]]
    )
    torch.testing.assert_close(got, torch.as_tensor(expected, dtype=torch.float32).view(2, 2))


def test_reward_describes_its_memory_and_coco_estimate() -> None:
    reward = CiderReward({i: [[4, 5, 6, 7 + i], [8, 9, 10]] for i in range(20)})
    line = reward.describe()
    assert "\n" not in line and "per process" in line
    assert "20 training images" in line and "MiB" in line
    assert "113,287 images x 5 references of ~10.5 words" in line


def test_sampling_forward_gives_log_prob_gradients_and_greedy_baseline_none() -> None:
    torch.manual_seed(0)
    model = build_captioner(tiny_config(), V).train()
    forward = ScstForward(model, train_encoder=False)
    gen, features = forward(torch.randn(3, 3, 64, 64), 4, 6, 1.0, torch.Generator().manual_seed(0))
    assert gen.tokens.shape[:2] == (3, 4) and gen.token_logprobs is not None
    assert gen.token_logprobs.requires_grad and not features.requires_grad
    corpus = {i: [[4, 5, 6], [7, 8]] for i in range(3)}
    baseline = greedy_baseline(model, features, CiderReward(corpus), torch.arange(3), max_len=6)
    assert baseline.shape == (3, 1) and not baseline.requires_grad
    assert model.training and model.decoder.training  # the baseline restores training mode
