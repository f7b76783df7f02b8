"""Fused log-prob head: per-token ``log softmax(h W^T)[target]`` without ``[N, V]`` logits.

The LM-head product is taken over vocabulary tiles with an online log-sum-exp, every row
of the call against each tile (so the weight is read once per call, not once per row
chunk); accumulation in float32. Backward recomputes each tile's logits from the saved
per-row log-sum-exp:

    d logp_n / d h_n = W[t_n] - sum_v p_nv W_v,   d logp_n / d W_v = (1[v = t_n] - p_nv) h_n

Targets equal to -100 are ignored (log-prob 0, no gradient).

Two backends (``resolve_backend``): the PyTorch path below, and Triton kernels
(``kernels/fused_logprob.py``, imported on first use only) that run on CUDA, or on the CPU
under ``TRITON_INTERPRET=1``. The Triton path takes fp32, fp16 and bf16 inputs (other
dtypes use the PyTorch path); its tile sizes come from the kernels' autotune configs, so
``vocab_tile`` only applies to the PyTorch path.
"""

from __future__ import annotations

import functools

import torch

from fastlatent.ops._backend import checks_values, resolve_backend
from fastlatent.ops._launch import alloc as _alloc
from fastlatent.ops._launch import cdiv as _cdiv
from fastlatent.ops._launch import dot_args

IGNORE_INDEX = -100
VOCAB_TILE = 8192


def _check_inputs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> None:
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"expected hidden [N, D] and weight [V, D], got "
                         f"{tuple(hidden.shape)} and {tuple(weight.shape)}")
    if targets.shape != hidden.shape[:1] or targets.dtype != torch.long:
        raise ValueError(f"expected int64 targets [{hidden.shape[0]}], got "
                         f"{targets.dtype} {tuple(targets.shape)}")
    if not (hidden.device == weight.device == targets.device):
        raise ValueError(f"expected hidden, weight and targets on one device, got "
                         f"{hidden.device}, {weight.device}, {targets.device}")
    if not (hidden.is_floating_point() and weight.is_floating_point()):
        raise ValueError(f"expected floating-point hidden and weight, got "
                         f"{hidden.dtype} and {weight.dtype}")
    if not checks_values(targets):  # reading targets' values would sync with the GPU
        return
    valid = targets[targets != IGNORE_INDEX]
    if valid.numel() and (int(valid.min()) < 0 or int(valid.max()) >= weight.shape[0]):
        raise ValueError(f"expected targets in [0, {weight.shape[0]}) or {IGNORE_INDEX}, got "
                         f"values in [{int(valid.min())}, {int(valid.max())}]")


def _fused_logprob_fwd_torch(hidden: torch.Tensor, weight: torch.Tensor,
                             targets: torch.Tensor,
                             vocab_tile: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (logp [N] fp32 with 0 at ignored rows, lse [N] fp32)."""
    h = hidden.float()
    n, v = h.shape[0], weight.shape[0]
    running_max = torch.full((n,), float("-inf"), device=h.device)
    running_sum = torch.zeros(n, device=h.device)
    target_logit = torch.zeros(n, device=h.device)
    safe_targets = targets.clamp_min(0)
    for start in range(0, v, vocab_tile):
        tile = h @ weight[start:start + vocab_tile].float().T  # [N, tile]
        new_max = torch.maximum(running_max, tile.amax(-1))
        running_sum = running_sum * torch.exp(running_max - new_max) + torch.exp(
            tile - new_max[:, None]).sum(-1)
        running_max = new_max
        inside = (safe_targets >= start) & (safe_targets < start + tile.shape[1])
        local = (safe_targets - start).clamp(0, tile.shape[1] - 1)
        target_logit = torch.where(inside, tile.gather(1, local[:, None])[:, 0], target_logit)
    lse = running_max + torch.log(running_sum)
    logp = torch.where(targets == IGNORE_INDEX, torch.zeros_like(lse), target_logit - lse)
    return logp, lse


def _fused_logprob_bwd_torch(grad_logp: torch.Tensor, hidden: torch.Tensor,
                             weight: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor,
                             vocab_tile: int, need_hidden: bool, need_weight: bool):
    h = hidden.float()
    g = torch.where(targets == IGNORE_INDEX, torch.zeros_like(grad_logp), grad_logp.float())
    grad_h = torch.zeros_like(h) if need_hidden else None
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
        if need_weight else None
    for start in range(0, weight.shape[0], vocab_tile):
        w_tile = weight[start:start + vocab_tile].float()
        p = torch.exp(h @ w_tile.T - lse[:, None]) * g[:, None]  # [N, tile] = g * softmax
        if need_hidden:
            grad_h -= p @ w_tile
        if need_weight:
            grad_w[start:start + vocab_tile] -= p.T @ h
    valid = targets != IGNORE_INDEX
    rows, tgt = valid.nonzero()[:, 0], targets[valid]
    if need_hidden:
        grad_h[rows] += g[rows, None] * weight[tgt].float()
    if need_weight:
        grad_w.index_add_(0, tgt, g[rows, None] * h[rows])
    return (grad_h.to(hidden.dtype) if need_hidden else None,
            grad_w.to(weight.dtype) if need_weight else None)


def fused_logprob_torch(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                        vocab_tile: int = VOCAB_TILE) -> torch.Tensor:
    """PyTorch implementation of :func:`fused_logprob` (tiled over the vocabulary)."""
    return _FusedLogprobFn.apply(hidden, weight, targets, "torch", None, vocab_tile)


# ---------------------------------------------------------------------------- Triton path

_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MIN_SPLIT_V = 2048          # fewest vocabulary entries per split of the row-block grid
_COEF_BYTES = 1 << 28        # cap on the backward's [rows, V] coefficient chunk


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _vocab_splits(n_rows: int, v: int, device: torch.device, min_block_n: int) -> int:
    """Vocabulary splits so that row blocks x splits covers ~2 programs per SM (1 off GPU:
    the interpreter runs programs one after another)."""
    if device.type != "cuda":
        return 1
    index = device.index if device.index is not None else torch.cuda.current_device()
    row_blocks = _cdiv(n_rows, min_block_n)
    return max(1, min(_cdiv(2 * _sm_count(index), row_blocks), v // _MIN_SPLIT_V))


def _logit_args(hidden: torch.Tensor, weight: torch.Tensor) -> dict:
    """PRECISION and OPERAND of the logits GEMM: fp16/bf16 inputs of one dtype enter it as
    they are on the GPU (exact: their products fit fp32); anything else as fp32."""
    args = dot_args(hidden.dtype if hidden.dtype == weight.dtype else torch.float32)
    return dict(PRECISION=args["PRECISION"], OPERAND=args["OPERAND"])


def _fused_logprob_fwd(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                       num_splits: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton forward. Inputs have unit inner stride. Returns (logp [N] fp32 with 0 at
    ignored rows, lse [N] fp32). ``num_splits`` overrides the vocabulary split count."""
    from fastlatent.kernels import fused_logprob as kern

    n, d = hidden.shape
    v = weight.shape[0]
    logp, lse = _alloc((n,), hidden.device), _alloc((n,), hidden.device)
    if n == 0:
        return logp, lse
    s = num_splits or _vocab_splits(n, v, hidden.device,
                                    min(c.kwargs["BLOCK_N"] for c in kern.CONFIGS))
    part = _alloc((3, s, n), hidden.device)  # running max, sum of exp, target logit

    def grid(meta):
        return (_cdiv(n, meta["BLOCK_N"]), s)

    kern._fused_logprob_fwd_kernel[grid](
        h=hidden, w=weight, t=targets, m_part=part[0], l_part=part[1], z_part=part[2], N=n,
        V=v, D=d, stride_hn=hidden.stride(0), stride_wv=weight.stride(0),
        **_logit_args(hidden, weight))

    def grid_rows(meta):
        return (_cdiv(n, meta["BLOCK_N"]),)

    kern._fused_logprob_combine_kernel[grid_rows](
        m_part=part[0], l_part=part[1], z_part=part[2], t=targets, logp=logp, lse=lse, N=n,
        S=s, BLOCK_S=max(2, 1 << (s - 1).bit_length()))
    return logp, lse


def _coef_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype the backward's coefficients c are stored in and its GEMMs run in: bf16
    when both inputs are bf16 (bf16 has fp32's exponent range, so even the smallest
    probabilities survive; c is rounded once, 2^-9 relative, like the bf16 gradient it
    makes), fp32 otherwise (fp16 would flush probabilities below 6e-8 to zero: up to
    V x 6e-8 of the softmax mass lost)."""
    low = hidden.dtype == weight.dtype == torch.bfloat16
    return torch.bfloat16 if low else torch.float32


def _row_chunk(n: int, v: int, dtype: torch.dtype) -> int:
    """Rows per coefficient chunk: [rows, V] coefficients within ``_COEF_BYTES``, a
    multiple of 128 rows (the largest row tile) when there is room for one."""
    rows = max(1, _COEF_BYTES // (v * torch.finfo(dtype).bits // 8))
    return max(1, min(n, rows if rows < 128 else rows // 128 * 128))


def _fused_logprob_bwd(grad_logp: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor,
                       targets: torch.Tensor, lse: torch.Tensor, need_hidden: bool,
                       need_weight: bool):
    """Triton backward: (grad_hidden or None, grad_weight or None) in the input dtypes.

    For each chunk of rows the coefficient kernel writes c [rows, V] (``_coef_dtype``) and
    two GEMMs apply it: dh[rows] = c W (each row's gradient made whole by one GEMM, fp32
    accumulation inside it), dW += c^T h[rows] (one chunk: written directly; several:
    summed in fp32). Traffic per chunk: c written once and read once per GEMM. The
    coefficient grid is rows x vocabulary tiles: no vocabulary splits here."""
    from fastlatent.kernels import fused_logprob as kern

    n, d = hidden.shape
    v = weight.shape[0]
    dtype = _coef_dtype(hidden, weight)
    g = grad_logp.float().contiguous()
    w_gemm = weight.to(dtype) if need_hidden else None  # a copy only for fp16 inputs
    h_gemm = hidden.to(dtype) if need_weight else None
    grad_h = torch.empty((n, d), dtype=dtype, device=hidden.device) if need_hidden else None
    grad_w = None
    logit = _logit_args(hidden, weight)
    step = _row_chunk(n, v, dtype)
    chunks = range(0, n, step)
    for start in chunks:
        rows = slice(start, min(n, start + step))
        count = rows.stop - rows.start
        c = _alloc((count, v), hidden.device, dtype)

        def grid(meta, count=count):
            return (_cdiv(count, meta["BLOCK_N"]), _cdiv(v, meta["BLOCK_V"]))

        kern._fused_logprob_bwd_coef_kernel[grid](
            h=hidden[rows], w=weight, t=targets[rows], lse=lse[rows], g=g[rows], c=c, N=count,
            V=v, D=d, stride_hn=hidden.stride(0), stride_wv=weight.stride(0),
            stride_cn=c.stride(0), **logit, ROUND_TO=dot_args(dtype)["ROUND_TO"])
        if need_hidden:
            torch.mm(c, w_gemm, out=grad_h[rows])
        if need_weight:
            grad_w = _add_grad_weight(grad_w, c, h_gemm[rows], several=len(chunks) > 1)
    if need_hidden:
        grad_h = grad_h.to(hidden.dtype)
    if need_weight:
        grad_w = weight.new_zeros(weight.shape) if grad_w is None else grad_w.to(weight.dtype)
    return grad_h, grad_w


def _add_grad_weight(grad_w: torch.Tensor | None, c: torch.Tensor, h: torch.Tensor,
                     several: bool) -> torch.Tensor:
    """dW (+)= c^T h for one chunk of rows; an fp32 sum when there are several chunks."""
    part = c.T @ h
    if not several:
        return part
    return part.float() if grad_w is None else grad_w.add_(part)


class _FusedLogprobFn(torch.autograd.Function):
    """Both backends: forward saves the per-row log-sum-exp, backward recomputes each
    vocabulary tile from it. ``num_splits``: the Triton forward's vocabulary split count
    (None = by device); ``vocab_tile``: the torch path's vocabulary tile. Each backend
    ignores the other's."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, backend: str, num_splits: int | None = None,
                vocab_tile: int = VOCAB_TILE):
        if backend == "triton":
            hidden = hidden if hidden.stride(-1) == 1 else hidden.contiguous()
            weight = weight if weight.stride(-1) == 1 else weight.contiguous()
            targets = targets.contiguous()
            logp, lse = _fused_logprob_fwd(hidden, weight, targets, num_splits)
        else:
            logp, lse = _fused_logprob_fwd_torch(hidden, weight, targets, vocab_tile)
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.backend = backend
        ctx.vocab_tile = vocab_tile
        return logp

    @staticmethod
    def backward(ctx, grad_logp):
        hidden, weight, targets, lse = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        if ctx.backend == "triton":
            grad_h, grad_w = _fused_logprob_bwd(grad_logp, hidden, weight, targets, lse,
                                                need_hidden, need_weight)
        else:
            grad_h, grad_w = _fused_logprob_bwd_torch(grad_logp, hidden, weight, targets, lse,
                                                      ctx.vocab_tile, need_hidden, need_weight)
        return (grad_h,  # hidden
                grad_w,  # weight
                None,    # targets
                None,    # backend
                None,    # num_splits
                None)    # vocab_tile


def fused_logprob(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                  backend: str | None = None, vocab_tile: int = VOCAB_TILE) -> torch.Tensor:
    """Per-token log p(target) without materialising logits.

    Args: hidden [N, D], weight [V, D] (the LM head), targets [N] int64 (-100 = ignore).
    Returns: logp [N] float32 (0 at ignored rows); differentiable in hidden and weight.
    ``backend`` ("auto" | "triton" | "torch", default ``$FASTLATENT_BACKEND``) picks the
    implementation; ``vocab_tile`` is the PyTorch path's tile (Triton tiles are autotuned).
    """
    _check_inputs(hidden, weight, targets)
    if vocab_tile < 1:
        raise ValueError(f"expected vocab_tile >= 1, got {vocab_tile}")
    use_triton = (resolve_backend(hidden.device, backend, available=("torch", "triton")) == "triton"
                  and hidden.dtype in _TRITON_DTYPES and weight.dtype in _TRITON_DTYPES)
    if use_triton:
        return _FusedLogprobFn.apply(hidden, weight, targets, "triton", None, VOCAB_TILE)
    return fused_logprob_torch(hidden, weight, targets, vocab_tile=vocab_tile)
