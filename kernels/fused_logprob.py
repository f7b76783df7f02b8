"""Triton kernels of the fused log-prob head (device code only).

Launchers, the autograd wrapper and the PyTorch path live in
``fastlatent/ops/fused_logprob.py``. Per row n with target t_n (-100 = ignored), logits
s_nv = h_n . W_v over the vocabulary, upstream gradient g_n:

    lse_n  = log sum_v exp(s_nv)                       online over vocabulary tiles
    logp_n = s_{n, t_n} - lse_n                        0 at ignored rows
    c_nv   = g_n (1[v = t_n] - exp(s_nv - lse_n))      g_n := 0 at ignored rows
    dh_n   = sum_v c_nv W_v          dW_v = sum_n c_nv h_n

Forward. A (row blocks, vocabulary splits) grid: each program takes BLOCK_N rows against
a contiguous run of BLOCK_V vocab tiles, so a small batch (RL: ~300 rows) still fills the
GPU. It writes per-split (max, sum of exp, target logit) partials that
``_fused_logprob_combine_kernel`` merges by log-sum-exp.

Backward. ``_fused_logprob_bwd_coef_kernel`` recomputes the logits of a chunk of rows
against the whole vocabulary, one [BLOCK_N, BLOCK_V] tile per program, and stores the
coefficients c (bf16 for bf16 inputs, fp32 otherwise) for the chunk; the launcher applies
them with two GEMMs (dh = c W, dW = c^T h), which the vendor library runs at tensor-core
speed. Nothing is accumulated across programs: each c element is written once and read
once by each GEMM.

Dtype policy: loads are converted to fp32 right after ``tl.load`` except the logits
GEMM's operands, which keep the inputs' fp16/bf16 on the GPU (``OPERAND``; the
interpreter's bf16 arithmetic is wrong, so it gets fp32; the launchers' constexprs come
from ``fastlatent/ops/_launch.dot_args``). Logits, running max and sum
and c are computed in fp32; c is rounded once, when stored. ``tl.dot`` precision is a
constexpr chosen by the launcher: "tf32" is exact for fp16/bf16 operands (their
mantissas fit in TF32), "tf32x3" keeps fp32 accuracy for fp32 operands on tensor cores.

Indices: program ids and tile offsets are int32; each row's base pointer is widened to
int64 once (``row * stride`` is the only product that can pass 2^31), and the loops add
int32 offsets to it. Loop bounds are runtime values (``range(lo, hi)``,
``range(0, tl.cdiv(D, BLOCK_D))``): this pipelines on the GPU; under the interpreter it
needs Triton >= 3.7 or numpy < 2.4 (older interpreters call ``int()`` on a one-element
array, which numpy 2.4 rejects; only ``while`` loops survive there, and they do not
pipeline on the GPU).
"""

import os

import triton
import triton.language as tl

from .rounding import rounded

# Tile sizes live here only. One config under the interpreter (autotune with several
# configs needs a GPU driver); the interpreter is slow, so its tiles are small.
if os.environ.get("TRITON_INTERPRET") == "1":
    CONFIGS = COEF_CONFIGS = [triton.Config({"BLOCK_N": 16, "BLOCK_V": 64, "BLOCK_D": 32})]
    COMBINE_CONFIGS = [triton.Config({"BLOCK_N": 16})]
else:
    def _tile(n: int, v: int, d: int, warps: int, stages: int) -> triton.Config:
        return triton.Config({"BLOCK_N": n, "BLOCK_V": v, "BLOCK_D": d}, num_warps=warps,
                             num_stages=stages)

    # benchmarks/compile_check.py (Triton 3.9 and 3.6, LatentR3 shapes,
    # benchmarks/RESULTS.md): with bf16 inputs neither the forward nor the coefficient
    # kernel spills at these tiles on sm_80 or sm_90.
    CONFIGS = [_tile(64, 128, 64, 8, 3), _tile(128, 128, 32, 8, 3), _tile(64, 64, 64, 4, 3),
               _tile(64, 64, 32, 4, 4), _tile(32, 64, 64, 4, 3)]
    COEF_CONFIGS = CONFIGS
    COMBINE_CONFIGS = [triton.Config({"BLOCK_N": 32}, num_warps=4)]

IGNORE_INDEX: tl.constexpr = tl.constexpr(-100)


@triton.jit
def _logits_tile(h, w, o_n, m_n, o_v, m_v, D, stride_hn, stride_wv,
                 PRECISION: tl.constexpr, OPERAND: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    """fp32 logits [BLOCK_N, BLOCK_V] of rows o_n against vocab rows o_v (int32); -inf
    where o_v is past V. Each row's offset is widened to int64 once. The operands enter
    ``tl.dot`` as OPERAND: the inputs' own fp16/bf16 on the GPU (exact: their products
    fit fp32, and tensor cores run them at twice the TF32 rate), fp32 under the
    interpreter and for fp32 inputs."""
    r_h = o_n[:, None].to(tl.int64) * stride_hn
    r_w = o_v[:, None].to(tl.int64) * stride_wv
    b_s = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    for i_d in range(0, tl.cdiv(D, BLOCK_D)):
        o_d = i_d * BLOCK_D + tl.arange(0, BLOCK_D)
        m_d = o_d < D
        b_h = tl.load(h + r_h + o_d[None, :], mask=m_n[:, None] & m_d[None, :],
                      other=0.).to(OPERAND)  # [BN, BD]
        b_w = tl.load(w + r_w + o_d[None, :], mask=m_v[:, None] & m_d[None, :],
                      other=0.).to(OPERAND)  # [BV, BD]
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
                              PRECISION: tl.constexpr, OPERAND: tl.constexpr,
                              BLOCK_N: tl.constexpr,
                              BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    """Grid (row blocks, splits). Writes, for its rows and its split's tiles, the running
    max m, sum l = sum_v exp(s_nv - m) and the target logit z (0 if the target is in
    another split) to the [splits, N] partials."""
    # o_n stays int64 here (int32 rows make the 64x64x64/4-warp tile spill on sm_80);
    # the vocabulary and hidden offsets in the loops are int32.
    i_n = tl.program_id(0).to(tl.int64)
    i_s = tl.program_id(1)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < N
    b_t = tl.load(t + o_n, mask=m_n, other=IGNORE_INDEX).to(tl.int32)
    lo, hi = _split_tiles(V, i_s, BLOCK_V)

    b_m = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([BLOCK_N], dtype=tl.float32)
    b_z = tl.zeros([BLOCK_N], dtype=tl.float32)
    for i_v in range(lo, hi):
        o_v = i_v * BLOCK_V + tl.arange(0, BLOCK_V)
        m_v = o_v < V
        # [BN, BV]
        b_s = _logits_tile(h, w, o_n, m_n, o_v, m_v, D, stride_hn, stride_wv,
                           PRECISION, OPERAND, BLOCK_N, BLOCK_V, BLOCK_D)
        b_mn = tl.maximum(b_m, tl.max(b_s, 1))  # finite: every tile has a column < V
        b_l = b_l * tl.exp(b_m - b_mn) + tl.sum(tl.exp(b_s - b_mn[:, None]), 1)
        b_m = b_mn
        b_z += tl.sum(tl.where(o_v[None, :] == b_t[:, None], b_s, 0.), 1)

    p_part = i_s.to(tl.int64) * N + o_n
    tl.store(m_part + p_part, b_m, mask=m_n)
    tl.store(l_part + p_part, b_l, mask=m_n)
    tl.store(z_part + p_part, b_z, mask=m_n)


@triton.autotune(configs=COMBINE_CONFIGS, key=["BLOCK_S"])
@triton.jit
def _fused_logprob_combine_kernel(m_part, l_part, z_part, t, logp, lse, N, S,
                                  BLOCK_S: tl.constexpr, BLOCK_N: tl.constexpr):
    """Grid (row blocks). lse = M + log sum_s l_s exp(m_s - M), M = max_s m_s;
    logp = sum_s z_s - lse (0 at ignored rows). Empty splits carry m = -inf, l = 0."""
    i_n = tl.program_id(0)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < N
    o_s = tl.arange(0, BLOCK_S)
    m_s = o_s < S
    o_p = o_s[:, None].to(tl.int64) * N + o_n[None, :]
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


@triton.autotune(configs=COEF_CONFIGS, key=["V", "D"])
@triton.jit
def _fused_logprob_bwd_coef_kernel(h, w, t, lse, g, c, N, V, D, stride_hn, stride_wv,
                                   stride_cn, PRECISION: tl.constexpr,
                                   OPERAND: tl.constexpr, ROUND_TO: tl.constexpr,
                                   BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                                   BLOCK_D: tl.constexpr):
    """Grid (row blocks, vocab tiles), row blocks fastest, so the programs that run
    together share a weight tile. c[n, v] = g_n (1[v = t_n] - exp(s_nv - lse_n)) for the
    program's [BLOCK_N, BLOCK_V] tile, stored in c's dtype (0 at ignored rows)."""
    i_n = tl.program_id(0)
    i_v = tl.program_id(1)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < N
    o_v = i_v * BLOCK_V + tl.arange(0, BLOCK_V)
    m_v = o_v < V
    b_t = tl.load(t + o_n, mask=m_n, other=IGNORE_INDEX).to(tl.int32)
    b_lse = tl.load(lse + o_n, mask=m_n, other=0.)
    b_g = tl.load(g + o_n, mask=m_n, other=0.).to(tl.float32)
    b_g = tl.where(b_t == IGNORE_INDEX, 0., b_g)
    b_s = _logits_tile(h, w, o_n, m_n, o_v, m_v, D, stride_hn, stride_wv, PRECISION, OPERAND,
                       BLOCK_N, BLOCK_V, BLOCK_D)
    b_c = _coef_tile(b_s, b_lse, b_g, b_t, o_v)  # [BN, BV]
    b_c = rounded(b_c, ROUND_TO)  # under the interpreter: as the GPU's store will round
    tl.store(c + o_n[:, None].to(tl.int64) * stride_cn + o_v[None, :],
             b_c.to(c.dtype.element_ty), mask=m_n[:, None] & m_v[None, :])
