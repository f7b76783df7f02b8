"""Shared-prefix (cascade) attention: many suffix rows over one prompt's KV cache, and
optionally over a block of keys common to every prompt of the batch.

R suffix rows are grouped contiguously, ``rows_per_group`` per prompt (K latent samples or
beams). Every row attends to the batch's common keys (if given: the instruction every
prompt starts with), to its group's prompt keys and, causally, to its own suffix keys: a
tree of three levels. The common part is one matmul with every query of the batch
stacked, the prompt part one batched matmul per group with the group's queries stacked,
so common K/V are read once per batch and prompt K/V once per group, never copied per
group or row; the parts are merged by their log-sum-exp:

    out = (e^{lse_c} o_c + e^{lse_p} o_p + e^{lse_s} o_s) / (e^{lse_c} + e^{lse_p} + e^{lse_s})

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
from fastlatent.ops._launch import dot_args, tune_bucket
from fastlatent.ops._launch import unit_inner as _unit_inner


def _check_inputs(q, k, v, suffix_valid, prefix_k, prefix_v, prefix_mask,
                  rows_per_group: int, common_k=None, common_v=None) -> None:
    tensors = {"q": q, "k": k, "v": v, "prefix_k": prefix_k, "prefix_v": prefix_v}
    if (common_k is None) != (common_v is None):
        raise ValueError("expected both common_k and common_v, or neither")
    if common_k is not None:
        tensors.update(common_k=common_k, common_v=common_v)
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
    if common_k is not None:
        c = common_k.shape[2]
        expected.update(common_k=(1, hkv, c, d), common_v=(1, hkv, c, d))
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise ValueError(f"expected {name} {list(shape)}, got {list(tensors[name].shape)}")
    if tuple(suffix_valid.shape) != (r, s) or tuple(prefix_mask.shape) != (g, length):
        raise ValueError(f"expected suffix_valid [{r}, {s}] and prefix_mask [{g}, {length}], "
                         f"got {list(suffix_valid.shape)} and {list(prefix_mask.shape)}")
    if not q.is_floating_point() or any(x.dtype != q.dtype for x in tensors.values()):
        raise ValueError(f"expected q, k, v, prefix_k, prefix_v (common_k, common_v) of one "
                         f"floating dtype, got "
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
                                  rows_per_group: int, *, scale: float,
                                  common_k: torch.Tensor | None = None,
                                  common_v: torch.Tensor | None = None) -> torch.Tensor:
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
    out_s, lse_s = out_s.view(r, h, t, d), lse_s.view(r, h, t)
    if common_k is not None and common_k.shape[2] > 0:
        # Common keys: every query of the batch that uses kv head h, stacked.
        q_all = q.reshape(r, hkv, n_rep * t, d).transpose(0, 1).reshape(hkv, r * n_rep * t, d)
        scores = torch.matmul(q_all, common_k[0].transpose(-1, -2)).float() * scale
        out_c, lse_c = _attend_with_lse(scores, torch.ones((), dtype=torch.bool,
                                                           device=q.device), common_v[0])
        out_c = out_c.view(hkv, r, n_rep * t, d).transpose(0, 1).reshape(r, h, t, d)
        lse_c = lse_c.view(hkv, r, n_rep * t).transpose(0, 1).reshape(r, h, t)
        out_p, lse_p = (_merge_by_lse(out_c, lse_c, out_p, lse_p),
                        torch.logaddexp(lse_c, lse_p))
    out = _merge_by_lse(out_p, lse_p, out_s, lse_s)
    return out.to(q.dtype)


# ---------------------------------------------------------------------------- Triton path

_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _block_d(d: int) -> int:
    return max(16, 1 << (d - 1).bit_length())  # tl.dot needs every dimension >= 16


def _query_side_strides(q, k, v, prefix_k, prefix_v, common_k, common_v, o
                        ) -> dict[str, int]:
    """The stride arguments of the forward and dq kernels, by kernel parameter name:
    ``stride_<tensor><dim>`` for dims 0-2 of q, k, v, the prompt keys/values and ``o``
    (the output, or ``do``, which has its layout); dims 1-2 of the common keys/values
    (their dim 0 is 1)."""
    full = {"q": q, "k": k, "v": v, "pk": prefix_k, "pv": prefix_v, "o": o}
    strides = {f"stride_{name}{dim}": x.stride(dim) for name, x in full.items()
               for dim in (0, 1, 2)}
    strides.update({f"stride_{name}{dim}": x.stride(dim)
                    for name, x in (("ck", common_k), ("cv", common_v)) for dim in (1, 2)})
    return strides


def _common_or_empty(common_k, common_v, prefix_k, prefix_v):
    """The common keys/values and their all-real int8 mask; without them, empty [1, Hkv,
    0, D] views (C = 0: the kernels' common loop runs zero times)."""
    if common_k is None:
        common_k, common_v = prefix_k[:1, :, :0], prefix_v[:1, :, :0]
    ok = torch.ones(1, common_k.shape[2], dtype=torch.int8, device=common_k.device)
    return common_k, common_v, ok


def _shared_prefix_attention_fwd(q, k, v, valid, prefix_k, prefix_v, prefix_ok, common_k,
                                 common_v, common_ok, rows_per_group: int, scale: float):
    """Triton forward. Tensors have unit inner stride; ``valid``, ``prefix_ok`` and
    ``common_ok`` are contiguous int8. Returns (out [R, H, T, D] fp32, lse [R, H, T] fp32).
    The output stays fp32 for the backward's delta = rowsum(dout * out): with an
    fp16-rounded output the key gradients lose more than the PyTorch path does."""
    from fastlatent.kernels import shared_prefix_attention as kern

    r, h, t, d = q.shape
    g, hkv, length, _ = prefix_k.shape
    s, n_rep, c = k.shape[2], h // hkv, common_k.shape[2]
    m = rows_per_group * n_rep * t
    out = _alloc((r, h, t, d), q.device, torch.float32)
    lse = _alloc((r, h, t), q.device, torch.float32)
    if out.numel() == 0:
        return out, lse.fill_(float("-inf"))

    def grid(meta):
        return (g, hkv, _cdiv(m, meta["BLOCK_M"]))

    kern._shared_prefix_attention_fwd_kernel[grid](
        q=q, k=k, v=v, sv=valid, pk=prefix_k, pv=prefix_v, pm=prefix_ok,
        ck=common_k, cv=common_v, cm=common_ok, o=out, lse=lse, scale=scale,
        P=rows_per_group, NREP=n_rep, T=t, S=s, L=length, C=c, D=d, M=m,
        **_query_side_strides(q, k, v, prefix_k, prefix_v, common_k, common_v, out),
        M_BUCKET=tune_bucket(m), **dot_args(q.dtype), BLOCK_D=_block_d(d))
    return out, lse


def _dq(q, k, v, valid, prefix_k, prefix_v, prefix_ok, common_k, common_v, common_ok, do,
        lse, delta, rows_per_group: int, scale: float):
    """dq [R, H, T, D] in q's dtype, contiguous (the strides of ``do``)."""
    from fastlatent.kernels import shared_prefix_attention as kern

    r, h, t, d = q.shape
    g, hkv, length, _ = prefix_k.shape
    s, n_rep, c = k.shape[2], h // hkv, common_k.shape[2]
    m = rows_per_group * n_rep * t
    dq = _alloc((r, h, t, d), q.device, q.dtype)

    def grid(meta):
        return (g, hkv, _cdiv(m, meta["BLOCK_M"]))

    kern._shared_prefix_attention_bwd_dq_kernel[grid](
        q=q, k=k, v=v, sv=valid, pk=prefix_k, pv=prefix_v, pm=prefix_ok,
        ck=common_k, cv=common_v, cm=common_ok, do=do, lse=lse, delta=delta, dq=dq,
        scale=scale, P=rows_per_group, NREP=n_rep, T=t, S=s, L=length, C=c, D=d, M=m,
        **_query_side_strides(q, k, v, prefix_k, prefix_v, common_k, common_v, do),
        M_BUCKET=tune_bucket(m), **dot_args(q.dtype), BLOCK_D=_block_d(d))
    return dq


def _dkdv(q, do, lse, delta, keys, values, ok, groups: int, rows_per_group: int,
          key_rows: int, suffix: bool, scale: float):
    """dk, dv of one key set [groups * key_rows, Hkv, width, D]: ``groups`` groups of
    ``rows_per_group`` query rows, each group with ``key_rows`` key rows of ``width``
    slots. Zeros without launching when the key set is empty (width 0)."""
    from fastlatent.kernels import shared_prefix_attention as kern

    if keys.shape[2] == 0:
        return torch.zeros_like(keys), torch.zeros_like(values)
    _, h, t, d = q.shape
    hkv, width = keys.shape[1], keys.shape[2]
    n_rep = h // hkv
    m = rows_per_group * n_rep * t
    gk = _alloc(tuple(keys.shape), keys.device, keys.dtype)
    gv = _alloc(tuple(values.shape), values.device, values.dtype)

    def grid(meta):
        return (groups, hkv, _cdiv(key_rows * width, meta["BLOCK_N"]))

    kern._shared_prefix_attention_bwd_dkdv_kernel[grid](
        q=q, k=keys, v=values, ok=ok, do=do, lse=lse, delta=delta, dk=gk, dv=gv,
        scale=scale, P=rows_per_group, NREP=n_rep, T=t, S=width if suffix else 0, NK=width,
        KP=key_rows, D=d, M=m,
        stride_q0=q.stride(0), stride_q1=q.stride(1), stride_q2=q.stride(2),
        stride_k0=keys.stride(0), stride_k1=keys.stride(1), stride_k2=keys.stride(2),
        stride_v0=values.stride(0), stride_v1=values.stride(1), stride_v2=values.stride(2),
        stride_o0=do.stride(0), stride_o1=do.stride(1), stride_o2=do.stride(2),
        M_BUCKET=tune_bucket(m), KEYS_BUCKET=tune_bucket(key_rows * width), SUFFIX=suffix,
        **dot_args(q.dtype), BLOCK_D=_block_d(d))
    return gk, gv


def _shared_prefix_attention_bwd(grad_out, q, k, v, valid, prefix_k, prefix_v, prefix_ok,
                                 common_k, common_v, common_ok, out, lse,
                                 rows_per_group: int, scale: float, needs: tuple[bool, ...]):
    """Triton backward: (dq, dk, dv, dprefix_k, dprefix_v, dcommon_k, dcommon_v), None
    where not needed (``needs``: 7 flags in that order). A key set's dk and dv come from
    one launch, so both are returned when either is needed."""
    need_q, need_k, need_v, need_pk, need_pv, need_ck, need_cv = needs
    r = q.shape[0]
    g = prefix_k.shape[0]
    do = grad_out.contiguous()  # same layout as out (contiguous)
    delta = (do.float() * out.float()).sum(-1)  # [R, H, T] fp32
    dq = dk = dv = dpk = dpv = dck = dcv = None
    if need_q:
        dq = _dq(q, k, v, valid, prefix_k, prefix_v, prefix_ok, common_k, common_v,
                 common_ok, do, lse, delta, rows_per_group, scale)
    if need_k or need_v:  # suffix keys: each group's rows, one key row per query row
        dk, dv = _dkdv(q, do, lse, delta, k, v, valid, groups=g,
                       rows_per_group=rows_per_group, key_rows=rows_per_group, suffix=True,
                       scale=scale)
    if need_pk or need_pv:  # prompt keys: one key row per group
        dpk, dpv = _dkdv(q, do, lse, delta, prefix_k, prefix_v, prefix_ok, groups=g,
                         rows_per_group=rows_per_group, key_rows=1, suffix=False, scale=scale)
    if need_ck or need_cv:  # common keys: one group of all R rows, one key row
        dck, dcv = _dkdv(q, do, lse, delta, common_k, common_v, common_ok, groups=1,
                         rows_per_group=r, key_rows=1, suffix=False, scale=scale)
    return dq, dk, dv, dpk, dpv, dck, dcv


class _SharedPrefixAttentionFn(torch.autograd.Function):
    """Triton path (forward and backward)."""

    @staticmethod
    def forward(ctx, q, k, v, suffix_valid, prefix_k, prefix_v, prefix_mask, common_k,
                common_v, rows_per_group: int, scale: float):
        common_k, common_v, common_ok = _common_or_empty(common_k, common_v, prefix_k, prefix_v)
        q, k, v, prefix_k, prefix_v, common_k, common_v = map(
            _unit_inner, (q, k, v, prefix_k, prefix_v, common_k, common_v))
        valid = (suffix_valid != 0).to(torch.int8).contiguous()
        prefix_ok = (prefix_mask != 0).to(torch.int8).contiguous()
        if q.shape[0] == 0 or q.shape[-1] == 0:
            out = shared_prefix_attention_torch(q, k, v, suffix_valid, prefix_k, prefix_v,
                                                prefix_mask, rows_per_group, scale=scale,
                                                common_k=common_k, common_v=common_v)
            lse = torch.full(q.shape[:3], float("-inf"), device=q.device)
        else:
            out, lse = _shared_prefix_attention_fwd(q, k, v, valid, prefix_k, prefix_v,
                                                    prefix_ok, common_k, common_v, common_ok,
                                                    rows_per_group, scale)
        ctx.save_for_backward(q, k, v, valid, prefix_k, prefix_v, prefix_ok, common_k,
                              common_v, common_ok, out, lse)
        ctx.rows_per_group, ctx.scale = rows_per_group, scale
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        (q, k, v, valid, prefix_k, prefix_v, prefix_ok, common_k, common_v, common_ok,
         out, lse) = ctx.saved_tensors
        # common_k / common_v given as None never need a gradient
        (need_q, need_k, need_v, _, need_pk, need_pv, _, need_ck, need_cv, _,
         _) = ctx.needs_input_grad
        needs = (need_q, need_k, need_v, need_pk, need_pv, need_ck, need_cv)
        if q.numel() == 0:
            grads = tuple(torch.zeros_like(x) if need else None for x, need in zip(
                (q, k, v, prefix_k, prefix_v, common_k, common_v), needs, strict=True))
        else:
            grads = _shared_prefix_attention_bwd(
                grad_out, q, k, v, valid, prefix_k, prefix_v, prefix_ok, common_k, common_v,
                common_ok, out, lse, ctx.rows_per_group, ctx.scale, needs)
        dq, dk, dv, dpk, dpv, dck, dcv = (gr if need else None
                                          for gr, need in zip(grads, needs, strict=True))
        return (dq,    # q
                dk,    # k
                dv,    # v
                None,  # suffix_valid
                dpk,   # prefix_k
                dpv,   # prefix_v
                None,  # prefix_mask
                dck,   # common_k
                dcv,   # common_v
                None,  # rows_per_group
                None)  # scale


def shared_prefix_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            suffix_valid: torch.Tensor, prefix_k: torch.Tensor,
                            prefix_v: torch.Tensor, prefix_mask: torch.Tensor,
                            rows_per_group: int, *, scale: float,
                            common_k: torch.Tensor | None = None,
                            common_v: torch.Tensor | None = None,
                            backend: str | None = None) -> torch.Tensor:
    """Attention of R suffix rows over the batch's common keys, their group's shared
    prompt and their own suffix.

    Args:
        q: [R, H, T, D] queries of the T newest suffix tokens of each row.
        k, v: [R, Hkv, S, D] each row's suffix keys/values, S >= T; the last T belong to
            the queries, the first S-T are cached from earlier steps. H = Hkv * n_rep
            (query head h uses kv head h // n_rep).
        suffix_valid: [R, S] bool, which suffix key slots are real.
        prefix_k, prefix_v: [G, Hkv, L, D] the prompts' keys/values.
        prefix_mask: [G, L], nonzero = real prompt token (any padding layout).
        rows_per_group: R = G * rows_per_group; row r belongs to prompt r // rows_per_group.
        scale: multiplies q·k (usually head_dim ** -0.5).
        common_k, common_v: [1, Hkv, C, D] keys/values every row of every group sees
            before its prompt's (the prompts' common start; every slot real), or None.
        backend: "auto" | "triton" | "torch" (None: $FASTLATENT_BACKEND, then auto).

    Query t of row r attends to every common key, every real token of its prompt and the
    valid suffix keys 0..S-T+t of row r. Returns [R, H, T, D] in q's dtype; a query whose
    own slot is padding gets a finite, meaningless value. Differentiable in q, k, v,
    prefix_k, prefix_v, common_k and common_v.
    """
    _check_inputs(q, k, v, suffix_valid, prefix_k, prefix_v, prefix_mask, rows_per_group,
                  common_k, common_v)
    use_triton = (resolve_backend(q.device, backend, available=("torch", "triton")) == "triton"
                  and q.dtype in _TRITON_DTYPES)
    if use_triton:
        return _SharedPrefixAttentionFn.apply(q, k, v, suffix_valid, prefix_k, prefix_v,
                                              prefix_mask, common_k, common_v, rows_per_group,
                                              float(scale))
    return shared_prefix_attention_torch(q, k, v, suffix_valid, prefix_k, prefix_v,
                                         prefix_mask, rows_per_group, scale=scale,
                                         common_k=common_k, common_v=common_v)
