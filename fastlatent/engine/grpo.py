"""Latent GRPO arithmetic: perplexity reward, pooled advantage, loss (LATENTR3.md, Eq. 7-8).

Pure functions on tensors. A training step (engine or generic) returns token log-probs
and rewards; its caller (:func:`fastlatent.rl.accumulate_rl_gradients`) pools the rewards
of the whole optimiser batch, computes the advantages once with :func:`grpo_advantages`
and builds the loss with :func:`grpo_loss`.
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


def negative_perplexity(token_logprobs: torch.Tensor, target_mask: torch.Tensor
                        ) -> torch.Tensor:
    """s = -exp(-(1/|y|) sum_i log pi(y_i)) = -PPL per row, in float32 (differentiable:
    pass detached log-probs for a GRPO reward, which is a constant)."""
    return -torch.exp(-mean_token_logprob(token_logprobs.float(), target_mask))


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


def grpo_loss(token_logprobs: torch.Tensor, target_mask: torch.Tensor,
              advantages: torch.Tensor) -> torch.Tensor:
    """loss = -(1/(B*K)) sum_b sum_k A_bk * mean_t log pi(y_t | x_b, r^k_b) (Eq. 8).

    token_logprobs [B, K, T] (with gradient), target_mask [B, T] (one target per prompt)
    or [B, K, T] (each row scores its own tokens, as the exact-match reward's written
    titles), advantages [B, K] (constants: pooled by the caller over the optimiser batch).
    The importance ratio of Eq. 8 is 1 in value (one update per batch) and is omitted.
    """
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


def latent_grpo_loss(token_logprobs: torch.Tensor, target_mask: torch.Tensor,
                     rewards: torch.Tensor, *, pool: str = "batch", eps: float | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """The public one-call form for a pool that is exactly these rows: advantages from
    ``rewards`` [B, K] (:func:`grpo_advantages`), then :func:`grpo_loss`.
    Returns (loss, advantages [B, K])."""
    if token_logprobs.dim() != 3 or rewards.shape != token_logprobs.shape[:2]:
        raise ValueError(f"expected token_logprobs [B, K, T] and rewards [B, K], got "
                         f"{tuple(token_logprobs.shape)} and {tuple(rewards.shape)}")
    advantages = grpo_advantages(rewards, pool=pool, eps=eps)
    return grpo_loss(token_logprobs, target_mask, advantages), advantages


def sample_noise(batch: int, k: int, dim: int, *, generator: torch.Generator | None = None,
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """eps [B, K, d] ~ N(0, I) with eps[:, 0] = 0, so row 0 carries r itself. Drawn on the
    CPU generator (reproducible across devices), then moved."""
    eps = torch.randn(batch, k, dim, generator=generator, device="cpu").to(device)
    eps[:, 0] = 0
    return eps
