"""LatentRATT: the attention layer that turns a prompt's final hidden states into the
thought vector ``r`` (LatentR3, see ../shared/reference/LATENTR3.md "LatentRATT").

One query (the last real prompt position) attends over every real prompt position up to
it, with q/k/v = Linear(d, d, bias) and LatentRATT's own rotary embedding (base 1000,
half-split layout, over each head's dims). No output projection, norm or residual.
Weights stay fp32 whatever the LLM's dtype; the output is fp32. The computation is the
op ``fastlatent.ops.latent_attention`` (which can also expand r K ways with noise).
"""

from __future__ import annotations

import torch
from torch import nn

from fastlatent.ops.latent_attention import LatentAttentionWeights, latent_attention


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

    def weights(self) -> LatentAttentionWeights:
        return LatentAttentionWeights(self.q_proj.weight, self.q_proj.bias, self.k_proj.weight,
                                      self.k_proj.bias, self.v_proj.weight, self.v_proj.bias)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor, *,
                noise: torch.Tensor | None = None, sigma: float = 0.0) -> torch.Tensor:
        """hidden [B, L, d] (final-norm states of the prompt, thought column excluded),
        mask [B, L] (1 = real token). Returns r [B, d] float32, or with ``noise`` [B, K, d]
        the K-way expansion r + sigma * noise [B, K, d]."""
        if hidden.dim() != 3 or hidden.shape[-1] != self.hidden_size:
            raise ValueError(f"expected hidden [B, L, {self.hidden_size}], "
                             f"got {tuple(hidden.shape)}")
        return latent_attention(hidden, mask, self.weights(), num_heads=self.num_heads,
                                rope_base=self.rope_base, noise=noise, sigma=sigma)
