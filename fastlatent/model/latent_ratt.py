"""LatentRATT: the attention layer that turns a prompt's final hidden states into the
thought vector ``r`` (LatentR3, see ../shared/reference/LATENTR3.md "LatentRATT").

One query (the last real prompt position) attends over every real prompt position up to
it, with q/k/v = Linear(d, d, bias) and LatentRATT's own rotary embedding (base 1000,
half-split layout, over each head's dims). No output projection, norm or residual.
Weights stay fp32 whatever the LLM's dtype; the output is fp32.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fastlatent.data.batch import positions_from_mask


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_cos_sin(positions: torch.Tensor, dim: int, base: float) -> tuple[torch.Tensor, ...]:
    """cos/sin tables [..., dim] (fp32) for the half-split rotary layout."""
    inv_freq = base ** (-torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32)
                        / dim)
    angles = positions.float()[..., None] * inv_freq  # [..., dim/2]
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin


def last_real_index(mask: torch.Tensor) -> torch.Tensor:
    """Column of the last real token in each row of a [B, L] mask (left or right padded)."""
    if not bool((mask.sum(-1) > 0).all()):
        raise ValueError("every prompt needs at least one real token (mask row is all zero)")
    cols = torch.arange(mask.shape[-1], device=mask.device)
    return torch.where(mask.bool(), cols, -1).amax(-1)


class LatentRATT(nn.Module):
    """Single-query attention over the prompt's final hidden states -> r [B, d] (fp32)."""

    def __init__(self, hidden_size: int, num_heads: int = 1, rope_base: float = 1000.0):
        super().__init__()
        if num_heads < 1 or hidden_size % num_heads:
            raise ValueError(f"expected num_heads dividing hidden_size={hidden_size}, "
                             f"got {num_heads}")
        if (hidden_size // num_heads) % 2:
            raise ValueError(f"expected an even head dim for RoPE, got "
                             f"{hidden_size // num_heads}")
        self.hidden_size, self.num_heads, self.rope_base = hidden_size, num_heads, rope_base
        self.q_proj = nn.Linear(hidden_size, hidden_size, bias=True)
        self.k_proj = nn.Linear(hidden_size, hidden_size, bias=True)
        self.v_proj = nn.Linear(hidden_size, hidden_size, bias=True)
        for proj in (self.q_proj, self.k_proj, self.v_proj):
            nn.init.normal_(proj.weight, mean=0.0, std=0.02)
            nn.init.zeros_(proj.bias)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """hidden [B, L, d] (final-norm states of the prompt, thought column excluded),
        mask [B, L] (1 = real token). Returns r [B, d] float32."""
        if hidden.dim() != 3 or hidden.shape[-1] != self.hidden_size:
            raise ValueError(f"expected hidden [B, L, {self.hidden_size}], "
                             f"got {tuple(hidden.shape)}")
        if mask.shape != hidden.shape[:2]:
            raise ValueError(f"expected mask {tuple(hidden.shape[:2])}, got {tuple(mask.shape)}")
        b, length, d = hidden.shape
        h, dh = self.num_heads, d // self.num_heads
        x = hidden.float()
        query_col = last_real_index(mask)  # [B]
        rows = torch.arange(b, device=x.device)
        positions = positions_from_mask(mask)  # [B, L]
        cos, sin = rope_cos_sin(positions, dh, self.rope_base)  # [B, L, dh]
        q = self.q_proj(x[rows, query_col]).view(b, h, dh)
        q = apply_rope(q, cos[rows, query_col][:, None], sin[rows, query_col][:, None])
        k = self.k_proj(x).view(b, length, h, dh)
        k = apply_rope(k, cos[:, :, None], sin[:, :, None])
        v = self.v_proj(x).view(b, length, h, dh)
        scores = torch.einsum("bhe,blhe->bhl", q, k) / math.sqrt(dh)
        cols = torch.arange(length, device=x.device)
        visible = mask.bool() & (cols[None] <= query_col[:, None])  # [B, L]
        scores = scores.masked_fill(~visible[:, None], float("-inf"))
        weights = scores.softmax(dim=-1)
        return torch.einsum("bhl,blhe->bhe", weights, v).reshape(b, d)
