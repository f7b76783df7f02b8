"""Triton kernels of the fused log-prob head (device code only).

Launchers, the autograd wrapper and the PyTorch path live in
``fastlatent/ops/fused_logprob.py``. Per row n with target t_n (-100 = ignored), logits
s_nv = h_n . W_v over the vocabulary, upstream gradient g_n:

    lse_n  = log sum_v exp(s_nv)                       online over vocabulary tiles
    logp_n = s_{n, t_n} - lse_n                        0 at ignored rows
    c_nv   = g_n (1[v = t_n] - exp(s_nv - lse_n))      g_n := 0 at ignored rows
    dh_n   = sum_v c_nv W_v          dW_v = sum_n c_nv h_n

Work split. The forward and the grad-hidden kernel run on a (row blocks, vocabulary
splits) grid: each program takes BLOCK_N rows against a contiguous run of BLOCK_V vocab
tiles, so a small batch (RL: ~300 rows) still fills the GPU. The forward writes per-split
(max, sum of exp, target logit) partials that ``_fused_logprob_combine_kernel`` merges by
log-sum-exp; grad-hidden writes one fp32 partial per split, summed by the launcher. The
grad-weight kernel owns BLOCK_V vocabulary rows per program and loops over every row
block, so no atomics are needed and every result is deterministic.

Dtype policy: every load is converted to fp32 right after ``tl.load`` (the interpreter's
bf16 arithmetic is wrong, and fp32 is the accumulation dtype anyway); logits, running max
and sum, c and both gradients accumulate in fp32. ``tl.dot`` precision is a constexpr
chosen by the launcher: "tf32" is exact for fp16/bf16 operands (their mantissas fit in
TF32), "tf32x3" keeps fp32 accuracy for fp32 operands on tensor cores.

Loops. The hidden size D has a runtime value, so gradient accumulators over D cannot live
in registers: the grad kernels keep their fp32 accumulators in global memory, each region
owned by one program (zeroed by that program first, read-modify-written per tile, with a
``tl.debug_barrier`` between a tile's stores and the next tile's loads, since the threads
that store an element need not be the ones that load it back). Loop bounds are runtime
tensors (``range(lo, hi)``, ``range(0, tl.cdiv(D, BLOCK_D))``): this pipelines on the GPU;
under the interpreter it needs Triton >= 3.7 or numpy < 2.4 (older interpreters call
``int()`` on a one-element array, which numpy 2.4 rejects — any ``range`` over a runtime
value fails there, the ``tl.cdiv`` form included; only ``while`` loops survive, and they
do not pipeline on the GPU).
"""

import os

import triton
import triton.language as tl

# Tile sizes live here only. One config under the interpreter (autotune with several
# configs needs a GPU driver); the interpreter is slow, so its tiles are small.
if os.environ.get("TRITON_INTERPRET") == "1":
    CONFIGS = [triton.Config({"BLOCK_N": 16, "BLOCK_V": 64, "BLOCK_D": 32})]
    DH_CONFIGS = DW_CONFIGS = CONFIGS
    COMBINE_CONFIGS = [triton.Config({"BLOCK_N": 16})]
else:
    def _tile(n: int, v: int, d: int, warps: int, stages: int) -> triton.Config:
        return triton.Config({"BLOCK_N": n, "BLOCK_V": v, "BLOCK_D": d}, num_warps=warps,
                             num_stages=stages)

    # benchmarks/compile_check.py (Triton 3.9, LatentR3 shapes, benchmarks/RESULTS.md):
    # with bf16 inputs the forward never spills; the gradient kernels keep only the tiles
    # that compile without spills on sm_80 and sm_90 (on sm_80 grad-hidden spilled 40 B
    # at BLOCK_N = 32, grad-weight 64-416 B at the three larger tiles). With fp16/fp32
    # inputs the gradients use 3xTF32 and spill at every tile (up to ~1 KB per thread on
    # sm_90, far more on sm_80): the price of fp32-accurate gradients for those dtypes.
    CONFIGS = [_tile(64, 128, 64, 8, 3), _tile(128, 128, 32, 8, 3), _tile(64, 64, 64, 4, 3),
               _tile(64, 64, 32, 4, 4), _tile(32, 64, 64, 4, 3)]
    DH_CONFIGS = CONFIGS[:4]
    DW_CONFIGS = CONFIGS[3:]
    COMBINE_CONFIGS = [triton.Config({"BLOCK_N": 32}, num_warps=4)]

IGNORE_INDEX: tl.constexpr = tl.constexpr(-100)
# tl.dot operand types of the logits GEMM, by torch dtype name (see _logits_tile).
LOGIT_OPERANDS = {"float32": tl.float32, "float16": tl.float16, "bfloat16": tl.bfloat16}


@triton.jit
def _logits_tile(h, w, o_n, m_n, o_v, m_v, D, stride_hn, stride_wv,
                 PRECISION: tl.constexpr, OPERAND: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    """fp32 logits [BLOCK_N, BLOCK_V] of rows o_n against vocab rows o_v; -inf where o_v
    is past V. The operands enter ``tl.dot`` as OPERAND: the inputs' own fp16/bf16 on the
    GPU (exact: their products fit fp32, and tensor cores run them at twice the TF32
    rate), fp32 under the interpreter and for fp32 inputs."""
    b_s = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    for i_d in range(0, tl.cdiv(D, BLOCK_D)):
        o_d = i_d * BLOCK_D + tl.arange(0, BLOCK_D)
        m_d = o_d < D
        # [BN, BD]
        b_h = tl.load(h + o_n[:, None] * stride_hn + o_d[None, :],
                      mask=m_n[:, None] & m_d[None, :], other=0.).to(OPERAND)
        # [BV, BD]
        b_w = tl.load(w + o_v[:, None] * stride_wv + o_d[None, :],
                      mask=m_v[:, None] & m_d[None, :], other=0.).to(OPERAND)
        b_s = tl.dot(b_h, tl.trans(b_w), b_s, input_precision=PRECISION)
    return tl.where(m_v[None, :], b_s, float("-inf"))


@triton.jit
def _coef_tile(b_s, b_lse, b_g, b_t, o_v):
    """c = g (1[v = t] - exp(s - lse)), [BN, BV] fp32; 0 where s = -inf and g = 0."""
    b_p = tl.exp(b_s - b_lse[:, None])
    b_hit = tl.where(o_v[None, :] == b_t[:, None], 1., 0.)
    return b_g[:, None] * (b_hit - b_p)


@triton.jit
def _split_tiles(V, i_s, BLOCK_V: tl.constexpr):
    """[lo, hi) vocabulary tiles of split i_s out of tl.num_programs(1) splits."""
    n_tiles = tl.cdiv(V, BLOCK_V)
    per_split = tl.cdiv(n_tiles, tl.num_programs(1))
    lo = i_s * per_split
    hi = tl.minimum(lo + per_split, n_tiles)
    return lo, hi


@triton.autotune(configs=CONFIGS, key=["V", "D"])
@triton.jit
def _fused_logprob_fwd_kernel(h, w, t, m_part, l_part, z_part, N, V, D, stride_hn, stride_wv,
                              LOGIT_PRECISION: tl.constexpr, LOGIT_OPERAND: tl.constexpr,
                              BLOCK_N: tl.constexpr,
                              BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    """Grid (row blocks, splits). Writes, for its rows and its split's tiles, the running
    max m, sum l = sum_v exp(s_nv - m) and the target logit z (0 if the target is in
    another split) to the [splits, N] partials."""
    i_n = tl.program_id(0).to(tl.int64)
    i_s = tl.program_id(1).to(tl.int64)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < N
    b_t = tl.load(t + o_n, mask=m_n, other=IGNORE_INDEX)
    lo, hi = _split_tiles(V, i_s, BLOCK_V)

    b_m = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([BLOCK_N], dtype=tl.float32)
    b_z = tl.zeros([BLOCK_N], dtype=tl.float32)
    for i_v in range(lo, hi):
        o_v = i_v * BLOCK_V + tl.arange(0, BLOCK_V)
        m_v = o_v < V
        # [BN, BV]
        b_s = _logits_tile(h, w, o_n, m_n, o_v, m_v, D, stride_hn, stride_wv,
                           LOGIT_PRECISION, LOGIT_OPERAND, BLOCK_N, BLOCK_V, BLOCK_D)
        b_mn = tl.maximum(b_m, tl.max(b_s, 1))  # finite: every tile has a column < V
        b_l = b_l * tl.exp(b_m - b_mn) + tl.sum(tl.exp(b_s - b_mn[:, None]), 1)
        b_m = b_mn
        b_z += tl.sum(tl.where(o_v[None, :] == b_t[:, None], b_s, 0.), 1)

    o_p = i_s * N + o_n
    tl.store(m_part + o_p, b_m, mask=m_n)
    tl.store(l_part + o_p, b_l, mask=m_n)
    tl.store(z_part + o_p, b_z, mask=m_n)


@triton.autotune(configs=COMBINE_CONFIGS, key=["BLOCK_S"])
@triton.jit
def _fused_logprob_combine_kernel(m_part, l_part, z_part, t, logp, lse, N, S,
                                  BLOCK_S: tl.constexpr, BLOCK_N: tl.constexpr):
    """Grid (row blocks). lse = M + log sum_s l_s exp(m_s - M), M = max_s m_s;
    logp = sum_s z_s - lse (0 at ignored rows). Empty splits carry m = -inf, l = 0."""
    i_n = tl.program_id(0).to(tl.int64)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < N
    o_s = tl.arange(0, BLOCK_S).to(tl.int64)
    m_s = o_s < S
    o_p = o_s[:, None] * N + o_n[None, :]
    m_p = m_s[:, None] & m_n[None, :]
    # [BS, BN]
    b_m = tl.load(m_part + o_p, mask=m_p, other=float("-inf"))
    b_l = tl.load(l_part + o_p, mask=m_p, other=0.)
    b_z = tl.load(z_part + o_p, mask=m_p, other=0.)
    # rows past N: max 0 and sum 1, not -inf - -inf and log 0
    b_mx = tl.where(m_n, tl.max(b_m, 0), 0.)
    b_sum = tl.where(m_n, tl.sum(b_l * tl.exp(b_m - b_mx[None, :]), 0), 1.)
    b_lse = b_mx + tl.log(b_sum)
    b_t = tl.load(t + o_n, mask=m_n, other=IGNORE_INDEX)
    b_logp = tl.where(b_t == IGNORE_INDEX, 0., tl.sum(b_z, 0) - b_lse)
    tl.store(lse + o_n, b_lse, mask=m_n)
    tl.store(logp + o_n, b_logp, mask=m_n)


@triton.autotune(configs=DH_CONFIGS, key=["V", "D"])
@triton.jit
def _fused_logprob_bwd_dh_kernel(h, w, t, lse, g, dh_part, N, V, D, stride_hn, stride_wv,
                                 LOGIT_PRECISION: tl.constexpr, LOGIT_OPERAND: tl.constexpr,
                                 GRAD_PRECISION: tl.constexpr,
                                 BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                                 BLOCK_D: tl.constexpr):
    """Grid (row blocks, splits). dh_part[split, n] = sum over the split's v of c_nv W_v,
    fp32 [splits, N, D] (contiguous); the launcher sums the splits."""
    i_n = tl.program_id(0).to(tl.int64)
    i_s = tl.program_id(1).to(tl.int64)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < N
    b_t = tl.load(t + o_n, mask=m_n, other=IGNORE_INDEX)
    b_lse = tl.load(lse + o_n, mask=m_n, other=0.)
    b_g = tl.load(g + o_n, mask=m_n, other=0.).to(tl.float32)
    b_g = tl.where(b_t == IGNORE_INDEX, 0., b_g)
    lo, hi = _split_tiles(V, i_s, BLOCK_V)
    p_dh = dh_part + i_s * N * D

    for i_d in range(0, tl.cdiv(D, BLOCK_D)):
        o_d = i_d * BLOCK_D + tl.arange(0, BLOCK_D)
        tl.store(p_dh + o_n[:, None] * D + o_d[None, :],
                 tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32),
                 mask=m_n[:, None] & (o_d < D)[None, :])
    tl.debug_barrier()
    for i_v in range(lo, hi):
        o_v = i_v * BLOCK_V + tl.arange(0, BLOCK_V)
        m_v = o_v < V
        b_s = _logits_tile(h, w, o_n, m_n, o_v, m_v, D, stride_hn, stride_wv,
                           LOGIT_PRECISION, LOGIT_OPERAND, BLOCK_N, BLOCK_V, BLOCK_D)
        b_c = _coef_tile(b_s, b_lse, b_g, b_t, o_v)  # [BN, BV]
        for i_d in range(0, tl.cdiv(D, BLOCK_D)):
            o_d = i_d * BLOCK_D + tl.arange(0, BLOCK_D)
            m_d = o_d < D
            # [BV, BD]
            b_w = tl.load(w + o_v[:, None] * stride_wv + o_d[None, :],
                          mask=m_v[:, None] & m_d[None, :], other=0.).to(tl.float32)
            p_acc = p_dh + o_n[:, None] * D + o_d[None, :]
            m_acc = m_n[:, None] & m_d[None, :]
            b_dh = tl.load(p_acc, mask=m_acc, other=0.)  # [BN, BD]
            b_dh = tl.dot(b_c, b_w, b_dh, input_precision=GRAD_PRECISION)
            tl.store(p_acc, b_dh, mask=m_acc)
        tl.debug_barrier()


@triton.autotune(configs=DW_CONFIGS, key=["V", "D"])
@triton.jit
def _fused_logprob_bwd_dw_kernel(h, w, t, lse, g, dw, N, V, D, stride_hn, stride_wv,
                                 LOGIT_PRECISION: tl.constexpr, LOGIT_OPERAND: tl.constexpr,
                                 GRAD_PRECISION: tl.constexpr,
                                 BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                                 BLOCK_D: tl.constexpr):
    """Grid (vocab tiles). dw[v] = sum_n c_nv h_n for the program's BLOCK_V rows, fp32
    [V, D] (contiguous), every row block visited in order."""
    i_v = tl.program_id(0).to(tl.int64)
    o_v = i_v * BLOCK_V + tl.arange(0, BLOCK_V)
    m_v = o_v < V

    for i_d in range(0, tl.cdiv(D, BLOCK_D)):
        o_d = i_d * BLOCK_D + tl.arange(0, BLOCK_D)
        tl.store(dw + o_v[:, None] * D + o_d[None, :],
                 tl.zeros([BLOCK_V, BLOCK_D], dtype=tl.float32),
                 mask=m_v[:, None] & (o_d < D)[None, :])
    tl.debug_barrier()
    for i_n in range(0, tl.cdiv(N, BLOCK_N)):
        o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
        m_n = o_n < N
        b_t = tl.load(t + o_n, mask=m_n, other=IGNORE_INDEX)
        b_lse = tl.load(lse + o_n, mask=m_n, other=0.)
        b_g = tl.load(g + o_n, mask=m_n, other=0.).to(tl.float32)
        b_g = tl.where(b_t == IGNORE_INDEX, 0., b_g)
        b_s = _logits_tile(h, w, o_n, m_n, o_v, m_v, D, stride_hn, stride_wv,
                           LOGIT_PRECISION, LOGIT_OPERAND, BLOCK_N, BLOCK_V, BLOCK_D)
        b_c = _coef_tile(b_s, b_lse, b_g, b_t, o_v)  # [BN, BV]
        for i_d in range(0, tl.cdiv(D, BLOCK_D)):
            o_d = i_d * BLOCK_D + tl.arange(0, BLOCK_D)
            m_d = o_d < D
            # [BN, BD]
            b_h = tl.load(h + o_n[:, None] * stride_hn + o_d[None, :],
                          mask=m_n[:, None] & m_d[None, :], other=0.).to(tl.float32)
            p_acc = dw + o_v[:, None] * D + o_d[None, :]
            m_acc = m_v[:, None] & m_d[None, :]
            b_dw = tl.load(p_acc, mask=m_acc, other=0.)  # [BV, BD]
            b_dw = tl.dot(tl.trans(b_c), b_h, b_dw, input_precision=GRAD_PRECISION)
            tl.store(p_acc, b_dw, mask=m_acc)
        tl.debug_barrier()
