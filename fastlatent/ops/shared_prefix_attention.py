"""Shared-prefix (cascade) attention: many suffix rows over one prompt's KV cache.

R suffix rows are grouped contiguously, ``rows_per_group`` per prompt (K latent samples or
beams). Every row attends to its group's prompt keys and, causally, to its own suffix
keys. The prompt part is one batched matmul per group, the rows' queries stacked along
the query axis, so prompt K/V are read once per group and never copied per row; the two
parts are merged by their log-sum-exp:

    out = (e^{lse_p} o_p + e^{lse_s} o_s) / (e^{lse_p} + e^{lse_s})

Dtype policy: the score and value matmuls run in the input dtype (fp32 accumulation on
every device we target); scaling, softmax, log-sum-exp and the merge are fp32; the output
is cast back to ``q.dtype``.

Two backends (``resolve_backend``): the PyTorch path below, and Triton kernels
(``kernels/shared_prefix_attention.py``, imported on first use only) for fp32, fp16 and
bf16 inputs on CUDA, or on the CPU under ``TRITON_INTERPRET=1``. The Triton forward takes
all queries of a group that share a kv head as one stacked query axis and runs a single
online softmax over the prompt tiles, then the rows' own suffix tiles; it saves the fp32
log-sum-exp, from which the Triton backward recomputes the probabilities (dq kernel, and
dk/dv kernels for the prompt and the suffix keys). Only ``delta = rowsum(dout * out)``
(from the saved fp32 output) and the cast of the output to q's dtype are PyTorch.
"""

from __future__ import annotations

import torch

from fastlatent.ops._backend import resolve_backend
from fastlatent.ops._launch import alloc as _alloc
from fastlatent.ops._launch import cdiv as _cdiv
from fastlatent.ops._launch import tune_bucket
from fastlatent.ops._launch import unit_inner as _unit_inner


def _check_inputs(q, k, v, suffix_valid, prefix_k, prefix_v, prefix_mask,
                  rows_per_group: int) -> None:
    tensors = {"q": q, "k": k, "v": v, "prefix_k": prefix_k, "prefix_v": prefix_v}
    for name, t in tensors.items():
        if t.dim() != 4:
            raise ValueError(f"expected {name} of rank 4, got shape {tuple(t.shape)}")
    if suffix_valid.dim() != 2 or prefix_mask.dim() != 2:
        raise ValueError(f"expected suffix_valid [R, S] and prefix_mask [G, L], got "
                         f"{tuple(suffix_valid.shape)} and {tuple(prefix_mask.shape)}")
    r, h, t, d = q.shape
    _, hkv, s, _ = k.shape
    g, _, length, _ = prefix_k.shape
    if rows_per_group < 1 or r != g * rows_per_group:
        raise ValueError(f"expected R = G * rows_per_group, got R={r}, G={g}, "
                         f"rows_per_group={rows_per_group}")
    if hkv < 1 or h % hkv:
        raise ValueError(f"expected query heads a multiple of kv heads, got H={h}, Hkv={hkv}")
    if s < t:
        raise ValueError(f"expected suffix keys S >= query tokens T, got S={s}, T={t}")
    expected = {"k": (r, hkv, s, d), "v": (r, hkv, s, d), "prefix_k": (g, hkv, length, d),
                "prefix_v": (g, hkv, length, d)}
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise ValueError(f"expected {name} {list(shape)}, got {list(tensors[name].shape)}")
    if tuple(suffix_valid.shape) != (r, s) or tuple(prefix_mask.shape) != (g, length):
        raise ValueError(f"expected suffix_valid [{r}, {s}] and prefix_mask [{g}, {length}], "
                         f"got {list(suffix_valid.shape)} and {list(prefix_mask.shape)}")
    if not q.is_floating_point() or any(x.dtype != q.dtype for x in tensors.values()):
        raise ValueError(f"expected q, k, v, prefix_k, prefix_v of one floating dtype, got "
                         f"{[str(x.dtype) for x in tensors.values()]}")
    devices = {x.device for x in (*tensors.values(), suffix_valid, prefix_mask)}
    if len(devices) != 1:
        raise ValueError(f"expected every input on one device, got {sorted(map(str, devices))}")


def _attend_with_lse(scores: torch.Tensor, allowed: torch.Tensor,
                     v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of fp32 ``scores`` [..., M, N] over the ``allowed`` keys
    (bool, broadcast to ``scores``) and ``v`` [..., N, D].

    Returns ``(out [..., M, D] fp32, lse [..., M] fp32)``; a query with no allowed key gets
    ``out = 0`` and ``lse = -inf``, with zero (never NaN) gradients.
    """
    scores = scores.masked_fill(~allowed, float("-inf"))
    peak = scores.amax(dim=-1, keepdim=True)
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    weights = torch.exp(scores - peak)
    total = weights.sum(dim=-1, keepdim=True)
    has_key = total > 0
    total = torch.where(has_key, total, torch.ones_like(total))
    out = torch.matmul(weights.to(v.dtype), v).float() / total
    lse = torch.where(has_key, peak + torch.log(total), torch.full_like(total, float("-inf")))
    return out, lse.squeeze(-1)


def _merge_by_lse(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor,
                  lse_b: torch.Tensor) -> torch.Tensor:
    """Combine two partial attentions [..., M, D] with their log-sum-exps [..., M]."""
    peak = torch.maximum(lse_a, lse_b)
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    w_a, w_b = torch.exp(lse_a - peak)[..., None], torch.exp(lse_b - peak)[..., None]
    total = w_a + w_b
    total = torch.where(total > 0, total, torch.ones_like(total))
    return (w_a * out_a + w_b * out_b) / total


def shared_prefix_attention_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                  suffix_valid: torch.Tensor, prefix_k: torch.Tensor,
                                  prefix_v: torch.Tensor, prefix_mask: torch.Tensor,
                                  rows_per_group: int, *, scale: float) -> torch.Tensor:
    """The cascade algorithm in plain, differentiable PyTorch (shapes as in
    :func:`shared_prefix_attention`; inputs are not validated here)."""
    r, h, t, d = q.shape
    g, hkv, length, _ = prefix_k.shape
    s, n_rep = k.shape[2], h // hkv
    # Prefix: the group's rows, heads sharing a kv head, and tokens all become queries.
    q_grouped = (q.reshape(g, rows_per_group, hkv, n_rep, t, d).transpose(1, 2)
                 .reshape(g, hkv, rows_per_group * n_rep * t, d))
    scores = torch.matmul(q_grouped, prefix_k.transpose(-1, -2)).float() * scale
    allowed = prefix_mask.bool()[:, None, None, :]  # [G, 1, 1, L]
    out_p, lse_p = _attend_with_lse(scores, allowed, prefix_v)
    out_p = (out_p.view(g, hkv, rows_per_group, n_rep, t, d).transpose(1, 2)
             .reshape(r, h, t, d))
    lse_p = lse_p.view(g, hkv, rows_per_group, n_rep, t).transpose(1, 2).reshape(r, h, t)
    # Suffix: each row over its own keys, causally; query t sits at key index S-T+t.
    scores = torch.matmul(q.reshape(r, hkv, n_rep * t, d), k.transpose(-1, -2)).float() * scale
    query_at = torch.arange(s - t, s, device=q.device)
    causal = torch.arange(s, device=q.device)[None, :] <= query_at[:, None]  # [T, S]
    allowed = (causal[None] & suffix_valid.bool()[:, None, :]).repeat(1, n_rep, 1)
    out_s, lse_s = _attend_with_lse(scores, allowed[:, None], v)
    out = _merge_by_lse(out_p, lse_p, out_s.view(r, h, t, d), lse_s.view(r, h, t))
    return out.to(q.dtype)


# ---------------------------------------------------------------------------- Triton path

_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)





def _precision(dtype: torch.dtype) -> str:
    """TF32 where the result is stored in bf16 anyway; 3xTF32 keeps fp32/fp16 accuracy."""
    return "tf32" if dtype == torch.bfloat16 else "tf32x3"


def _block_d(d: int) -> int:
    return max(16, 1 << (d - 1).bit_length())  # tl.dot needs every dimension >= 16


def _strides3(x: torch.Tensor) -> tuple[int, int, int]:
    return x.stride(0), x.stride(1), x.stride(2)


def _shared_prefix_attention_fwd(q, k, v, valid, prefix_k, prefix_v, prefix_ok,
                                 rows_per_group: int, scale: float):
    """Triton forward. Tensors have unit inner stride; ``valid`` and ``prefix_ok`` are
    contiguous int8. Returns (out [R, H, T, D] fp32, lse [R, H, T] fp32). The output stays
    fp32 for the backward's delta = rowsum(dout * out): with an fp16-rounded output the
    key gradients lose more than the PyTorch path does."""
    from fastlatent.kernels import shared_prefix_attention as kern

    r, h, t, d = q.shape
    g, hkv, length, _ = prefix_k.shape
    s, n_rep = k.shape[2], h // hkv
    m = rows_per_group * n_rep * t
    out = _alloc((r, h, t, d), q.device, torch.float32)
    lse = _alloc((r, h, t), q.device, torch.float32)
    if out.numel() == 0:
        return out, lse.fill_(float("-inf"))

    def grid(meta):
        return (g, hkv, _cdiv(m, meta["BLOCK_M"]))

    kern._shared_prefix_attention_fwd_kernel[grid](
        q, k, v, valid, prefix_k, prefix_v, prefix_ok, out, lse, scale,
        rows_per_group, n_rep, t, s, length, d, m,
        *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(prefix_k),
        *_strides3(prefix_v), *_strides3(out), tune_bucket(m),
        PRECISION=_precision(q.dtype), BLOCK_D=_block_d(d))
    return out, lse


def _shared_prefix_attention_bwd(grad_out, q, k, v, valid, prefix_k, prefix_v, prefix_ok,
                                 out, lse, rows_per_group: int, scale: float,
                                 needs: tuple[bool, bool, bool, bool, bool]):
    """Triton backward: (dq, dk, dv, dprefix_k, dprefix_v), None where not needed."""
    from fastlatent.kernels import shared_prefix_attention as kern

    r, h, t, d = q.shape
    g, hkv, length, _ = prefix_k.shape
    s, n_rep = k.shape[2], h // hkv
    m = rows_per_group * n_rep * t
    do = grad_out.contiguous()  # same layout as out (contiguous)
    delta = (do.float() * out.float()).sum(-1)  # [R, H, T] fp32
    common = dict(PRECISION=_precision(q.dtype), BLOCK_D=_block_d(d))
    dq = dk = dv = dpk = dpv = None
    if needs[0]:
        dq = _alloc((r, h, t, d), q.device, q.dtype)

        def grid_q(meta):
            return (g, hkv, _cdiv(m, meta["BLOCK_M"]))

        kern._shared_prefix_attention_bwd_dq_kernel[grid_q](
            q, k, v, valid, prefix_k, prefix_v, prefix_ok, do, lse, delta, dq, scale,
            rows_per_group, n_rep, t, s, length, d, m,
            *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(prefix_k),
            *_strides3(prefix_v), *_strides3(do), tune_bucket(m), **common)
    for keys, values, ok, rows, width, wanted, suffix in (
            (k, v, valid, rows_per_group, s, needs[1] or needs[2], True),
            (prefix_k, prefix_v, prefix_ok, 1, length, needs[3] or needs[4], False)):
        if not wanted:
            continue
        gk = _alloc(tuple(keys.shape), keys.device, keys.dtype)
        gv = _alloc(tuple(values.shape), values.device, values.dtype)

        def grid_k(meta, n_keys=rows * width):
            return (g, hkv, _cdiv(n_keys, meta["BLOCK_N"]))

        kern._shared_prefix_attention_bwd_dkdv_kernel[grid_k](
            q, keys, values, ok, do, lse, delta, gk, gv, scale,
            rows_per_group, n_rep, t, s, width, rows, d, m,
            *_strides3(q), *_strides3(keys), *_strides3(values), *_strides3(do),
            tune_bucket(m), tune_bucket(rows * width), SUFFIX=suffix, **common)
        if suffix:
            dk, dv = gk, gv
        else:
            dpk, dpv = gk, gv
    return dq, dk, dv, dpk, dpv


class _SharedPrefixAttentionFn(torch.autograd.Function):
    """Triton path (forward and backward)."""

    @staticmethod
    def forward(ctx, q, k, v, suffix_valid, prefix_k, prefix_v, prefix_mask,
                rows_per_group: int, scale: float):
        q, k, v, prefix_k, prefix_v = map(_unit_inner, (q, k, v, prefix_k, prefix_v))
        valid = (suffix_valid != 0).to(torch.int8).contiguous()
        prefix_ok = (prefix_mask != 0).to(torch.int8).contiguous()
        if q.shape[0] == 0 or q.shape[-1] == 0:
            out = shared_prefix_attention_torch(q, k, v, suffix_valid, prefix_k, prefix_v,
                                                prefix_mask, rows_per_group, scale=scale)
            lse = torch.full(q.shape[:3], float("-inf"), device=q.device)
        else:
            out, lse = _shared_prefix_attention_fwd(q, k, v, valid, prefix_k, prefix_v,
                                                    prefix_ok, rows_per_group, scale)
        ctx.save_for_backward(q, k, v, valid, prefix_k, prefix_v, prefix_ok, out, lse)
        ctx.rows_per_group = rows_per_group
        ctx.scale = scale
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, valid, prefix_k, prefix_v, prefix_ok, out, lse = ctx.saved_tensors
        needs = tuple(ctx.needs_input_grad[i] for i in (0, 1, 2, 4, 5))
        if q.numel() == 0:
            grads = [torch.zeros_like(x) if need else None
                     for x, need in zip((q, k, v, prefix_k, prefix_v), needs, strict=True)]
        else:
            grads = _shared_prefix_attention_bwd(
                grad_out, q, k, v, valid, prefix_k, prefix_v, prefix_ok, out, lse,
                ctx.rows_per_group, ctx.scale, needs)
        dq, dk, dv, dpk, dpv = grads
        return (dq, dk if needs[1] else None, dv if needs[2] else None, None,
                dpk if needs[3] else None, dpv if needs[4] else None, None, None, None)


def shared_prefix_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            suffix_valid: torch.Tensor, prefix_k: torch.Tensor,
                            prefix_v: torch.Tensor, prefix_mask: torch.Tensor,
                            rows_per_group: int, *, scale: float,
                            backend: str | None = None) -> torch.Tensor:
    """Attention of R suffix rows over their group's shared prompt and their own suffix.

    Args:
        q: [R, H, T, D] queries of the T newest suffix tokens of each row.
        k, v: [R, Hkv, S, D] each row's suffix keys/values, S >= T; the last T belong to
            the queries, the first S-T are cached from earlier steps. H = Hkv * n_rep
            (query head h uses kv head h // n_rep).
        suffix_valid: [R, S] bool, which suffix key slots are real.
        prefix_k, prefix_v: [G, Hkv, L, D] the prompts' keys/values.
        prefix_mask: [G, L], nonzero = real prompt token (prompts are left-padded).
        rows_per_group: R = G * rows_per_group; row r belongs to prompt r // rows_per_group.
        scale: multiplies q·k (usually head_dim ** -0.5).
        backend: "auto" | "triton" | "torch" (None: $FASTLATENT_BACKEND, then auto).

    Query t of row r attends to every real token of its prompt and to the valid suffix
    keys 0..S-T+t of row r. Returns [R, H, T, D] in q's dtype; a query whose own slot is
    padding gets a finite, meaningless value. Differentiable in q, k, v, prefix_k and
    prefix_v.
    """
    _check_inputs(q, k, v, suffix_valid, prefix_k, prefix_v, prefix_mask, rows_per_group)
    use_triton = (resolve_backend(q.device, backend, available=("torch", "triton")) == "triton"
                  and q.dtype in _TRITON_DTYPES)
    if use_triton:
        return _SharedPrefixAttentionFn.apply(q, k, v, suffix_valid, prefix_k, prefix_v,
                                              prefix_mask, rows_per_group, float(scale))
    return shared_prefix_attention_torch(q, k, v, suffix_valid, prefix_k, prefix_v,
                                         prefix_mask, rows_per_group, scale=scale)
