"""Learning-rate multipliers for torch.optim.lr_scheduler.LambdaLR."""

from __future__ import annotations

import math
from collections.abc import Callable


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
