"""Latent GRPO arithmetic: perplexity reward, pooled advantage, loss (LATENTR3.md, Eq. 7-8).

Pure functions on tensors, shared by the naive oracle and every fast path.
"""

from __future__ import annotations

from collections.abc import Callable

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


BATCH_EPS = 1e-6  # Eq. 7's denominator guard (the release's value)
GROUP_EPS = 1e-4  # GRPO's std guard for the group-relative ablation


def grpo_advantages(rewards: torch.Tensor, *, pool: str = "batch",
                    eps: float | None = None) -> torch.Tensor:
    """Advantages [B, K] from rewards [B, K] (row k = 0 is the noiseless r^0).

    ``pool="batch"`` (paper Eq. 7): A = (s - mean_b s^0) / (||S - mean_b s^0||_2 + eps),
    one pool of all B*K rows, k = 0 included in the norm; eps defaults to 1e-6.
    ``pool="group"`` (the "w/o batch advantage" ablation = GRPO's group-relative
    advantage): A_bk = (s_bk - mean_k s_b) / (std_k s_b + eps), std unbiased over the K
    rows of prompt b; eps defaults to 1e-4; needs K >= 2.
    """
    if rewards.dim() != 2:
        raise ValueError(f"expected rewards [B, K], got {tuple(rewards.shape)}")
    if pool not in POOLS:
        raise ValueError(f"expected pool in {POOLS}, got {pool!r}")
    rewards = rewards.detach().float()
    if pool == "batch":
        centered = rewards - rewards[:, 0].mean()
        return centered / (centered.norm() + (BATCH_EPS if eps is None else eps))
    if rewards.shape[1] < 2:
        raise ValueError(f"the group advantage needs K >= 2 rows per prompt (an unbiased std "
                         f"over one row is undefined), got K = {rewards.shape[1]}")
    centered = rewards - rewards.mean(dim=1, keepdim=True)
    std = rewards.std(dim=1, unbiased=True, keepdim=True)
    return centered / (std + (GROUP_EPS if eps is None else eps))


def latent_grpo_loss(token_logprobs: torch.Tensor, target_mask: torch.Tensor,
                     rewards: torch.Tensor, *, pool: str = "batch",
                     eps: float | None = None, advantages: torch.Tensor | None = None,
                     pool_rewards: Callable[[torch.Tensor], torch.Tensor] | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """loss = -(1/(B*K)) sum_b sum_k A_bk * mean_t log pi(y_t | x_b, r^k_b).

    token_logprobs [B, K, T] (with gradient), target_mask [B, T] (or [B, K, T] when each
    row scores its own tokens, as the exact-match reward's written titles), rewards [B, K].
    ``advantages`` [B, K], when given, were pooled by the caller over more than these
    rows (the optimiser batch) and are used as they are. ``pool_rewards``, when given,
    maps these rows' rewards to their advantages pooled over rows held elsewhere (other
    processes' share of the batch): the loss is then built from this same pass.
    The importance ratio of Eq. 8 is 1 in value (one update per batch) and is omitted.
    Returns (loss, advantages [B, K]).
    """
    if token_logprobs.dim() != 3 or rewards.shape != token_logprobs.shape[:2]:
        raise ValueError(f"expected token_logprobs [B, K, T] and rewards [B, K], got "
                         f"{tuple(token_logprobs.shape)} and {tuple(rewards.shape)}")
    if pool_rewards is not None:
        advantages = pool_rewards(rewards.detach()).to(rewards.device)
    if advantages is None:
        advantages = grpo_advantages(rewards, pool=pool, eps=eps)
    return grpo_loss_given_advantages(token_logprobs, target_mask, advantages), advantages


def grpo_loss_given_advantages(token_logprobs: torch.Tensor, target_mask: torch.Tensor,
                               advantages: torch.Tensor) -> torch.Tensor:
    """The loss of :func:`latent_grpo_loss` with advantages [B, K] computed elsewhere (e.g.
    over a pool larger than this micro-batch: the optimiser batch)."""
    if token_logprobs.dim() != 3 or advantages.shape != token_logprobs.shape[:2]:
        raise ValueError(f"expected token_logprobs [B, K, T] and advantages [B, K], got "
                         f"{tuple(token_logprobs.shape)} and {tuple(advantages.shape)}")
    b, k, t = token_logprobs.shape
    if tuple(target_mask.shape) not in ((b, t), (b, k, t)):
        raise ValueError(f"expected target_mask [B, T] = {(b, t)} (one target per prompt) or "
                         f"[B, K, T] = {(b, k, t)} (one per row), got {tuple(target_mask.shape)}")
    mask = target_mask if target_mask.dim() == 3 else target_mask[:, None, :]
    per_row = mean_token_logprob(token_logprobs.float(), mask)
    return -(advantages.detach().float() * per_row).mean()


def sample_noise(batch: int, k: int, dim: int, *, generator: torch.Generator | None = None,
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """eps [B, K, d] ~ N(0, I) with eps[:, 0] = 0, so row 0 carries r itself. Drawn on the
    CPU generator (reproducible across devices), then moved."""
    eps = torch.randn(batch, k, dim, generator=generator, device="cpu").to(device)
    eps[:, 0] = 0
    return eps
