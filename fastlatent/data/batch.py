"""Token-level examples and padded batches.

Layout used everywhere: prompts are LEFT-padded (so every row's prompt ends in the same
column, and with a latent the thought token sits in the last prompt column for all
rows), targets are RIGHT-padded. Position ids are always derived from the masks, never
from column indices.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class EncodedExample:
    """``prompt_ids``: preamble + user input (+ the thought token when a latent is used).
    ``target_ids``: the target title's tokens followed by EOS."""

    prompt_ids: tuple[int, ...]
    target_ids: tuple[int, ...]


@dataclass
class Batch:
    prompt_ids: torch.Tensor  # [B, L] int64, left-padded
    prompt_mask: torch.Tensor  # [B, L] int64, 1 = real token
    target_ids: torch.Tensor  # [B, T] int64, right-padded
    target_mask: torch.Tensor  # [B, T] int64

    def __len__(self) -> int:
        return self.prompt_ids.shape[0]

    def to(self, device: torch.device | str) -> Batch:
        return Batch(*(t.to(device) for t in (
            self.prompt_ids, self.prompt_mask, self.target_ids, self.target_mask)))

    def select(self, rows: slice | torch.Tensor) -> Batch:
        return Batch(self.prompt_ids[rows], self.prompt_mask[rows],
                     self.target_ids[rows], self.target_mask[rows])


def collate(examples: Sequence[EncodedExample], pad_id: int) -> Batch:
    """Pad a list of encoded examples into a :class:`Batch` (left prompts, right targets)."""
    if not examples:
        raise ValueError("cannot collate an empty list of examples")
    if any(not ex.prompt_ids or not ex.target_ids for ex in examples):
        raise ValueError("every example needs a non-empty prompt and target")
    n, max_l = len(examples), max(len(ex.prompt_ids) for ex in examples)
    max_t = max(len(ex.target_ids) for ex in examples)
    prompt_ids = torch.full((n, max_l), pad_id, dtype=torch.long)
    prompt_mask = torch.zeros((n, max_l), dtype=torch.long)
    target_ids = torch.full((n, max_t), pad_id, dtype=torch.long)
    target_mask = torch.zeros((n, max_t), dtype=torch.long)
    for i, ex in enumerate(examples):
        lp, lt = len(ex.prompt_ids), len(ex.target_ids)
        prompt_ids[i, max_l - lp:] = torch.tensor(ex.prompt_ids, dtype=torch.long)
        prompt_mask[i, max_l - lp:] = 1
        target_ids[i, :lt] = torch.tensor(ex.target_ids, dtype=torch.long)
        target_mask[i, :lt] = 1
    return Batch(prompt_ids, prompt_mask, target_ids, target_mask)

