"""Latent GRPO arithmetic: perplexity reward, pooled advantage, loss (LATENTR3.md, Eq. 7-8).

Pure functions on tensors, shared by the naive oracle and every fast path.
"""

from __future__ import annotations

import torch

POOLS = ("batch", "group")


def mean_token_logprob(token_logprobs: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
    """(1/|y|) sum_i log pi(y_i) per row; ``target_mask`` broadcasts over leading dims."""
    mask = target_mask.to(token_logprobs.dtype).expand_as(token_logprobs)
    counts = mask.sum(-1)
    if bool((counts == 0).any()):
        raise ValueError("every target needs at least one scored token (mask row is all zero)")
    return (token_logprobs * mask).sum(-1) / counts


def perplexity_reward(token_logprobs: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
    """s = -exp(-(1/|y|) sum_i log pi(y_i)) = -PPL, in float32 (differentiable)."""
    return -torch.exp(-mean_token_logprob(token_logprobs.float(), target_mask))


def ppl_rewards(token_logprobs: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
    """:func:`perplexity_reward` without gradient (the GRPO reward is a constant)."""
    with torch.no_grad():
        return perplexity_reward(token_logprobs, target_mask)


def grpo_advantages(rewards: torch.Tensor, *, pool: str = "batch",
                    eps: float = 1e-6) -> torch.Tensor:
    """A = (s - mean_pool s^0) / (||S_pool - mean_pool s^0||_2 + eps), rewards [B, K].

    ``pool="batch"``: one pool of all B*K rows (paper Eq. 7; k=0 is in the norm).
    ``pool="group"`` (ablation): each prompt's K rows are their own pool, so the
    baseline is that prompt's s^0.
    """
    if rewards.dim() != 2:
        raise ValueError(f"expected rewards [B, K], got {tuple(rewards.shape)}")
    if pool not in POOLS:
        raise ValueError(f"expected pool in {POOLS}, got {pool!r}")
    rewards = rewards.detach().float()
    if pool == "batch":
        centered = rewards - rewards[:, 0].mean()
        return centered / (centered.norm() + eps)
    centered = rewards - rewards[:, :1]
    return centered / (centered.norm(dim=-1, keepdim=True) + eps)


def latent_grpo_loss(token_logprobs: torch.Tensor, target_mask: torch.Tensor,
                     rewards: torch.Tensor, *, pool: str = "batch",
                     eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """loss = -(1/(B*K)) sum_b sum_k A_bk * mean_t log pi(y_t | x_b, r^k_b).

    token_logprobs [B, K, T] (with gradient), target_mask [B, T], rewards [B, K].
    The importance ratio of Eq. 8 is 1 in value (one update per batch) and is omitted.
    Returns (loss, advantages [B, K]).
    """
    if token_logprobs.dim() != 3 or rewards.shape != token_logprobs.shape[:2]:
        raise ValueError(f"expected token_logprobs [B, K, T] and rewards [B, K], got "
                         f"{tuple(token_logprobs.shape)} and {tuple(rewards.shape)}")
    expected_mask = (token_logprobs.shape[0], token_logprobs.shape[2])
    if tuple(target_mask.shape) != expected_mask:
        raise ValueError(f"expected target_mask [B, T] = {expected_mask}, "
                         f"got {tuple(target_mask.shape)}")
    advantages = grpo_advantages(rewards, pool=pool, eps=eps)
    per_row = mean_token_logprob(token_logprobs.float(), target_mask[:, None, :])
    return -(advantages * per_row).mean(), advantages


def sample_noise(batch: int, k: int, dim: int, *, generator: torch.Generator | None = None,
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """eps [B, K, d] ~ N(0, I) with eps[:, 0] = 0, so row 0 carries r itself. Drawn on the
    CPU generator (reproducible across devices), then moved."""
    eps = torch.randn(batch, k, dim, generator=generator, device="cpu").to(device)
    eps[:, 0] = 0
    return eps
