"""Naive float64 oracles of the kernel ops, written independently of ``fastlatent.ops``:
full logits, keys copied into every row, one prompt at a time."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from fastlatent.model.latent_ratt import LatentRATT

IGNORE_INDEX = -100


def naive_fused_logprob(hidden: torch.Tensor, weight: torch.Tensor,
                        targets: torch.Tensor) -> torch.Tensor:
    """log softmax(h W^T)[target] from the full [N, V] logits in float64 (0 where ignored)."""
    logits = hidden.double() @ weight.double().T
    logp = torch.log_softmax(logits, dim=-1).gather(1, targets.clamp_min(0)[:, None])[:, 0]
    return torch.where(targets == IGNORE_INDEX, torch.zeros_like(logp), logp)


def naive_shared_prefix_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                  suffix_valid: torch.Tensor, prefix_k: torch.Tensor,
                                  prefix_v: torch.Tensor, prefix_mask: torch.Tensor,
                                  rows_per_group: int, *, scale: float,
                                  common_k: torch.Tensor | None = None,
                                  common_v: torch.Tensor | None = None) -> torch.Tensor:
    """Same contract as ``fastlatent.ops.shared_prefix_attention``; float64 output. The
    common keys and the prompt are copied into every row: one concatenated key sequence,
    one full mask, plain softmax.

    A query with no visible key at all (a padded query over an empty prompt) gets zeros.
    """
    r, h, t, _ = q.shape
    hkv, s = k.shape[1], k.shape[2]
    n_rep = h // hkv
    keys = torch.cat((prefix_k.repeat_interleave(rows_per_group, 0), k), dim=2).double()
    values = torch.cat((prefix_v.repeat_interleave(rows_per_group, 0), v), dim=2).double()
    prompt_seen = prefix_mask.bool().repeat_interleave(rows_per_group, 0)[:, None, :]
    if common_k is not None:
        keys = torch.cat((common_k.double().expand(r, -1, -1, -1), keys), dim=2)
        values = torch.cat((common_v.double().expand(r, -1, -1, -1), values), dim=2)
        prompt_seen = torch.cat((torch.ones(r, 1, common_k.shape[2], dtype=torch.bool,
                                            device=q.device), prompt_seen), dim=-1)
    keys, values = keys.repeat_interleave(n_rep, 1), values.repeat_interleave(n_rep, 1)
    prompt_seen = prompt_seen.expand(r, t, -1)
    query_at = torch.arange(s - t, s, device=q.device)[:, None]
    causal = torch.arange(s, device=q.device)[None, :] <= query_at  # [T, S]
    suffix_seen = causal[None] & suffix_valid.bool()[:, None, :]
    seen = torch.cat((prompt_seen, suffix_seen), dim=-1)[:, None]  # [R, 1, T, L + S]
    scores = (q.double() @ keys.transpose(-1, -2)) * scale
    any_seen = seen.any(-1, keepdim=True)
    weights = torch.softmax(scores.masked_fill(~(seen | ~any_seen), float("-inf")), dim=-1)
    return (weights * any_seen) @ values


def naive_latent_attention(hidden, mask, weights, rope_base):
    """One head, float64, prompt by prompt: only the real columns up to the last real one,
    positions 0..n-1, the rotation written as 2x2 rotations of the pairs (i, i + d/2).
    ``weights`` = (q_weight, q_bias, k_weight, k_bias, v_weight, v_bias). r [B, d]."""
    w = [t.double() for t in weights]
    d = hidden.shape[-1]
    half = d // 2
    inv_freq = rope_base ** (-torch.arange(half, dtype=torch.float64, device=hidden.device)
                             / half)
    rows = []
    for b in range(hidden.shape[0]):
        x = hidden[b][mask[b] != 0].double()  # [n, d]
        n = x.shape[0]
        ang = torch.arange(n, dtype=torch.float64, device=x.device)[:, None] * inv_freq
        cos, sin = ang.cos(), ang.sin()

        def rot(v, c, s):
            return torch.cat((v[..., :half] * c - v[..., half:] * s,
                              v[..., half:] * c + v[..., :half] * s), -1)

        q = rot(x[-1] @ w[0].T + w[1], cos[-1], sin[-1])
        k = rot(x @ w[2].T + w[3], cos, sin)
        v = x @ w[4].T + w[5]
        rows.append(torch.softmax(k @ q / math.sqrt(d), 0) @ v)
    return torch.stack(rows)


def naive_latent_ratt(module: LatentRATT, hidden: torch.Tensor, length: int) -> torch.Tensor:
    """A LatentRATT module on one unpadded row, loop by loop in float64: hidden [length, d],
    every head, the rotation written as 2x2 rotations of the pairs (i, i + dh/2), positions
    0..length-1, the query at length-1. r [d]."""
    d, h = module.hidden_size, module.num_heads
    dh = d // h
    wq, bq = module.q_proj.weight.double(), module.q_proj.bias.double()
    wk, bk = module.k_proj.weight.double(), module.k_proj.bias.double()
    wv, bv = module.v_proj.weight.double(), module.v_proj.bias.double()
    x = hidden[:length].double()

    def rotate(vec: torch.Tensor, pos: int) -> torch.Tensor:
        out = vec.clone()
        for i in range(dh // 2):
            theta = pos * module.rope_base ** (-2 * i / dh)
            a, b = vec[i], vec[i + dh // 2]
            out[i] = a * math.cos(theta) - b * math.sin(theta)
            out[i + dh // 2] = b * math.cos(theta) + a * math.sin(theta)
        return out

    result = torch.zeros(d, dtype=torch.float64)
    for head in range(h):
        sl = slice(head * dh, (head + 1) * dh)
        q = rotate((wq @ x[length - 1] + bq)[sl], length - 1)
        scores = torch.stack([rotate((wk @ x[j] + bk)[sl], j) @ q / math.sqrt(dh)
                              for j in range(length)])
        weights = torch.softmax(scores, dim=0)
        result[sl] = sum(weights[j] * (wv @ x[j] + bv)[sl] for j in range(length))
    return result
