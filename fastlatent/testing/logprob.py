"""Naive oracle for the fused log-prob head: full logits in float64."""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


def naive_fused_logprob(hidden: torch.Tensor, weight: torch.Tensor,
                        targets: torch.Tensor) -> torch.Tensor:
    """log softmax(h W^T)[target] from the full [N, V] logits in float64 (0 where ignored)."""
    logits = hidden.double() @ weight.double().T
    logp = torch.log_softmax(logits, dim=-1).gather(1, targets.clamp_min(0)[:, None])[:, 0]
    return torch.where(targets == IGNORE_INDEX, torch.zeros_like(logp), logp)
