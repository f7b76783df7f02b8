"""Optimiser plumbing shared by the stages: the learning-rate schedules (Hugging Face's, as
the release trains through the HF Trainer), warm-up that fits the run, the clipped update."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

from fastlatent.errors import TrainingStopped

# The release's warm-up as a share of its run: SFT 20 of 1155 steps (49,251 CDs rows,
# batch 128, 3 epochs); RL 200 of ~1,539 steps (49,251 prompts, batch 32, 1 epoch).
RELEASE_WARMUP_SHARE = {"sft": 20 / 1155, "rl": 200 / 1539}


def fitted_warmup(configured: int, total_steps: int, stage: str,
                  fit: str = "fitted") -> tuple[int, str | None]:
    """The warm-up to use: ``configured`` when it is shorter than the run or ``fit`` is
    "as-given" (with a note when the learning rate then never reaches its peak);
    otherwise the release's share of ``total_steps`` (at least 1), with a note saying so.

    A warm-up as long as the run never reaches the configured learning rate (200 RL
    warm-up steps against ~183 optimiser steps on amazon-cds trained on `valid`).
    """
    if stage not in RELEASE_WARMUP_SHARE:
        raise ValueError(f"expected stage in {sorted(RELEASE_WARMUP_SHARE)}, got {stage!r}")
    if fit not in ("fitted", "as-given"):
        raise ValueError(f"expected fit 'fitted' or 'as-given', got {fit!r}")
    if configured < total_steps:
        return configured, None
    if fit == "as-given":
        return configured, (f"{stage.upper()}: warm-up of {configured} steps >= the run's "
                            f"{total_steps} optimiser steps, as given: the learning rate "
                            "never reaches its peak")
    share = RELEASE_WARMUP_SHARE[stage]
    fitted = max(1, round(share * total_steps))
    note = (f"{stage.upper()}: warm-up of {configured} steps >= the run's {total_steps} "
            f"optimiser steps; using {fitted} (the release's {share:.1%} of the run)")
    return fitted, note


def make_scheduler(optimizer: torch.optim.Optimizer, stage: str, warmup: int,
                   total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """SFT: linear warm-up then linear decay to 0; RL: linear warm-up then cosine decay
    to 0 (``transformers.get_{linear,cosine}_schedule_with_warmup``)."""
    if stage == "sft":
        return get_linear_schedule_with_warmup(optimizer, warmup, total_steps)
    if stage == "rl":
        return get_cosine_schedule_with_warmup(optimizer, warmup, total_steps)
    raise ValueError(f"expected stage 'sft' or 'rl', got {stage!r}")


def clipped_update(optimizer: torch.optim.Optimizer,
                   scheduler: torch.optim.lr_scheduler.LRScheduler,
                   params: Sequence[torch.nn.Parameter], max_norm: float, *,
                   finite: bool = True) -> tuple[float, float, bool]:
    """Clip the gradient norm, step optimiser and schedule, clear gradients.

    The update is skipped (gradients cleared, optimiser and schedule untouched) when
    ``finite`` is False (the caller saw a non-finite loss, reward or advantage) or the
    gradient norm is not finite. Returns (gradient norm before clipping, learning rate
    this step used, whether the update was applied)."""
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    lr = scheduler.get_last_lr()[0]
    applied = finite and math.isfinite(grad_norm)
    if applied:
        optimizer.step()
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, lr, applied


@dataclass
class NonFiniteGuard:
    """Counts skipped updates; ``limit`` in a row stops the run with the step and the
    likely cause in the message."""

    stage: str
    limit: int
    cause: str
    in_a_row: int = 0
    skipped: int = 0

    def update(self, applied: bool, step: int, values: dict[str, float]) -> None:
        if applied:
            self.in_a_row = 0
            return
        self.in_a_row += 1
        self.skipped += 1
        if self.in_a_row >= self.limit:
            shown = ", ".join(f"{k}={v:.4g}" for k, v in values.items())
            raise TrainingStopped(
                f"{self.stage.upper()} step {step}: {self.in_a_row} optimiser steps in a row "
                f"had a non-finite value ({shown}); each was skipped. Likely cause: "
                f"{self.cause}. Nothing was saved from these steps; the "
                "checkpoints before them are kept in the output folder's checkpoints/")


    def check_result(self, step: int, named: Iterable[tuple[str, torch.Tensor]], *,
                     final: bool) -> None:
        """Before the stage saves what it trained as a result: its weights must be finite
        and, at the stage's end (``final``), its last step must have been applied — a
        stage that ends inside a stretch of skipped steps stopped by running out of
        steps, not by recovering."""
        if final and self.in_a_row:
            raise TrainingStopped(
                f"{self.stage.upper()} step {step}: the stage ended on {self.in_a_row} "
                "skipped step(s) whose loss, reward or gradient was not finite, so its "
                f"result is not saved. Likely cause: {self.cause}")
        bad = nonfinite_tensors(named)
        if bad:
            shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
            raise TrainingStopped(
                f"{self.stage.upper()} step {step}: {len(bad)} trained weight tensor(s) hold "
                f"non-finite values ({shown}), so the result is not saved. Likely cause: "
                f"{self.cause}")


def nonfinite_tensors(named: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
    """The names of the tensors that hold a NaN or an infinity."""
    return [name for name, t in named if not bool(torch.isfinite(t.detach()).all())]


def all_finite(*values: float | torch.Tensor) -> bool:
    return all(bool(torch.isfinite(torch.as_tensor(v)).all()) for v in values)
