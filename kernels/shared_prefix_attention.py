"""Triton kernels of shared-prefix (cascade) attention (device code only).

Launchers, the autograd wrapper and the PyTorch path live in
``fastlatent/ops/shared_prefix_attention.py``. Shapes: q [R, H, T, D], suffix k/v
[R, Hkv, S, D], prompt k/v [G, Hkv, L, D], common k/v [1, Hkv, C, D] (C = 0: none),
R = G * P (P = rows_per_group), H = Hkv * NREP.

Query stacking. For group g and kv head h, the M = P * NREP * T queries that use that kv
head are one flattened axis, m = (p * NREP + j) * T + t (row g * P + p, query head
h * NREP + j, token t). A program takes BLOCK_M consecutive m of one (g, h), so the
prompt's K/V tiles are read once per query block of the group (not once per row).

Keys. Every key set is walked as a flattened (key row, slot) axis n = kp * NK + ks: the
common keys with one key row for the batch (NK = C, all real), the prompt with one key
row per group (NK = L), the suffix with the P rows of the group (NK = S; a query block
only walks the key rows of the query rows it holds). Query m may
see key n when the slot is real (prefix_mask / suffix_valid) and, for the suffix, when
kp = p and ks <= S - T + t.

    fwd:  one online softmax over common, prompt, then suffix tiles (so no LSE merge);
          out = sum_n exp(s_mn - lse_m) v_n, lse_m = log sum_n exp(s_mn), s = scale q.k
          a query with no visible key gets out = 0, lse = -inf.
    bwd:  p = exp(s - lse), dp = do . v, ds = p (dp - delta), delta_m = do_m . out_m
          dq = scale sum_n ds k_n;  dk_n = scale sum_m ds q_m;  dv_n = sum_m p do_m
          dq: grid (G, Hkv, query blocks); dk/dv: grid (G, Hkv, key blocks), one launch
          for the prompt keys (over every query of the group) and one for the suffix keys
          (over the query rows of the block's key rows); the common keys take the prompt
          launch with one group of all R rows (grid (1, Hkv, key blocks)). Every output
          element is owned by one program: no atomics, deterministic.

Dtype policy: every ``tl.dot`` accumulates in fp32; scores, softmax statistics and the
gradient accumulators are fp32; stores cast to the output buffer's dtype. Operands are
the constexpr OPERAND: with bf16/fp16 inputs on the GPU, q, k, v and do enter the dots as
loaded and p and ds are rounded to that dtype first (FlashAttention's practice: half the
registers and shared memory of fp32 tiles, twice the TF32 tensor-core rate); with fp32
inputs every operand is fp32 at "tf32x3" (fp32 accuracy). Under the interpreter (whose
bf16 arithmetic is wrong) operands are fp32 tiles and ROUND_TO rounds p and ds to the
inputs' dtype (``kernels/rounding.py``), so the interpreter multiplies the numbers the
GPU does.
Indices: program ids, query/key positions and their ``//`` and ``%`` are int32 (64-bit
division is emulated on the GPU); a row index is widened to int64 once, where it
multiplies a stride. Loop bounds are runtime values (``range`` over ``tl.cdiv``): needs
Triton >= 3.7 or numpy < 2.4 under the interpreter (see kernels/fused_logprob.py).
"""

import os

import triton
import triton.language as tl

from .rounding import dot_operand

# Tile sizes live here only (BLOCK_D is D rounded up to a power of two >= 16, set by the
# launcher). One config under the interpreter: autotune with several needs a GPU driver.
# dk/dv holds k, v, dk and dv tiles at once, so its tiles depend on the head dim D: heads
# up to SMALL_HEAD_DIM take DKDV_SMALL_HEAD_CONFIGS, larger heads DKDV_LARGE_HEAD_CONFIGS
# (autotune pruning, ``_dkdv_tiles``).
SMALL_HEAD_DIM = 64
if os.environ.get("TRITON_INTERPRET") == "1":
    FWD_CONFIGS = DQ_CONFIGS = DKDV_CONFIGS = [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16})]
    DKDV_SMALL_HEAD_CONFIGS = DKDV_LARGE_HEAD_CONFIGS = DKDV_CONFIGS
else:
    def _tile(m: int, n: int, warps: int, stages: int) -> triton.Config:
        return triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=warps,
                             num_stages=stages)

    # The tiles that compile without spills on sm_80 and sm_90 under Triton 3.9 and 3.6
    # (benchmarks/compile_check.py, bf16, the RL step of SmolLM2 (D = 64) and
    # Qwen2.5-1.5B (D = 128); the figures are in benchmarks/RESULTS.md).
    FWD_CONFIGS = [_tile(32, 64, 4, 2)]
    DQ_CONFIGS = [_tile(32, 32, 4, 2)]
    DKDV_SMALL_HEAD_CONFIGS = [_tile(64, 32, 8, 3), _tile(64, 16, 4, 2), _tile(32, 32, 8, 2)]
    DKDV_LARGE_HEAD_CONFIGS = [_tile(32, 32, 4, 2)]
    DKDV_CONFIGS = DKDV_SMALL_HEAD_CONFIGS + DKDV_LARGE_HEAD_CONFIGS


def _dkdv_tiles(configs, named_args, **kwargs):
    """Autotune pruning: the dk/dv tiles kept for the call's head dim D (the kernel's
    arguments come positionally in ``named_args`` or by keyword in ``kwargs``)."""
    head_dim = kwargs["D"] if "D" in kwargs else named_args["D"]
    return DKDV_SMALL_HEAD_CONFIGS if head_dim <= SMALL_HEAD_DIM else DKDV_LARGE_HEAD_CONFIGS


@triton.jit
def _query_coords(o_m, i_g, i_h, P, NREP, T):
    """Flattened query index -> (row within group, row, query head, token)."""
    q_p = o_m // (NREP * T)
    q_j = (o_m // T) % NREP
    q_t = o_m % T
    return q_p, i_g * P + q_p, i_h * NREP + q_j, q_t


@triton.jit
def _load_queries(x, q_row, q_head, q_t, stride_0, stride_1, stride_2, o_d, m_md,
                  OPERAND: tl.constexpr):
    """[BM, BD] tile (as OPERAND) of a [R, H, T, D] tensor with unit inner stride."""
    p_x = (x + q_row[:, None].to(tl.int64) * stride_0 + q_head[:, None] * stride_1
           + q_t[:, None] * stride_2)
    return tl.load(p_x + o_d[None, :], mask=m_md, other=0.).to(OPERAND)


@triton.jit
def _load_keys(k, v, ok, row0, o_n, n_hi, NK, stride_k0, stride_k2, stride_v0, stride_v2,
               o_d, m_d, OPERAND: tl.constexpr):
    """Keys o_n of the flattened (key row, slot) axis, key rows from row0; k, v already
    offset to the kv head. Returns k, v [BN, BD] (as OPERAND), real-slot mask [BN], kp,
    ks."""
    m_n = o_n < n_hi
    kp = o_n // NK
    ks = o_n % NK
    row = row0 + kp
    b_ok = (tl.load(ok + row.to(tl.int64) * NK + ks, mask=m_n, other=0) != 0) & m_n
    m_nd = m_n[:, None] & m_d[None, :]
    r_n = row[:, None].to(tl.int64)
    b_k = tl.load(k + r_n * stride_k0 + ks[:, None] * stride_k2 + o_d[None, :],
                  mask=m_nd, other=0.).to(OPERAND)
    b_v = tl.load(v + r_n * stride_v0 + ks[:, None] * stride_v2 + o_d[None, :],
                  mask=m_nd, other=0.).to(OPERAND)
    return b_k, b_v, b_ok, kp, ks


@triton.jit
def _online_step(b_q, b_k, b_v, b_allow, b_m, b_l, b_acc, scale, PRECISION: tl.constexpr,
                 OPERAND: tl.constexpr, ROUND_TO: tl.constexpr):
    """One key tile of the online softmax; -inf-safe for rows with no key so far."""
    b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION) * scale  # [BM, BN]
    b_s = tl.where(b_allow, b_s, float("-inf"))
    b_mn = tl.maximum(b_m, tl.max(b_s, 1))
    b_ref = tl.where(b_mn == float("-inf"), 0., b_mn)
    b_alpha = tl.exp(b_m - b_ref)
    b_p = tl.exp(b_s - b_ref[:, None])
    b_l = b_l * b_alpha + tl.sum(b_p, 1)
    b_acc = tl.dot(dot_operand(b_p, OPERAND, ROUND_TO), b_v, b_acc * b_alpha[:, None],
                   input_precision=PRECISION)
    return b_mn, b_l, b_acc


@triton.jit
def _suffix_allow(b_ok, kp, ks, q_p, q_t, S, T):
    """[BM, BN]: real suffix slot of the query's own row, at or before its position."""
    return (b_ok[None, :] & (kp[None, :] == q_p[:, None])
            & (ks[None, :] <= (S - T + q_t)[:, None]))


@triton.jit
def _softmax_over_key_row(b_q, k, v, ok, row, n_keys, stride_k0, stride_k2, stride_v0,
                          stride_v2, o_d, m_d, m_m, b_m, b_l, b_acc, scale,
                          PRECISION: tl.constexpr, OPERAND: tl.constexpr,
                          ROUND_TO: tl.constexpr, BLOCK_N: tl.constexpr):
    """Online softmax over one key row that every query of the block sees (its real
    slots): the common keys (row 0) or the group's prompt (row g); k, v already offset to
    the kv head."""
    for i_n in range(0, tl.cdiv(n_keys, BLOCK_N)):
        o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
        b_k, b_v, b_ok, kp, ks = _load_keys(k, v, ok, row, o_n, n_keys, n_keys, stride_k0,
                                            stride_k2, stride_v0, stride_v2, o_d, m_d, OPERAND)
        b_allow = b_ok[None, :] & m_m[:, None]
        b_m, b_l, b_acc = _online_step(b_q, b_k, b_v, b_allow, b_m, b_l, b_acc, scale,
                                       PRECISION, OPERAND, ROUND_TO)
    return b_m, b_l, b_acc


@triton.autotune(configs=FWD_CONFIGS, key=["M_BUCKET", "D"])
@triton.jit
def _shared_prefix_attention_fwd_kernel(
        q, k, v, sv, pk, pv, pm, ck, cv, cm, o, lse, scale, P, NREP, T, S, L, C, D, M,
        stride_q0, stride_q1, stride_q2, stride_k0, stride_k1, stride_k2,
        stride_v0, stride_v1, stride_v2, stride_pk0, stride_pk1, stride_pk2,
        stride_pv0, stride_pv1, stride_pv2, stride_ck1, stride_ck2, stride_cv1, stride_cv2,
        stride_o0, stride_o1, stride_o2, M_BUCKET,
        PRECISION: tl.constexpr, OPERAND: tl.constexpr, ROUND_TO: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Grid (G, Hkv, query blocks). Writes out [R, H, T, D] and lse [R, H, T] (fp32,
    contiguous) for the block's queries."""
    i_g = tl.program_id(0)
    i_h = tl.program_id(1)
    i_m = tl.program_id(2)
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_m = o_m < M
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < D
    m_md = m_m[:, None] & m_d[None, :]
    q_p, q_row, q_head, q_t = _query_coords(o_m, i_g, i_h, P, NREP, T)
    b_q = _load_queries(q, q_row, q_head, q_t, stride_q0, stride_q1, stride_q2, o_d, m_md, OPERAND)

    b_m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([BLOCK_M], dtype=tl.float32)
    b_acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # common keys (C = 0: none): one key row for the whole batch, all real
    b_m, b_l, b_acc = _softmax_over_key_row(
        b_q, ck + i_h * stride_ck1, cv + i_h * stride_cv1, cm, 0, C, 0, stride_ck2, 0,
        stride_cv2, o_d, m_d, m_m, b_m, b_l, b_acc, scale, PRECISION, OPERAND,
        ROUND_TO, BLOCK_N)
    # prompt: one key row (the group's), every query of the block sees every real slot
    b_m, b_l, b_acc = _softmax_over_key_row(
        b_q, pk + i_h * stride_pk1, pv + i_h * stride_pv1, pm, i_g, L, stride_pk0,
        stride_pk2, stride_pv0, stride_pv2, o_d, m_d, m_m, b_m, b_l, b_acc, scale, PRECISION,
        OPERAND, ROUND_TO, BLOCK_N)
    # suffix: the key rows of the block's query rows, flattened (row, slot)
    p_lo = (i_m * BLOCK_M) // (NREP * T)
    p_hi = tl.minimum((i_m * BLOCK_M + BLOCK_M - 1) // (NREP * T), P - 1) + 1
    n_lo = p_lo * S
    n_hi = p_hi * S
    for i_n in range(0, tl.cdiv(n_hi - n_lo, BLOCK_N)):
        o_n = n_lo + i_n * BLOCK_N + tl.arange(0, BLOCK_N)
        b_k, b_v, b_ok, kp, ks = _load_keys(k + i_h * stride_k1, v + i_h * stride_v1, sv,
                                            i_g * P, o_n, n_hi, S, stride_k0, stride_k2,
                                            stride_v0, stride_v2, o_d, m_d, OPERAND)
        b_allow = _suffix_allow(b_ok, kp, ks, q_p, q_t, S, T) & m_m[:, None]
        b_m, b_l, b_acc = _online_step(b_q, b_k, b_v, b_allow, b_m, b_l, b_acc, scale,
                                       PRECISION, OPERAND, ROUND_TO)

    b_seen = b_l > 0
    b_out = b_acc / tl.where(b_seen, b_l, 1.)[:, None]
    b_lse = tl.where(b_seen, b_m + tl.log(tl.where(b_seen, b_l, 1.)), float("-inf"))
    p_o = (o + q_row[:, None].to(tl.int64) * stride_o0 + q_head[:, None] * stride_o1
           + q_t[:, None] * stride_o2)
    tl.store(p_o + o_d[None, :], b_out, mask=m_md)
    tl.store(lse + (q_row.to(tl.int64) * (NREP * tl.num_programs(1)) + q_head) * T + q_t, b_lse,
             mask=m_m)


@triton.jit
def _probs_and_dscores(b_q, b_do, b_lse, b_delta, b_k, b_v, b_allow, scale,
                       PRECISION: tl.constexpr):
    """p [BM, BN] and ds = p (do.v - delta) [BM, BN], fp32, 0 where not allowed."""
    b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION) * scale
    b_p = tl.where(b_allow, tl.exp(b_s - b_lse[:, None]), 0.)
    b_dp = tl.dot(b_do, tl.trans(b_v), input_precision=PRECISION)
    return b_p, b_p * (b_dp - b_delta[:, None])


@triton.jit
def _load_query_stats(lse, delta, q_row, q_head, q_t, H, T, m_m):
    """lse (-inf -> 0: such queries see no key, p = 0 by the mask) and delta [BM]."""
    o_s = (q_row.to(tl.int64) * H + q_head) * T + q_t
    b_lse = tl.load(lse + o_s, mask=m_m, other=0.)
    b_lse = tl.where(b_lse == float("-inf"), 0., b_lse)
    b_delta = tl.load(delta + o_s, mask=m_m, other=0.)
    return b_lse, b_delta


@triton.jit
def _dq_over_key_row(b_q, b_do, b_lse, b_delta, k, v, ok, row, n_keys, stride_k0, stride_k2,
                     stride_v0, stride_v2, o_d, m_d, m_m, b_dq, scale,
                     PRECISION: tl.constexpr, OPERAND: tl.constexpr,
                     ROUND_TO: tl.constexpr, BLOCK_N: tl.constexpr):
    """dq's share [BM, BD] (unscaled) from one key row every query of the block sees (the
    common keys or the group's prompt), added to b_dq."""
    for i_n in range(0, tl.cdiv(n_keys, BLOCK_N)):
        o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
        b_k, b_v, b_ok, kp, ks = _load_keys(k, v, ok, row, o_n, n_keys, n_keys, stride_k0,
                                            stride_k2, stride_v0, stride_v2, o_d, m_d, OPERAND)
        b_allow = b_ok[None, :] & m_m[:, None]
        b_p, b_ds = _probs_and_dscores(b_q, b_do, b_lse, b_delta, b_k, b_v, b_allow, scale,
                                       PRECISION)
        b_dq = tl.dot(dot_operand(b_ds, OPERAND, ROUND_TO), b_k, b_dq,
                      input_precision=PRECISION)
    return b_dq


@triton.autotune(configs=DQ_CONFIGS, key=["M_BUCKET", "D"])
@triton.jit
def _shared_prefix_attention_bwd_dq_kernel(
        q, k, v, sv, pk, pv, pm, ck, cv, cm, do, lse, delta, dq, scale, P, NREP, T, S, L, C,
        D, M, stride_q0, stride_q1, stride_q2, stride_k0, stride_k1, stride_k2,
        stride_v0, stride_v1, stride_v2, stride_pk0, stride_pk1, stride_pk2,
        stride_pv0, stride_pv1, stride_pv2, stride_ck1, stride_ck2, stride_cv1, stride_cv2,
        stride_o0, stride_o1, stride_o2, M_BUCKET,
        PRECISION: tl.constexpr, OPERAND: tl.constexpr, ROUND_TO: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Grid (G, Hkv, query blocks). dq [R, H, T, D] (strides of do) for the block."""
    i_g = tl.program_id(0)
    i_h = tl.program_id(1)
    i_m = tl.program_id(2)
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_m = o_m < M
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < D
    m_md = m_m[:, None] & m_d[None, :]
    q_p, q_row, q_head, q_t = _query_coords(o_m, i_g, i_h, P, NREP, T)
    b_q = _load_queries(q, q_row, q_head, q_t, stride_q0, stride_q1, stride_q2, o_d, m_md,
                        OPERAND)
    b_do = _load_queries(do, q_row, q_head, q_t, stride_o0, stride_o1, stride_o2, o_d, m_md,
                         OPERAND)
    b_lse, b_delta = _load_query_stats(lse, delta, q_row, q_head, q_t,
                                       NREP * tl.num_programs(1), T, m_m)

    b_dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    b_dq = _dq_over_key_row(b_q, b_do, b_lse, b_delta, ck + i_h * stride_ck1,
                            cv + i_h * stride_cv1, cm, 0, C, 0, stride_ck2, 0, stride_cv2, o_d,
                            m_d, m_m, b_dq, scale, PRECISION, OPERAND,
                            ROUND_TO, BLOCK_N)
    b_dq = _dq_over_key_row(b_q, b_do, b_lse, b_delta, pk + i_h * stride_pk1,
                            pv + i_h * stride_pv1, pm, i_g, L, stride_pk0, stride_pk2,
                            stride_pv0, stride_pv2, o_d, m_d, m_m, b_dq, scale, PRECISION,
                            OPERAND, ROUND_TO, BLOCK_N)
    p_lo = (i_m * BLOCK_M) // (NREP * T)
    p_hi = tl.minimum((i_m * BLOCK_M + BLOCK_M - 1) // (NREP * T), P - 1) + 1
    n_lo = p_lo * S
    n_hi = p_hi * S
    for i_n in range(0, tl.cdiv(n_hi - n_lo, BLOCK_N)):
        o_n = n_lo + i_n * BLOCK_N + tl.arange(0, BLOCK_N)
        b_k, b_v, b_ok, kp, ks = _load_keys(k + i_h * stride_k1, v + i_h * stride_v1, sv,
                                            i_g * P, o_n, n_hi, S, stride_k0, stride_k2,
                                            stride_v0, stride_v2, o_d, m_d, OPERAND)
        b_allow = _suffix_allow(b_ok, kp, ks, q_p, q_t, S, T) & m_m[:, None]
        b_p, b_ds = _probs_and_dscores(b_q, b_do, b_lse, b_delta, b_k, b_v, b_allow, scale,
                                       PRECISION)
        b_dq = tl.dot(dot_operand(b_ds, OPERAND, ROUND_TO), b_k, b_dq,
                      input_precision=PRECISION)

    p_dq = (dq + q_row[:, None].to(tl.int64) * stride_o0 + q_head[:, None] * stride_o1
            + q_t[:, None] * stride_o2)
    tl.store(p_dq + o_d[None, :], b_dq * scale, mask=m_md)


@triton.autotune(configs=DKDV_CONFIGS, key=["M_BUCKET", "KEYS_BUCKET", "D", "SUFFIX"],
                 prune_configs_by={"early_config_prune": _dkdv_tiles})
@triton.jit
def _shared_prefix_attention_bwd_dkdv_kernel(
        q, k, v, ok, do, lse, delta, dk, dv, scale, P, NREP, T, S, NK, KP, D, M,
        stride_q0, stride_q1, stride_q2, stride_k0, stride_k1, stride_k2,
        stride_v0, stride_v1, stride_v2, stride_o0, stride_o1, stride_o2, M_BUCKET,
        KEYS_BUCKET, SUFFIX: tl.constexpr, PRECISION: tl.constexpr, OPERAND: tl.constexpr,
        ROUND_TO: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr):
    """Grid (G, Hkv, key blocks over KP * NK keys of the group). Prompt keys (SUFFIX
    False: KP = 1, NK = L) take every query of the group; suffix keys (KP = P, NK = S)
    the queries of their own rows. dk, dv: contiguous [G * KP, Hkv, NK, D]."""
    i_g = tl.program_id(0)
    i_h = tl.program_id(1)
    i_n = tl.program_id(2)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_hi = KP * NK
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < D
    b_k, b_v, b_ok, kp, ks = _load_keys(k + i_h * stride_k1, v + i_h * stride_v1, ok,
                                        i_g * KP, o_n, n_hi, NK, stride_k0, stride_k2,
                                        stride_v0, stride_v2, o_d, m_d, OPERAND)
    H = NREP * tl.num_programs(1)
    if SUFFIX:
        kp_lo = (i_n * BLOCK_N) // NK
        kp_hi = tl.minimum((i_n * BLOCK_N + BLOCK_N - 1) // NK, P - 1) + 1
        m_lo = kp_lo * NREP * T
        m_hi = kp_hi * NREP * T
    else:
        m_lo = i_n * 0
        m_hi = M + i_n * 0

    b_dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    b_dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for i_m in range(0, tl.cdiv(m_hi - m_lo, BLOCK_M)):
        o_m = m_lo + i_m * BLOCK_M + tl.arange(0, BLOCK_M)
        m_m = o_m < m_hi
        m_md = m_m[:, None] & m_d[None, :]
        q_p, q_row, q_head, q_t = _query_coords(o_m, i_g, i_h, P, NREP, T)
        b_q = _load_queries(q, q_row, q_head, q_t, stride_q0, stride_q1, stride_q2, o_d, m_md,
                            OPERAND)
        b_do = _load_queries(do, q_row, q_head, q_t, stride_o0, stride_o1, stride_o2, o_d,
                             m_md, OPERAND)
        b_lse, b_delta = _load_query_stats(lse, delta, q_row, q_head, q_t, H, T, m_m)
        if SUFFIX:
            b_allow = _suffix_allow(b_ok, kp, ks, q_p, q_t, S, T) & m_m[:, None]
        else:
            b_allow = b_ok[None, :] & m_m[:, None]
        b_p, b_ds = _probs_and_dscores(b_q, b_do, b_lse, b_delta, b_k, b_v, b_allow, scale,
                                       PRECISION)
        b_dv = tl.dot(tl.trans(dot_operand(b_p, OPERAND, ROUND_TO)), b_do, b_dv,
                      input_precision=PRECISION)
        b_dk = tl.dot(tl.trans(dot_operand(b_ds, OPERAND, ROUND_TO)), b_q, b_dk,
                      input_precision=PRECISION)

    m_nd = (o_n < n_hi)[:, None] & m_d[None, :]
    o_kv = ((((i_g * KP + kp).to(tl.int64) * tl.num_programs(1) + i_h) * NK + ks)[:, None] * D
            + o_d[None, :])
    tl.store(dk + o_kv, b_dk * scale, mask=m_nd)
    tl.store(dv + o_kv, b_dv, mask=m_nd)
