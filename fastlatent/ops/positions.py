"""Positions and rotary tables from padding masks: the layout helpers the ops, the engine
and the model share (prompts left-padded, suffixes right-padded, the prompt tree's
padding in the middle: positions always come from the mask, never from columns)."""

from __future__ import annotations

import torch

from fastlatent.ops._backend import checks_values


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Position ids 0..n-1 over the real tokens of each row (padding gets 0)."""
    return (mask.long().cumsum(-1) - 1).clamp_min(0)


def last_real_index(mask: torch.Tensor) -> torch.Tensor:
    """Column of the last real token in each row of a [B, L] mask (any padding). Every
    row needs a real token (checked where ``checks_values`` says: a GPU mask only with
    FASTLATENT_DEBUG_CHECKS=1; an unchecked all-padding row gets -1)."""
    if checks_values(mask) and not bool((mask.sum(-1) > 0).all()):
        raise ValueError("every prompt needs at least one real token (mask row is all zero)")
    cols = torch.arange(mask.shape[-1], device=mask.device)
    return torch.where(mask.bool(), cols, -1).amax(-1)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """The half-split rotary layout's partner: [x1, x2] -> [-x2, x1] on the last dim."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_cos_sin(positions: torch.Tensor, dim: int, base: float) -> tuple[torch.Tensor, ...]:
    """cos/sin tables [..., dim] (fp32) for the half-split rotary layout."""
    exponent = torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32) / dim
    angles = positions.float()[..., None] * base ** (-exponent)  # [..., dim/2]
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()
