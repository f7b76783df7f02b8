"""Reward, advantage and loss on hand-computed numbers."""

from __future__ import annotations

import math

import pytest
import torch

from fastlatent.engine.grpo import (
    grpo_advantages,
    grpo_loss,
    latent_grpo_loss,
    negative_perplexity,
)
from fastlatent.testing.naive_steps import naive_grpo


def test_ppl_reward_is_minus_exp_mean_nll_over_masked_tokens():
    logp = torch.tensor([[[-1.0, -3.0, -99.0], [-2.0, -2.0, -99.0]]])  # [1, 2, 3]
    mask = torch.tensor([[1, 1, 0]])
    rewards = negative_perplexity(logp, mask[:, None, :])
    torch.testing.assert_close(rewards, torch.tensor([[-math.exp(2.0), -math.exp(2.0)]]))


def test_batch_advantage_hand_computed():
    s = torch.tensor([[-2.0, -1.0], [-4.0, -3.0]])
    # baseline = mean(s^0) = -3; centred = [[1, 2], [-1, 0]]; norm = sqrt(6)
    expected = torch.tensor([[1.0, 2.0], [-1.0, 0.0]]) / (math.sqrt(6.0) + 1e-6)
    torch.testing.assert_close(grpo_advantages(s, pool="batch"), expected)


def test_group_advantage_hand_computed():
    s = torch.tensor([[-2.0, -1.0, -4.0], [-5.0, -5.0, -5.0]])
    # group 0: mean -7/3 -> centred [1/3, 4/3, -5/3]; unbiased var (1+16+25)/9/2 = 7/3
    # group 1: all equal -> centred 0, std 0 -> 0 / (0 + 1e-4) = 0
    std0 = math.sqrt(7.0 / 3.0)
    expected = torch.tensor([[1 / 3, 4 / 3, -5 / 3], [0.0, 0.0, 0.0]])
    expected[0] /= std0 + 1e-4
    torch.testing.assert_close(grpo_advantages(s, pool="group"), expected)
    # r^0 gets a non-zero advantage (it is not the baseline) and each group sums to zero
    adv = grpo_advantages(s, pool="group")
    assert float(adv[0, 0]) != 0.0
    torch.testing.assert_close(adv.sum(1), torch.zeros(2), atol=1e-5, rtol=0)


def test_group_advantage_needs_two_rows_per_prompt():
    with pytest.raises(ValueError, match="K >= 2"):
        grpo_advantages(torch.tensor([[-1.0], [-2.0]]), pool="group")


def test_loss_value_and_gradient_hand_computed():
    logp = torch.tensor([[[-1.0, -3.0], [-2.0, -4.0]]], requires_grad=True)  # B=1,K=2,T=2
    mask = torch.tensor([[1, 0]])
    rewards = torch.tensor([[-1.0, -3.0]])
    loss, adv = latent_grpo_loss(logp, mask, rewards)
    # baseline -1 -> centred [0, -2], norm 2 -> A = [0, -1]
    torch.testing.assert_close(adv, torch.tensor([[0.0, -2.0 / (2.0 + 1e-6)]]))
    # loss = -(1/2) * (0 * -1 + A1 * -2) = A1
    torch.testing.assert_close(loss, adv[0, 1])
    (grad,) = torch.autograd.grad(loss, logp)
    expected = torch.zeros(1, 2, 2)
    expected[0, 1, 0] = -adv[0, 1] / 2  # d/dlogp of -(1/BK) A * mean_t logp, mask 1 token
    torch.testing.assert_close(grad, expected)


def test_advantages_carry_no_gradient_and_bad_shapes():
    logp = torch.randn(2, 3, 4, requires_grad=True)
    rewards = torch.randn(2, 3, requires_grad=True)
    _, adv = latent_grpo_loss(logp, torch.ones(2, 4), rewards)
    assert not adv.requires_grad
    with pytest.raises(ValueError, match="rewards"):
        latent_grpo_loss(logp, torch.ones(2, 4), torch.randn(3, 2))
    with pytest.raises(ValueError, match="target_mask"):
        latent_grpo_loss(logp, torch.ones(2, 5), rewards)
    with pytest.raises(ValueError, match="pool"):
        grpo_advantages(rewards, pool="prompt")
    with pytest.raises(ValueError, match="at least one scored token"):
        latent_grpo_loss(logp, torch.tensor([[1, 1, 1, 1], [0, 0, 0, 0]]), rewards)


@pytest.mark.parametrize("pool", ["batch", "group"])
@pytest.mark.parametrize("shape", [(1, 2, 3), (3, 4, 5), (5, 3, 7)],
                         ids=lambda s: "B{}-K{}-T{}".format(*s))
def test_runtime_arithmetic_matches_the_loop_oracle(shape, pool):
    """Rewards, advantages, loss and its gradient of the runtime's vectorised Eq. 7-8
    against fastlatent.testing's per-row loops, on random log-probs with ragged masks."""
    b, k, t = shape
    g = torch.Generator().manual_seed(b * 100 + k * 10 + t)
    logp = (-3 * torch.rand(b, k, t, generator=g)).requires_grad_(True)
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    mask = (torch.arange(t)[None] < lengths[:, None]).long()
    rewards = negative_perplexity(logp.detach(), mask[:, None, :])
    advantages = grpo_advantages(rewards, pool=pool)
    loss = grpo_loss(logp, mask, advantages)
    ref_loss, ref_rewards, ref_adv = naive_grpo(logp, mask, pool=pool)
    torch.testing.assert_close(rewards, ref_rewards, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(advantages, ref_adv, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    (got,) = torch.autograd.grad(loss, logp)
    (want,) = torch.autograd.grad(ref_loss, logp)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
