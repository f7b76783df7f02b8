"""Triton kernels of LatentRATT's attention core (device code only, one head).

Launchers, the autograd wrapper and the PyTorch path live in
``fastlatent/ops/latent_attention.py``; the projections q = W_q h_last + b_q and
K = H W_k^T + b_k, and r = s W_v^T (matrix products) stay in PyTorch. Per prompt b, with
query column c (last real token), positions p_j = cumsum(mask)_j - 1, half = d / 2,
inv_freq_i = base^(-i / half) and R(p) the half-split rotation (pairs (i, i + half)):

    q' = R(p_c) q,  k'_j = R(p_j) k_j
    z_j = q' . k'_j / sqrt(d)   for visible j (mask_j = 1 and j <= c), -inf otherwise
    lse = log sum_j exp(z_j)    online over BLOCK_L key tiles
    w_j = exp(z_j - lse),  s = sum_j w_j h_j          (r = W_v s + b_v since sum_j w_j = 1)

The expansion kernel writes out[b, k] = (s W_v^T)[b] + b_v + sigma * eps[b, k].
Backward, given g_s = (sum_k dout[b, k]) W_v:

    gw_j  = g_s . h_j,   gz_j = w_j (gw_j - sum_i w_i gw_i) / sqrt(d)
    dq    = R(p_c)^T sum_j gz_j k'_j,   dk_j = gz_j R(p_j)^T q',   dh_j (direct) = w_j g_s

Dtype policy: every load is converted to fp32 right after ``tl.load`` (the interpreter's
bf16 arithmetic is wrong, and fp32 is the accumulation dtype anyway); scores, the running
max / sum, s and every gradient accumulate in fp32. The rotary angles are computed
in-kernel from the runtime positions and the runtime ``log2(base)`` (exp2 / cos / sin are
core ops, no libdevice). No ``tl.dot``: one query per program, so the products are
elementwise multiply + reduce.

Loops: the kernels keep per-prompt [L] scratch (scores, then score gradients) in global
memory, written and re-read by the same program with a ``tl.debug_barrier`` in between
(the threads that store an element need not be the ones that load it back). Loop bounds
are runtime values (``range(0, tl.cdiv(n, BLOCK))``), which the interpreter runs on
Triton >= 3.7 (or numpy < 2.4).
"""

import os

import triton
import triton.language as tl

# Tile sizes live here only. One config under the interpreter (autotune with several
# configs needs a GPU driver); its tiles are small so the tests cross tile boundaries.
if os.environ.get("TRITON_INTERPRET") == "1":
    CONFIGS = [triton.Config({"BLOCK_L": 8, "BLOCK_D": 16})]
    BWD_CONFIGS = CONFIGS
    EXPAND_CONFIGS = [triton.Config({"BLOCK_D": 16})]
else:
    # Tiles chosen with benchmarks/compile_check.py (figures in benchmarks/RESULTS.md).
    # The forward leaves out 32x64/4 warps, which spills with Triton 3.6.
    BWD_CONFIGS = [
        triton.Config({"BLOCK_L": 32, "BLOCK_D": 64}, num_warps=4),
        triton.Config({"BLOCK_L": 32, "BLOCK_D": 128}, num_warps=8),
        triton.Config({"BLOCK_L": 16, "BLOCK_D": 128}, num_warps=4),
    ]
    CONFIGS = BWD_CONFIGS[1:]
    EXPAND_CONFIGS = [triton.Config({"BLOCK_D": 256}, num_warps=4)]


@triton.jit
def _rope_tile(o_i, b_pos, HALF, log2_base):
    """cos and sin of p * inv_freq_i, [BL, BD] fp32, for positions b_pos [BL] (fp32)."""
    b_freq = tl.exp2(-(o_i.to(tl.float32) / HALF) * log2_base)  # [BD]
    b_ang = b_pos[:, None] * b_freq[None, :]
    return tl.cos(b_ang), tl.sin(b_ang)


@triton.jit
def _load_rotated_q(q, i_b, o_i, m_i, b_qpos, D, HALF, log2_base):
    """q' halves [1, BD] (fp32) of prompt i_b at dims o_i, o_i + half."""
    b_q1 = tl.load(q + i_b * D + o_i, mask=m_i, other=0.).to(tl.float32)[None, :]
    b_q2 = tl.load(q + i_b * D + HALF + o_i, mask=m_i, other=0.).to(tl.float32)[None, :]
    b_cq, b_sq = _rope_tile(o_i, tl.full([1], 0., tl.float32) + b_qpos, HALF, log2_base)
    return b_q1 * b_cq - b_q2 * b_sq, b_q2 * b_cq + b_q1 * b_sq


@triton.jit
def _load_rotated_k(k, i_b, o_l, m_l, o_i, m_i, b_pos, HALF, log2_base, stride_kb, stride_kl):
    """k' halves [BL, BD] (fp32) at rows o_l (0 where m_l is false)."""
    p_k = k + i_b * stride_kb + o_l[:, None] * stride_kl + o_i[None, :]
    m_k = m_l[:, None] & m_i[None, :]
    b_k1 = tl.load(p_k, mask=m_k, other=0.).to(tl.float32)
    b_k2 = tl.load(p_k + HALF, mask=m_k, other=0.).to(tl.float32)
    b_ck, b_sk = _rope_tile(o_i, b_pos, HALF, log2_base)
    return b_k1 * b_ck - b_k2 * b_sk, b_k2 * b_ck + b_k1 * b_sk


@triton.jit
def _visible_tile(mask, pos, i_b, o_l, b_qc, L):
    """(visible [BL] bool, positions [BL] fp32) of rows o_l: real and at most column c."""
    m_l = o_l <= b_qc
    b_m = tl.load(mask + i_b * L + o_l, mask=m_l, other=0)
    b_pos = tl.load(pos + i_b * L + o_l, mask=m_l, other=0).to(tl.float32)
    return m_l & (b_m != 0), b_pos


@triton.autotune(configs=CONFIGS, key=["L_BUCKET", "D"])
@triton.jit
def _latent_attention_fwd_kernel(q, k, h, mask, pos, qcol, z, w, lse, s, L, D, HALF,
                                 stride_kb, stride_kl, stride_hb, stride_hl, sm_scale,
                                 log2_base, L_BUCKET, BLOCK_L: tl.constexpr,
                                 BLOCK_D: tl.constexpr):
    """Grid (B,). Writes the scores z [B, L] (scratch, -inf where not visible),
    w [B, L] (0 where not visible), lse [B] and s [B, D], all fp32."""
    i_b = tl.program_id(0).to(tl.int64)
    b_qc = tl.load(qcol + i_b)  # int32: loop bounds and tile offsets stay 32-bit
    b_qpos = tl.load(pos + i_b * L + b_qc).to(tl.float32)
    n_tiles = tl.cdiv(b_qc + 1, BLOCK_L)
    sm_scale = tl.cast(sm_scale, tl.float32)
    log2_base = tl.cast(log2_base, tl.float32)

    # pass 1: scores and the online max / sum of exp
    b_mx = tl.full([1], float("-inf"), dtype=tl.float32)
    b_sum = tl.zeros([1], dtype=tl.float32)
    for i_l in range(0, n_tiles):
        o_l = i_l * BLOCK_L + tl.arange(0, BLOCK_L)
        m_vis, b_pos = _visible_tile(mask, pos, i_b, o_l, b_qc, L)
        b_z = tl.zeros([BLOCK_L], dtype=tl.float32)
        for i_d in range(0, tl.cdiv(HALF, BLOCK_D)):
            o_i = i_d * BLOCK_D + tl.arange(0, BLOCK_D)
            m_i = o_i < HALF
            b_q1, b_q2 = _load_rotated_q(q, i_b, o_i, m_i, b_qpos, D, HALF, log2_base)
            b_k1, b_k2 = _load_rotated_k(k, i_b, o_l, m_vis, o_i, m_i, b_pos, HALF,
                                         log2_base, stride_kb, stride_kl)  # [BL, BD]
            b_z += tl.sum(b_k1 * b_q1 + b_k2 * b_q2, 1)
        b_z = tl.where(m_vis, b_z * sm_scale, float("-inf"))
        tl.store(z + i_b * L + o_l, b_z, mask=o_l <= b_qc)
        b_new = tl.maximum(b_mx, tl.max(b_z, 0))
        b_ref = tl.where(b_new == float("-inf"), 0., b_new)  # all-padding tiles so far
        b_sum = b_sum * tl.exp(b_mx - b_ref) + tl.sum(tl.exp(b_z[:, None] - b_ref[None, :]), 0)
        b_mx = b_new
    b_lse = b_mx + tl.log(b_sum)  # finite: column c is always visible
    tl.store(lse + i_b + tl.arange(0, 1), b_lse)
    tl.debug_barrier()

    # softmax weights over every column (0 past c); z past c is filled with -inf
    for i_l in range(0, tl.cdiv(L, BLOCK_L)):
        o_l = i_l * BLOCK_L + tl.arange(0, BLOCK_L)
        b_z = tl.load(z + i_b * L + o_l, mask=o_l <= b_qc, other=float("-inf"))
        tl.store(z + i_b * L + o_l, b_z, mask=(o_l > b_qc) & (o_l < L))
        b_w = tl.exp(b_z[:, None] - b_lse[None, :])
        tl.store(w + i_b * L + o_l[:, None] + tl.arange(0, 1)[None, :], b_w,
                 mask=(o_l < L)[:, None])

    # pass 2: s = sum_j w_j h_j, one BLOCK_D chunk of s in registers at a time
    for i_d in range(0, tl.cdiv(D, BLOCK_D)):
        o_d = i_d * BLOCK_D + tl.arange(0, BLOCK_D)
        m_d = o_d < D
        b_s = tl.zeros([BLOCK_D], dtype=tl.float32)
        for i_l in range(0, n_tiles):
            o_l = i_l * BLOCK_L + tl.arange(0, BLOCK_L)
            m_vis, b_pos = _visible_tile(mask, pos, i_b, o_l, b_qc, L)
            b_z = tl.load(z + i_b * L + o_l, mask=m_vis, other=float("-inf"))
            b_w = tl.exp(b_z[:, None] - b_lse[None, :])  # [BL, 1]
            # [BL, BD]; padding rows are never read (their content may be anything)
            b_h = tl.load(h + i_b * stride_hb + o_l[:, None] * stride_hl + o_d[None, :],
                          mask=m_vis[:, None] & m_d[None, :], other=0.).to(tl.float32)
            b_s += tl.sum(b_w * b_h, 0)
        tl.store(s + i_b * D + o_d, b_s, mask=m_d)


@triton.autotune(configs=EXPAND_CONFIGS, key=["D"])
@triton.jit
def _latent_attention_expand_kernel(rv, bias, noise, out, K, D, stride_nb, stride_nk, sigma,
                                    seed, HAS_NOISE: tl.constexpr, HAS_SEED: tl.constexpr,
                                    BLOCK_D: tl.constexpr):
    """Grid (B, K). out[b, k] = rv[b] + bias + sigma * eps[b, k] (fp32 [B, K, D]), eps from
    ``noise`` (HAS_NOISE) or drawn here from Philox(seed, offset (b*K + k)*D + j) with
    eps[b, 0] = 0 (HAS_SEED); with neither, K = 1 and out[b] = rv[b] + bias."""
    i_b = tl.program_id(0).to(tl.int64)
    i_k = tl.program_id(1).to(tl.int64)
    sigma = tl.cast(sigma, tl.float32)
    for i_d in range(0, tl.cdiv(D, BLOCK_D)):
        o_d = i_d * BLOCK_D + tl.arange(0, BLOCK_D)
        m_d = o_d < D
        b_r = tl.load(rv + i_b * D + o_d, mask=m_d, other=0.).to(tl.float32)
        b_r += tl.load(bias + o_d, mask=m_d, other=0.).to(tl.float32)
        if HAS_NOISE:
            b_e = tl.load(noise + i_b * stride_nb + i_k * stride_nk + o_d, mask=m_d,
                          other=0.).to(tl.float32)
            b_r += sigma * b_e
        if HAS_SEED:
            o_rand = ((i_b * K + i_k) * D + o_d).to(tl.int32)
            b_e = tl.randn(seed, o_rand)
            b_r += tl.where(i_k > 0, sigma * b_e, 0.)
        tl.store(out + (i_b * K + i_k) * D + o_d, b_r, mask=m_d)


@triton.autotune(configs=BWD_CONFIGS, key=["L_BUCKET", "D"])
@triton.jit
def _latent_attention_bwd_kernel(q, k, h, mask, pos, qcol, w, gs, gz, dq, dk, dh, L, D, HALF,
                                 stride_kb, stride_kl, stride_hb, stride_hl, sm_scale,
                                 log2_base, L_BUCKET, BLOCK_L: tl.constexpr,
                                 BLOCK_D: tl.constexpr):
    """Grid (B,). From g_s [B, D] (fp32) and the forward's w [B, L], writes the score
    gradients gz [B, L] (scratch), dq [B, D], dk [B, L, D] and the direct part of the
    hidden gradient dh_j = w_j g_s [B, L, D], all fp32 and in full (0 where not visible)."""
    i_b = tl.program_id(0).to(tl.int64)
    b_qc = tl.load(qcol + i_b)  # int32: loop bounds and tile offsets stay 32-bit
    b_qpos = tl.load(pos + i_b * L + b_qc).to(tl.float32)
    sm_scale = tl.cast(sm_scale, tl.float32)
    log2_base = tl.cast(log2_base, tl.float32)

    # gw_j = g_s . h_j (into gz) and their w-weighted sum
    b_dot = tl.zeros([1], dtype=tl.float32)
    for i_l in range(0, tl.cdiv(b_qc + 1, BLOCK_L)):
        o_l = i_l * BLOCK_L + tl.arange(0, BLOCK_L)
        m_vis, b_pos = _visible_tile(mask, pos, i_b, o_l, b_qc, L)
        b_gw = tl.zeros([BLOCK_L], dtype=tl.float32)
        for i_d in range(0, tl.cdiv(D, BLOCK_D)):
            o_d = i_d * BLOCK_D + tl.arange(0, BLOCK_D)
            m_d = o_d < D
            b_g = tl.load(gs + i_b * D + o_d, mask=m_d, other=0.).to(tl.float32)
            b_h = tl.load(h + i_b * stride_hb + o_l[:, None] * stride_hl + o_d[None, :],
                          mask=m_vis[:, None] & m_d[None, :], other=0.).to(tl.float32)
            b_gw += tl.sum(b_h * b_g[None, :], 1)
        b_w = tl.load(w + i_b * L + o_l, mask=m_vis, other=0.)
        b_dot += tl.sum(b_w * b_gw, 0)
        tl.store(gz + i_b * L + o_l, b_gw, mask=o_l <= b_qc)
    tl.debug_barrier()
    # gz_j = w_j (gw_j - dot) / sqrt(d), over every column (0 past c)
    for i_l in range(0, tl.cdiv(L, BLOCK_L)):
        o_l = i_l * BLOCK_L + tl.arange(0, BLOCK_L)
        m_l = o_l < L
        b_gw = tl.load(gz + i_b * L + o_l, mask=o_l <= b_qc, other=0.)
        b_w = tl.load(w + i_b * L + o_l, mask=m_l, other=0.)
        b_gz = b_w[:, None] * (b_gw[:, None] - b_dot[None, :]) * sm_scale  # [BL, 1]
        tl.store(gz + i_b * L + o_l[:, None] + tl.arange(0, 1)[None, :], b_gz,
                 mask=m_l[:, None])
    tl.debug_barrier()

    # dq and dk over half-dim chunks; every row of dk is written
    for i_d in range(0, tl.cdiv(HALF, BLOCK_D)):
        o_i = i_d * BLOCK_D + tl.arange(0, BLOCK_D)
        m_i = o_i < HALF
        b_q1, b_q2 = _load_rotated_q(q, i_b, o_i, m_i, b_qpos, D, HALF, log2_base)  # [1, BD]
        b_dq1 = tl.zeros([BLOCK_D], dtype=tl.float32)
        b_dq2 = tl.zeros([BLOCK_D], dtype=tl.float32)
        for i_l in range(0, tl.cdiv(L, BLOCK_L)):
            o_l = i_l * BLOCK_L + tl.arange(0, BLOCK_L)
            m_l = o_l < L
            m_vis, b_pos = _visible_tile(mask, pos, i_b, o_l, b_qc, L)
            b_gz = tl.load(gz + i_b * L + o_l, mask=m_l, other=0.)[:, None]  # [BL, 1]
            b_k1, b_k2 = _load_rotated_k(k, i_b, o_l, m_vis, o_i, m_i, b_pos, HALF,
                                         log2_base, stride_kb, stride_kl)
            b_dq1 += tl.sum(b_gz * b_k1, 0)
            b_dq2 += tl.sum(b_gz * b_k2, 0)
            # dk_j = gz_j R(p_j)^T q'
            b_ck, b_sk = _rope_tile(o_i, b_pos, HALF, log2_base)
            b_dk1 = b_gz * (b_q1 * b_ck + b_q2 * b_sk)
            b_dk2 = b_gz * (b_q2 * b_ck - b_q1 * b_sk)
            p_dk = dk + (i_b * L + o_l[:, None]) * D + o_i[None, :]
            m_dk = m_l[:, None] & m_i[None, :]
            tl.store(p_dk, b_dk1, mask=m_dk)
            tl.store(p_dk + HALF, b_dk2, mask=m_dk)
        b_cq, b_sq = _rope_tile(o_i, tl.full([1], 0., tl.float32) + b_qpos, HALF, log2_base)
        b_cq, b_sq = tl.reshape(b_cq, [BLOCK_D]), tl.reshape(b_sq, [BLOCK_D])
        tl.store(dq + i_b * D + o_i, b_dq1 * b_cq + b_dq2 * b_sq, mask=m_i)
        tl.store(dq + i_b * D + HALF + o_i, b_dq2 * b_cq - b_dq1 * b_sq, mask=m_i)

    # direct hidden gradient w_j g_s
    for i_d in range(0, tl.cdiv(D, BLOCK_D)):
        o_d = i_d * BLOCK_D + tl.arange(0, BLOCK_D)
        m_d = o_d < D
        b_g = tl.load(gs + i_b * D + o_d, mask=m_d, other=0.).to(tl.float32)
        for i_l in range(0, tl.cdiv(L, BLOCK_L)):
            o_l = i_l * BLOCK_L + tl.arange(0, BLOCK_L)
            m_l = o_l < L
            b_w = tl.load(w + i_b * L + o_l, mask=m_l, other=0.)
            tl.store(dh + (i_b * L + o_l[:, None]) * D + o_d[None, :],
                     b_w[:, None] * b_g[None, :], mask=m_l[:, None] & m_d[None, :])
