"""The naive training-step oracles: the generic full-sequence steps of the runtime (full
sequences, no reused prompt cache) under their oracle names, and the latent GRPO
arithmetic of LATENTR3.md Eq. 7-8 written out again, apart from
``fastlatent.engine.grpo``, so that the runtime's is checked against an independent
reading of the paper."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastlatent.data.batch import Batch
from fastlatent.engine.generic import generic_rl_step
from fastlatent.engine.generic import generic_sft_step as naive_sft_step
from fastlatent.engine.grpo import grpo_advantages, grpo_loss
from fastlatent.engine.scoring import target_logprobs_from_logits
from fastlatent.engine.steps import RLStepOutput
from fastlatent.model.reasoner import LatentReasoner

__all__ = ["NaiveRLOutput", "loss_of_one_pool", "naive_grpo", "naive_rl_step",
           "naive_sft_step", "target_logprobs_from_logits"]


@dataclass
class NaiveRLOutput:
    loss: torch.Tensor  # scalar, with gradient
    rewards: torch.Tensor  # [B, K]
    advantages: torch.Tensor  # [B, K]
    token_logprobs: torch.Tensor  # [B, K, T] with gradient, 0 at padding


def naive_grpo(token_logprobs: torch.Tensor, target_mask: torch.Tensor, *,
               pool: str = "batch", eps: float | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, rewards, advantages) from token log-probs [B, K, T] and the target mask
    [B, T] (or [B, K, T]), one prompt and row at a time:

    s_bk = -exp(-(1/|y_b|) sum_t log pi(y_t));
    batch pool (Eq. 7): A = (s - mean_b s_b0) / (sqrt(sum_bk (s_bk - mean_b s_b0)^2) + 1e-6);
    group pool: A_bk = (s_bk - mean_k s_bk) / (unbiased std_k s_bk + 1e-4);
    loss (Eq. 8, ratio 1) = -(1/(B*K)) sum_bk A_bk (1/|y_b|) sum_t log pi(y_t).
    """
    b, k, _ = token_logprobs.shape
    mask = target_mask if target_mask.dim() == 3 else target_mask[:, None, :].expand(b, k, -1)
    mean_logp = [[None] * k for _ in range(b)]
    rewards = torch.zeros(b, k)
    for i in range(b):
        for j in range(k):
            real = mask[i, j].bool()
            mean_logp[i][j] = token_logprobs[i, j][real].float().sum() / int(real.sum())
            rewards[i, j] = -torch.exp(-mean_logp[i][j].detach())
    advantages = torch.zeros(b, k)
    if pool == "batch":
        base = sum(float(rewards[i, 0]) for i in range(b)) / b
        norm = sum((float(rewards[i, j]) - base) ** 2 for i in range(b) for j in range(k))
        for i in range(b):
            for j in range(k):
                advantages[i, j] = (float(rewards[i, j]) - base) / (
                    norm ** 0.5 + (1e-6 if eps is None else eps))
    else:
        for i in range(b):
            mean = sum(float(rewards[i, j]) for j in range(k)) / k
            std = (sum((float(rewards[i, j]) - mean) ** 2 for j in range(k)) / (k - 1)) ** 0.5
            for j in range(k):
                advantages[i, j] = (float(rewards[i, j]) - mean) / (
                    std + (1e-4 if eps is None else eps))
    loss = -sum(float(advantages[i, j]) * mean_logp[i][j]
                for i in range(b) for j in range(k)) / (b * k)
    return loss, rewards.to(token_logprobs.device), advantages.to(token_logprobs.device)


def naive_rl_step(reasoner: LatentReasoner, batch: Batch, *, noise: torch.Tensor,
                  sigma: float, pool: str = "batch", eps: float | None = None
                  ) -> NaiveRLOutput:
    """The latent GRPO loss of one batch as one pool: the generic step's full-sequence
    token log-probs, then :func:`naive_grpo`."""
    out = generic_rl_step(reasoner, batch, noise=noise, sigma=sigma)
    loss, rewards, advantages = naive_grpo(out.token_logprobs, batch.target_mask, pool=pool,
                                           eps=eps)
    return NaiveRLOutput(loss, rewards, advantages, out.token_logprobs)


def loss_of_one_pool(out: RLStepOutput, pool: str = "batch"
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, advantages) the trainer builds from one step's output when its rows are the
    whole pool (one process, one micro-batch): the runtime's own arithmetic, for tests of
    a step against an oracle."""
    advantages = grpo_advantages(out.rewards, pool=pool)
    return grpo_loss(out.token_logprobs, out.mask, advantages), advantages
