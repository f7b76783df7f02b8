"""Optimiser plumbing shared by the stages: learning-rate multipliers for LambdaLR and
the clipped update."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch


def warmup_linear_decay(warmup: int, total: int) -> Callable[[int], float]:
    """SFT: linear warm-up over ``warmup`` steps, then linear decay to 0 at ``total``."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))
    return factor


def warmup_cosine(warmup: int, total: int) -> Callable[[int], float]:
    """RL: linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``total``."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return factor


def clipped_update(optimizer: torch.optim.Optimizer,
                   scheduler: torch.optim.lr_scheduler.LRScheduler,
                   params: Sequence[torch.nn.Parameter], max_norm: float) -> tuple[float, float]:
    """Clip the gradient norm, step optimiser and schedule, clear gradients.
    Returns (gradient norm before clipping, learning rate this step used)."""
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    lr = scheduler.get_last_lr()[0]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, lr
