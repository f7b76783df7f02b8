"""LatentRATT attention fused with the K-way noisy expansion (PyTorch path).

For each prompt b: one query at the last real position attends over every real position
up to it (q/k/v = x W^T + bias, LatentRATT's own half-split RoPE over each head's dims,
scale 1/sqrt(head_dim)), giving r_b; then r^k_b = r_b + sigma * eps_bk with eps_b0 = 0
supplied by the caller. Everything is computed in float32 (LatentRATT keeps fp32 master
weights); the hidden states may be any float dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fastlatent.data.batch import positions_from_mask
from fastlatent.ops._backend import resolve_backend


@dataclass(frozen=True)
class LatentAttentionWeights:
    """LatentRATT's parameters: [d, d] weights and [d] biases (fp32)."""

    q_weight: torch.Tensor
    q_bias: torch.Tensor
    k_weight: torch.Tensor
    k_bias: torch.Tensor
    v_weight: torch.Tensor
    v_bias: torch.Tensor


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_cos_sin(positions: torch.Tensor, dim: int, base: float) -> tuple[torch.Tensor, ...]:
    """cos/sin tables [..., dim] (fp32) for the half-split rotary layout."""
    exponent = torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32) / dim
    angles = positions.float()[..., None] * base ** (-exponent)  # [..., dim/2]
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def last_real_index(mask: torch.Tensor) -> torch.Tensor:
    """Column of the last real token in each row of a [B, L] mask (left or right padded)."""
    if not bool((mask.sum(-1) > 0).all()):
        raise ValueError("every prompt needs at least one real token (mask row is all zero)")
    cols = torch.arange(mask.shape[-1], device=mask.device)
    return torch.where(mask.bool(), cols, -1).amax(-1)


def latent_attention_torch(hidden: torch.Tensor, mask: torch.Tensor,
                           weights: LatentAttentionWeights, *, num_heads: int,
                           rope_base: float) -> torch.Tensor:
    """r [B, d] float32 (no expansion); see the module docstring."""
    b, length, d = hidden.shape
    h, dh = num_heads, d // num_heads
    x = hidden.float()
    query_col = last_real_index(mask)  # [B]
    rows = torch.arange(b, device=x.device)
    cos, sin = rope_cos_sin(positions_from_mask(mask), dh, rope_base)  # [B, L, dh]
    w = weights
    q = torch.nn.functional.linear(x[rows, query_col], w.q_weight, w.q_bias).view(b, h, dh)
    q = q * cos[rows, query_col][:, None] + rotate_half(q) * sin[rows, query_col][:, None]
    k = torch.nn.functional.linear(x, w.k_weight, w.k_bias).view(b, length, h, dh)
    k = k * cos[:, :, None] + rotate_half(k) * sin[:, :, None]
    v = torch.nn.functional.linear(x, w.v_weight, w.v_bias).view(b, length, h, dh)
    scores = torch.einsum("bhe,blhe->bhl", q, k) / math.sqrt(dh)
    cols = torch.arange(length, device=x.device)
    visible = mask.bool() & (cols[None] <= query_col[:, None])  # [B, L]
    scores = scores.masked_fill(~visible[:, None], float("-inf"))
    return torch.einsum("bhl,blhe->bhe", scores.softmax(dim=-1), v).reshape(b, d)


def _check_inputs(hidden, mask, weights, num_heads, noise) -> None:
    if hidden.dim() != 3:
        raise ValueError(f"expected hidden [B, L, d], got {tuple(hidden.shape)}")
    b, length, d = hidden.shape
    if mask.shape != (b, length):
        raise ValueError(f"expected mask {(b, length)}, got {tuple(mask.shape)}")
    for name in ("q", "k", "v"):
        wt, bias = getattr(weights, f"{name}_weight"), getattr(weights, f"{name}_bias")
        if wt.shape != (d, d) or bias.shape != (d,):
            raise ValueError(f"expected {name} weight [{d}, {d}] and bias [{d}], got "
                             f"{tuple(wt.shape)} and {tuple(bias.shape)}")
        if wt.device != hidden.device:
            raise ValueError(f"expected LatentRATT weights on {hidden.device}, got {wt.device}")
    if num_heads < 1 or d % num_heads or (d // num_heads) % 2:
        raise ValueError(f"expected num_heads dividing d={d} into even head dims, "
                         f"got {num_heads}")
    if noise is not None and (noise.dim() != 3 or noise.shape[0] != b or noise.shape[2] != d):
        raise ValueError(f"expected noise [{b}, K, {d}], got {tuple(noise.shape)}")


def latent_attention(hidden: torch.Tensor, mask: torch.Tensor,
                     weights: LatentAttentionWeights, *, num_heads: int = 1,
                     rope_base: float = 1000.0, noise: torch.Tensor | None = None,
                     sigma: float = 0.0, backend: str | None = None) -> torch.Tensor:
    """LatentRATT's thought vector, optionally expanded K ways.

    Args: hidden [B, L, d] final-norm prompt states (thought column excluded), mask [B, L],
    weights (fp32), noise [B, K, d] (row 0 should be zero so r^0 = r) or None.
    Returns r [B, d] (noise None) or r + sigma * noise [B, K, d], float32.
    """
    _check_inputs(hidden, mask, weights, num_heads, noise)
    resolve_backend(hidden.device, backend, available=("torch",))
    r = latent_attention_torch(hidden, mask, weights, num_heads=num_heads, rope_base=rope_base)
    if noise is None:
        return r
    return r[:, None] + sigma * noise.to(r)
