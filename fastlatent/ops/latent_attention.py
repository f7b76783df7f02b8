"""LatentRATT attention fused with the K-way noisy expansion (PyTorch path).

For each prompt b: one query at the last real position attends over every real position
up to it (q/k/v = x W^T + bias, LatentRATT's own half-split RoPE over each head's dims,
scale 1/sqrt(head_dim)), giving r_b; then r^k_b = r_b + sigma * eps_bk with eps_b0 = 0
supplied by the caller. Everything is computed in float32 (LatentRATT keeps fp32 master
weights); the hidden states may be any float dtype.

Two backends (``resolve_backend``): the PyTorch path below, and for one head (the
release's setting) a Triton path (``kernels/latent_attention.py``, imported on first use)
that runs on CUDA, or on the CPU under ``TRITON_INTERPRET=1``. Its split: the projections
q = W_q h_c + b_q, K = H W_k^T + b_k and the product s W_v^T are PyTorch matmuls; the
attention core (RoPE on q and K, scores over the visible keys, online softmax and the
weighted hidden sum s = sum_j w_j h_j) is one Triton program per prompt, and a second
small kernel writes the output r + sigma * eps (with b_v added) as [B, K, d]. The
backward mirrors it: one Triton program per prompt for the softmax / RoPE / weighted-sum
gradients, PyTorch matmuls for the projection gradients. More heads, other dtypes and
empty batches take the PyTorch path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fastlatent.ops._backend import resolve_backend
from fastlatent.ops._launch import alloc as _alloc
from fastlatent.ops._launch import tune_bucket
from fastlatent.ops._launch import unit_inner as _unit_inner
from fastlatent.ops.positions import last_real_index, positions_from_mask, rope_cos_sin, rotate_half


@dataclass(frozen=True)
class LatentAttentionWeights:
    """LatentRATT's parameters: [d, d] weights and [d] biases (fp32)."""

    q_weight: torch.Tensor
    q_bias: torch.Tensor
    k_weight: torch.Tensor
    k_bias: torch.Tensor
    v_weight: torch.Tensor
    v_bias: torch.Tensor


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


# ---------------------------------------------------------------------------- Triton path

_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _weight_tensors(weights: LatentAttentionWeights) -> tuple[torch.Tensor, ...]:
    return (weights.q_weight, weights.q_bias, weights.k_weight, weights.k_bias,
            weights.v_weight, weights.v_bias)


def _latent_attention_fwd(hidden: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor,
                          qcol: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                          rope_base: float) -> tuple[torch.Tensor, ...]:
    """Attention core. hidden [B, L, d] (unit inner stride), mask / pos [B, L] int32,
    qcol [B] int32, q [B, d] and k [B, L, d] fp32 (unrotated projections).
    Returns (w [B, L], s [B, d]) fp32: softmax weights (0 where not visible) and
    s = sum_j w_j h_j."""
    from fastlatent.kernels import latent_attention as kern

    b, length, d = hidden.shape
    z, w = _alloc((b, length), hidden.device), _alloc((b, length), hidden.device)
    lse, s = _alloc((b,), hidden.device), _alloc((b, d), hidden.device)
    kern._latent_attention_fwd_kernel[(b,)](
        q=q, k=k, h=hidden, mask=mask, pos=pos, qcol=qcol, z=z, w=w, lse=lse, s=s,
        L=length, D=d, HALF=d // 2, stride_kb=k.stride(0), stride_kl=k.stride(1),
        stride_hb=hidden.stride(0), stride_hl=hidden.stride(1), sm_scale=1.0 / math.sqrt(d),
        log2_base=math.log2(rope_base), L_BUCKET=tune_bucket(length))
    return w, s


def _latent_attention_expand(rv: torch.Tensor, v_bias: torch.Tensor,
                             noise: torch.Tensor | None, sigma: float,
                             seed: int | None = None, num_samples: int = 1) -> torch.Tensor:
    """out [B, K, d] = rv[:, None] + b_v + sigma * eps, fp32: eps = ``noise``, or drawn
    in-kernel from Philox(seed) with eps[:, 0] = 0 (K = num_samples), or none (K = 1)."""
    from fastlatent.kernels import latent_attention as kern

    b, d = rv.shape
    n_k = noise.shape[1] if noise is not None else (num_samples if seed is not None else 1)
    out = _alloc((b, n_k, d), rv.device)
    if n_k == 0:
        return out
    kern._latent_attention_expand_kernel[(b, n_k)](
        rv=rv, bias=v_bias, noise=rv if noise is None else noise, out=out, K=n_k, D=d,
        stride_nb=0 if noise is None else noise.stride(0),
        stride_nk=0 if noise is None else noise.stride(1), sigma=sigma,
        seed=0 if seed is None else seed, HAS_NOISE=noise is not None,
        HAS_SEED=seed is not None)
    return out


def _latent_attention_bwd(g_s: torch.Tensor, hidden: torch.Tensor, mask: torch.Tensor,
                          pos: torch.Tensor, qcol: torch.Tensor, q: torch.Tensor,
                          k: torch.Tensor, w: torch.Tensor,
                          rope_base: float) -> tuple[torch.Tensor, ...]:
    """Attention-core backward from g_s = dL/ds [B, d] (fp32). Returns fp32 (dq [B, d],
    dk [B, L, d], dh [B, L, d]): gradients to the unrotated projections and the direct
    part w_j g_s of the hidden gradient."""
    from fastlatent.kernels import latent_attention as kern

    b, length, d = hidden.shape
    gz = _alloc((b, length), hidden.device)
    dq, dk = _alloc((b, d), hidden.device), _alloc((b, length, d), hidden.device)
    dh = _alloc((b, length, d), hidden.device)
    kern._latent_attention_bwd_kernel[(b,)](
        q=q, k=k, h=hidden, mask=mask, pos=pos, qcol=qcol, w=w, gs=g_s, gz=gz, dq=dq, dk=dk,
        dh=dh, L=length, D=d, HALF=d // 2, stride_kb=k.stride(0), stride_kl=k.stride(1),
        stride_hb=hidden.stride(0), stride_hl=hidden.stride(1), sm_scale=1.0 / math.sqrt(d),
        log2_base=math.log2(rope_base), L_BUCKET=tune_bucket(length))
    return dq, dk, dh


class _LatentAttentionFn(torch.autograd.Function):
    """Triton path, one head. Output [B, K, d] with noise, else [B, d] (fp32)."""

    @staticmethod
    def forward(ctx, hidden, mask, noise, sigma: float, rope_base: float, seed: int | None,
                num_samples: int, q_weight, q_bias, k_weight, k_bias, v_weight, v_bias):
        hidden = _unit_inner(hidden)
        b, length, d = hidden.shape
        real = mask != 0
        qcol = last_real_index(real)
        rows = torch.arange(b, device=hidden.device)
        mask_i = real.to(torch.int32).contiguous()
        pos = positions_from_mask(real).to(torch.int32).contiguous()
        qcol_i = qcol.to(torch.int32).contiguous()
        x_last = hidden[rows, qcol].float()
        q = torch.nn.functional.linear(x_last, q_weight.float(), q_bias.float()).contiguous()
        k = torch.nn.functional.linear(hidden.float(), k_weight.float(),
                                       k_bias.float()).contiguous()
        w, s = _latent_attention_fwd(hidden, mask_i, pos, qcol_i, q, k, rope_base)
        rv = (s @ v_weight.float().T).contiguous()
        out = _latent_attention_expand(rv, _unit_inner(v_bias),
                                       None if noise is None else _unit_inner(noise), sigma,
                                       seed, num_samples)
        ctx.save_for_backward(hidden, mask_i, pos, qcol_i, q, k, w, s,
                              q_weight, k_weight, v_weight)
        ctx.has_noise = noise is not None
        ctx.expanded = noise is not None or seed is not None
        ctx.sigma = sigma
        ctx.rope_base = rope_base
        ctx.noise_dtype = None if noise is None else noise.dtype
        # gradients come back in each parameter's dtype (the weights' are saved)
        ctx.q_bias_dtype, ctx.k_bias_dtype = q_bias.dtype, k_bias.dtype
        ctx.v_bias_dtype = v_bias.dtype
        return out if ctx.expanded else out.view(b, d)

    @staticmethod
    def backward(ctx, grad_out):
        (hidden, mask_i, pos, qcol, q, k, w, s,
         q_weight, k_weight, v_weight) = ctx.saved_tensors
        (need_hidden, _, need_noise, _, _, _, _, need_q_weight, need_q_bias, need_k_weight,
         need_k_bias, need_v_weight, need_v_bias) = ctx.needs_input_grad
        g = grad_out.float()
        g_r = g.sum(1) if ctx.expanded else g  # [B, d]
        grad_noise = (ctx.sigma * g).to(ctx.noise_dtype) if ctx.has_noise and need_noise else None
        g_s = (g_r @ v_weight.float()).contiguous()
        dq, dk, dh = _latent_attention_bwd(g_s, hidden, mask_i, pos, qcol, q, k, w,
                                           ctx.rope_base)
        b, length, d = hidden.shape
        rows = torch.arange(b, device=hidden.device)
        # padding rows never reach the result; zero them so their content cannot leak
        x = hidden.float().masked_fill(mask_i[..., None] == 0, 0.)
        x_last = x[rows, qcol.long()]
        grad_hidden = None
        if need_hidden:
            grad_hidden = dh + dk @ k_weight.float()
            grad_hidden[rows, qcol.long()] += dq @ q_weight.float()
            grad_hidden = grad_hidden.to(hidden.dtype)
        flat_dk = dk.reshape(b * length, d)
        grad_q_weight = (dq.T @ x_last).to(q_weight.dtype) if need_q_weight else None
        grad_q_bias = dq.sum(0).to(ctx.q_bias_dtype) if need_q_bias else None
        grad_k_weight = ((flat_dk.T @ x.reshape(b * length, d)).to(k_weight.dtype)
                         if need_k_weight else None)
        grad_k_bias = flat_dk.sum(0).to(ctx.k_bias_dtype) if need_k_bias else None
        grad_v_weight = (g_r.T @ s).to(v_weight.dtype) if need_v_weight else None
        grad_v_bias = g_r.sum(0).to(ctx.v_bias_dtype) if need_v_bias else None
        return (grad_hidden,    # hidden
                None,           # mask
                grad_noise,     # noise
                None,           # sigma
                None,           # rope_base
                None,           # seed
                None,           # num_samples
                grad_q_weight,  # q_weight
                grad_q_bias,    # q_bias
                grad_k_weight,  # k_weight
                grad_k_bias,    # k_bias
                grad_v_weight,  # v_weight
                grad_v_bias)    # v_bias


def latent_attention(hidden: torch.Tensor, mask: torch.Tensor,
                     weights: LatentAttentionWeights, *, num_heads: int = 1,
                     rope_base: float = 1000.0, noise: torch.Tensor | None = None,
                     sigma: float = 0.0, seed: int | None = None, num_samples: int = 0,
                     backend: str | None = None) -> torch.Tensor:
    """LatentRATT's thought vector, optionally expanded K ways.

    Args: hidden [B, L, d] final-norm prompt states (thought column excluded), mask [B, L],
    weights (fp32), noise [B, K, d] (row 0 should be zero so r^0 = r) or None; or, instead
    of noise, ``seed`` + ``num_samples`` (K): eps drawn from Philox(seed) inside the
    Triton kernel (from torch.Generator(seed) on the torch path), eps[:, 0] = 0.
    Returns r [B, d] (no noise) or r + sigma * eps [B, K, d], float32.
    """
    _check_inputs(hidden, mask, weights, num_heads, noise)
    if seed is not None and (noise is not None or num_samples < 1):
        raise ValueError(f"expected seed with num_samples >= 1 and no noise tensor, got "
                         f"num_samples={num_samples}, noise given: {noise is not None}")
    use_triton = (resolve_backend(hidden.device, backend, available=("torch", "triton"))
                  == "triton" and num_heads == 1 and hidden.shape[0] > 0
                  and hidden.dtype in _TRITON_DTYPES
                  and all(t.dtype in _TRITON_DTYPES for t in _weight_tensors(weights))
                  and (noise is None or noise.dtype in _TRITON_DTYPES))
    if use_triton:
        return _LatentAttentionFn.apply(hidden, mask, noise, float(sigma), float(rope_base),
                                        seed, num_samples, *_weight_tensors(weights))
    r = latent_attention_torch(hidden, mask, weights, num_heads=num_heads, rope_base=rope_base)
    if seed is not None:
        generator = torch.Generator(device=r.device).manual_seed(seed)
        noise = torch.randn(r.shape[0], num_samples, r.shape[1], generator=generator,
                            device=r.device)
        noise[:, 0] = 0
    if noise is None:
        return r
    return r[:, None] + sigma * noise.to(r)
