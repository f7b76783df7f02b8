"""Fused log-prob head: the torch path and the Triton path (``triton_path``: interpreter
on the CPU, NaN-poisoned buffers), against each other and the float64 full-logits oracle;
on CUDA also the SmolLM2-size bf16 head."""

from __future__ import annotations

import importlib
import math

import pytest
import torch

from fastlatent.ops.fused_logprob import _FusedLogprobFn, fused_logprob, fused_logprob_torch
from fastlatent.testing.naive import naive_fused_logprob
from fastlatent.testing.op_checks import (
    DEVICE,
    TOL,
    NoLaunch,
    assert_within_twice_torch,
    backend_cases,
    poisoning,
    set_backend_env,
    spy_on,
    triton_path,
)
from fastlatent.testing.op_checks import fused_logprob_inputs as make_inputs

OP = "fused_logprob"
# the module, not the function that fastlatent.ops re-exports under the same name
fl = importlib.import_module("fastlatent.ops.fused_logprob")
poisoned = poisoning(fl)


# ---- torch path ---------------------------------------------------------------------------

TORCH_CASES = [(1, 59, 1001, 256), (13, 16, 1001, 1001), (7, 8, 33, 5), (20, 32, 300, 64)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("n,d,v,tile", TORCH_CASES,
                         ids=[f"N{n}-D{d}-V{v}-tile{tile}" for n, d, v, tile in TORCH_CASES])
def test_forward_and_gradients_match_oracle(n, d, v, tile, dtype):
    hidden, weight, targets = make_inputs(n, d, v, dtype, ignore_every=3 if n > 2 else 0,
                                          weight_scale=1.0, device="cpu")
    ref_h = hidden.double().requires_grad_()
    ref_w = weight.double().requires_grad_()
    tri_h = hidden.clone().requires_grad_()
    tri_w = weight.clone().requires_grad_()
    ref = naive_fused_logprob(ref_h, ref_w, targets)
    out = fused_logprob(tri_h, tri_w, targets, vocab_tile=tile)
    assert out.dtype == torch.float32 and out.shape == (n,)
    tol = TOL[OP][dtype]
    torch.testing.assert_close(out.double(), ref, **tol)
    assert bool((out[targets == -100] == 0).all())
    upstream = torch.randn(n, dtype=torch.float64)
    ref_gh, ref_gw = torch.autograd.grad(ref, (ref_h, ref_w), upstream)
    tri_gh, tri_gw = torch.autograd.grad(out, (tri_h, tri_w), upstream.float())
    assert tri_gh.dtype == dtype and tri_gw.dtype == dtype
    torch.testing.assert_close(tri_gh.double(), ref_gh, **tol)
    torch.testing.assert_close(tri_gw.double(), ref_gw, **tol)
    assert bool((tri_gh[targets == -100] == 0).all())  # ignored rows get no gradient


def test_only_requested_gradients_are_computed():
    hidden, weight, targets = make_inputs(4, 8, 50, torch.float32, weight_scale=1.0,
                                          device="cpu")
    hidden.requires_grad_()
    out = fused_logprob(hidden, weight, targets, vocab_tile=16)
    (grad,) = torch.autograd.grad(out.sum(), hidden)
    assert weight.grad is None and grad.shape == hidden.shape


def test_bad_inputs_raise():
    hidden, weight, targets = make_inputs(4, 8, 50, torch.float32, weight_scale=1.0,
                                          device="cpu")
    with pytest.raises(ValueError, match="weight"):
        fused_logprob(hidden, weight[:, :7], targets)
    with pytest.raises(ValueError, match="int64"):
        fused_logprob(hidden, weight, targets.int())
    with pytest.raises(ValueError, match="targets in"):
        fused_logprob(hidden, weight, torch.tensor([0, 1, 50, 2]))
    with pytest.raises(ValueError, match="floating"):
        fused_logprob(hidden.long(), weight, targets)


def test_padded_target_positions_never_reach_the_head(monkeypatch):
    """head_logprobs sends only real target positions through the fused head, and equals
    full log-softmax at them (0 at padding), gradients included."""
    import fastlatent.engine.scoring as scoring

    seen = []
    real_head = scoring.fused_logprob

    def counting(hidden, weight, targets, **kwargs):
        seen.append(hidden.shape[0])
        return real_head(hidden, weight, targets, **kwargs)

    monkeypatch.setattr(scoring, "fused_logprob", counting)
    g = torch.Generator().manual_seed(5)
    rows, t, d, v = 4, 6, 16, 37
    hidden = torch.randn(rows, t, d, generator=g, requires_grad=True)
    weight = torch.randn(v, d, generator=g)
    targets = torch.randint(0, v, (rows, t), generator=g)
    mask = torch.zeros(rows, t, dtype=torch.long)
    for r, n in enumerate([6, 1, 3, 0]):
        mask[r, :n] = 1
    targets[mask == 0] = -100  # padding may hold anything
    logp = scoring.head_logprobs(hidden, targets, mask, weight)
    assert seen == [int(mask.sum())]
    full = torch.log_softmax(hidden.detach() @ weight.T, -1)
    expected = full.gather(-1, targets.clamp_min(0)[..., None])[..., 0] * mask
    torch.testing.assert_close(logp, expected, rtol=1e-5, atol=1e-5)
    assert bool((logp[mask == 0] == 0).all())
    logp.sum().backward()
    assert bool((hidden.grad[mask == 0] == 0).all()) and hidden.grad[mask == 1].abs().sum() > 0


# ---- Triton path --------------------------------------------------------------------------

def run_triton(hidden, weight, targets, splits):
    if splits is None:
        return fused_logprob(hidden, weight, targets, backend="triton")
    return _FusedLogprobFn.apply(hidden, weight, targets, "triton", splits)


def chunk_rows(monkeypatch, rows, v, dtype):
    """Cap the backward's coefficient chunk at ``rows`` rows (None: the default cap)."""
    if rows is not None:
        size = torch.finfo(fl._coef_dtype(torch.empty(0, dtype=dtype),
                                          torch.empty(0, dtype=dtype))).bits // 8
        monkeypatch.setattr(fl, "_COEF_BYTES", rows * v * size)


CASES = [  # id, N, D, V, vocabulary splits (None: the launcher's choice), ignore every k-th,
    # rows per backward coefficient chunk (None: the default cap, one chunk here)
    ("N1-D59-V1001", 1, 59, 1001, None, 0, None),
    ("N13-D59-V1001-ignored", 13, 59, 1001, None, 3, None),
    ("N7-D8-V33-below-one-tile", 7, 8, 33, None, 2, None),
    ("N37-D32-V300-S3-chunks", 37, 32, 300, 3, 4, 16),  # ragged row blocks and chunks
    ("N20-D16-V200-S8-empty-splits", 20, 16, 200, 8, 5, 7),  # 4 tiles over 8 splits
]


@triton_path
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("n,d,v,splits,ignore_every,rows", [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_matches_torch_and_oracle(n, d, v, splits, ignore_every, rows, dtype, poisoned,
                                  monkeypatch):
    chunk_rows(monkeypatch, rows, v, dtype)
    hidden, weight, targets = make_inputs(n, d, v, dtype, ignore_every=ignore_every)
    ref_h, ref_w = hidden.double().requires_grad_(), weight.double().requires_grad_()
    tor_h, tor_w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    tri_h, tri_w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    ref = naive_fused_logprob(ref_h, ref_w, targets)
    tor = fused_logprob_torch(tor_h, tor_w, targets, vocab_tile=64)
    tri = run_triton(tri_h, tri_w, targets, splits)

    assert tri.dtype == torch.float32 and tri.shape == (n,)
    torch.testing.assert_close(tri.double(), ref, **TOL[OP][dtype])
    assert_within_twice_torch(tri, tor, ref, dtype, "logp", op=OP)
    ignored = targets == -100
    assert bool((tri[ignored] == 0).all())

    upstream = torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    upstream = upstream.to(DEVICE)
    ref_gh, ref_gw = torch.autograd.grad(ref, (ref_h, ref_w), upstream)
    tor_gh, tor_gw = torch.autograd.grad(tor, (tor_h, tor_w), upstream.float())
    tri_gh, tri_gw = torch.autograd.grad(tri, (tri_h, tri_w), upstream.float())
    assert tri_gh.dtype == dtype and tri_gw.dtype == dtype
    torch.testing.assert_close(tri_gh.double(), ref_gh, **TOL[OP][dtype])
    torch.testing.assert_close(tri_gw.double(), ref_gw, **TOL[OP][dtype])
    assert_within_twice_torch(tri_gh, tor_gh, ref_gh, dtype, "grad_hidden", op=OP)
    assert_within_twice_torch(tri_gw, tor_gw, ref_gw, dtype, "grad_weight", op=OP)
    assert bool((tri_gh[ignored] == 0).all())  # ignored rows get no gradient
    # logp, lse, the partials and one coefficient buffer per chunk of rows: all written in
    # full (an empty split's running max is -inf by design, so the check is for NaN)
    assert [b.shape for b in poisoned[3:]] == [
        (min(rows or n, n - start), v) for start in range(0, n, rows or n)]
    assert not any(bool(torch.isnan(b).any()) for b in poisoned)


@triton_path
def test_bf16_coefficients_under_the_interpreter(monkeypatch):
    """bf16 inputs: the coefficients are stored in bf16 and the GEMMs run in bf16; the
    gradients stay within twice the torch path's error (fp32 throughout, rounded at the
    end) plus bf16's own rounding, also over several chunks of rows (dW summed in fp32)."""
    dtype = torch.bfloat16
    chunk_rows(monkeypatch, 16, 700, dtype)
    hidden, weight, targets = make_inputs(40, 48, 700, dtype, ignore_every=6)
    ref_h, ref_w = hidden.double().requires_grad_(), weight.double().requires_grad_()
    tor_h, tor_w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    tri_h, tri_w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    upstream = torch.randn(40, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    ref = torch.autograd.grad(naive_fused_logprob(ref_h, ref_w, targets), (ref_h, ref_w),
                              upstream.to(DEVICE))
    tor = torch.autograd.grad(fused_logprob(tor_h, tor_w, targets, backend="torch"),
                              (tor_h, tor_w), upstream.float().to(DEVICE))
    tri = torch.autograd.grad(fused_logprob(tri_h, tri_w, targets, backend="triton"),
                              (tri_h, tri_w), upstream.float().to(DEVICE))
    for name, r, o, t in zip(("grad_hidden", "grad_weight"), ref, tor, tri, strict=True):
        assert t.dtype == dtype
        assert_within_twice_torch(t, o, r, dtype, name, op=OP)


@triton_path
def test_strided_inputs_and_expanded_upstream():
    """A weight with row stride > D goes to the kernel as is; a hidden with inner stride 2
    is copied; out.sum()'s upstream gradient is an expanded (stride-0) tensor."""
    hidden, weight, targets = make_inputs(9, 24, 130, torch.float32, ignore_every=4)
    wide = torch.zeros(130, 29, device=DEVICE)
    wide[:, :24] = weight
    strided_h = torch.zeros(9, 48, device=DEVICE)
    strided_h[:, ::2] = hidden
    tri_h, tri_w = strided_h[:, ::2].requires_grad_(), wide[:, :24].requires_grad_()
    ref_h, ref_w = hidden.double().requires_grad_(), weight.double().requires_grad_()
    tri = fused_logprob(tri_h, tri_w, targets, backend="triton")
    ref = naive_fused_logprob(ref_h, ref_w, targets)
    torch.testing.assert_close(tri.double(), ref, **TOL[OP][torch.float32])
    tri_gh, tri_gw = torch.autograd.grad(tri.sum(), (tri_h, tri_w))
    ref_gh, ref_gw = torch.autograd.grad(ref.sum(), (ref_h, ref_w))
    torch.testing.assert_close(tri_gh.double(), ref_gh, **TOL[OP][torch.float32])
    torch.testing.assert_close(tri_gw.double(), ref_gw, **TOL[OP][torch.float32])


@triton_path
def test_frozen_weight_skips_grad_weight_gemm(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("grad weight computed")

    monkeypatch.setattr(fl, "_add_grad_weight", refuse)
    hidden, weight, targets = make_inputs(5, 16, 100, torch.float32)
    tri_h = hidden.clone().requires_grad_()
    ref_h = hidden.double().requires_grad_()
    tri = fused_logprob(tri_h, weight, targets, backend="triton")
    (tri_gh,) = torch.autograd.grad(tri.sum(), tri_h)
    (ref_gh,) = torch.autograd.grad(naive_fused_logprob(ref_h, weight, targets).sum(), ref_h)
    torch.testing.assert_close(tri_gh.double(), ref_gh, **TOL[OP][torch.float32])
    # ...and the stub does refuse once the weight wants a gradient
    tri_w = weight.clone().requires_grad_()
    tri = fused_logprob(hidden, tri_w, targets, backend="triton")
    with pytest.raises(AssertionError, match="grad weight computed"):
        torch.autograd.grad(tri.sum(), tri_w)


@triton_path
def test_all_rows_ignored():
    hidden, weight, targets = make_inputs(6, 16, 90, torch.float32)
    targets[:] = -100
    tri_h, tri_w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    tri = fused_logprob(tri_h, tri_w, targets, backend="triton")
    assert bool((tri == 0).all())
    tri_gh, tri_gw = torch.autograd.grad(tri.sum(), (tri_h, tri_w))
    assert bool((tri_gh == 0).all()) and bool((tri_gw == 0).all())


@triton_path
def test_unwritten_output_is_caught(monkeypatch):
    """The poisoning bites: without the combine kernel, logp stays NaN."""
    from fastlatent.kernels import fused_logprob as kern

    monkeypatch.setattr(kern, "_fused_logprob_combine_kernel", NoLaunch())
    hidden, weight, targets = make_inputs(4, 8, 40, torch.float32)
    out = fused_logprob(hidden, weight, targets, backend="triton")
    assert bool(torch.isnan(out).all())


@triton_path
@backend_cases
def test_backend_selection(monkeypatch, env, override, expect_triton):
    set_backend_env(monkeypatch, env)
    calls = spy_on(monkeypatch, fl, "_fused_logprob_fwd")
    hidden, weight, targets = make_inputs(3, 8, 50, torch.float32)
    out = fused_logprob(hidden, weight, targets, backend=override)
    assert bool(calls) == expect_triton
    torch.testing.assert_close(out.double(), naive_fused_logprob(hidden, weight, targets),
                               **TOL[OP][torch.float32])


@triton_path
def test_unsupported_dtype_and_plain_cpu_fall_back_to_torch(monkeypatch):
    calls = []
    monkeypatch.setattr(fl, "_fused_logprob_fwd", lambda *a, **k: calls.append(1))
    hidden, weight, targets = make_inputs(3, 8, 50, torch.float32)
    out = fused_logprob(hidden.double(), weight.double(), targets, backend="triton")
    assert not calls and out.dtype == torch.float32
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    fused_logprob(hidden.cpu(), weight.cpu(), targets.cpu(), backend="triton")
    assert not calls


@triton_path
@pytest.mark.gpu
@pytest.mark.parametrize("train_head", [False, True], ids=["rl-frozen-head", "sft-head"])
def test_smollm2_head_bf16(train_head):
    """SmolLM2 LM head (d=576, V=49152), 288 rows (4 prompts x K=8 x 9 tokens), bf16,
    the launcher's own vocabulary split count."""
    n, d, v, dtype = 288, 576, 49152, torch.bfloat16
    hidden, weight, targets = make_inputs(n, d, v, dtype, ignore_every=9)
    ref_h, ref_w = hidden.double().requires_grad_(), weight.double().requires_grad_(train_head)
    tor_h, tor_w = hidden.clone().requires_grad_(), weight.clone().requires_grad_(train_head)
    tri_h, tri_w = hidden.clone().requires_grad_(), weight.clone().requires_grad_(train_head)
    ref = naive_fused_logprob(ref_h, ref_w, targets)
    tor = fused_logprob(tor_h, tor_w, targets, backend="torch")
    tri = fused_logprob(tri_h, tri_w, targets, backend="triton")
    assert_within_twice_torch(tri, tor, ref, dtype, "logp", op=OP)
    assert bool((tri[targets == -100] == 0).all())
    upstream = torch.randn(n, dtype=torch.float64, device=DEVICE)
    wrt = (0, 1) if train_head else (0,)
    ref_g = torch.autograd.grad(ref, [(ref_h, ref_w)[i] for i in wrt], upstream)
    tor_g = torch.autograd.grad(tor, [(tor_h, tor_w)[i] for i in wrt], upstream.float())
    tri_g = torch.autograd.grad(tri, [(tri_h, tri_w)[i] for i in wrt], upstream.float())
    names = ("grad_hidden", "grad_weight")[:len(wrt)]
    for name, r, o, t in zip(names, ref_g, tor_g, tri_g, strict=True):
        assert t.dtype == dtype and bool(torch.isfinite(t).all())
        assert_within_twice_torch(t, o, r, dtype, name, op=OP)
    assert math.isfinite(tri.sum().item())


def test_value_checks_run_on_cpu_tensors_and_on_others_only_when_asked(monkeypatch):
    """Reading a GPU tensor's values is a host sync: only with FASTLATENT_DEBUG_CHECKS=1
    (meta tensors stand in for a device without data)."""
    from fastlatent.ops._backend import DEBUG_CHECKS_ENV_VAR, checks_values

    cpu, meta = torch.zeros(2), torch.empty(2, device="meta")
    monkeypatch.delenv(DEBUG_CHECKS_ENV_VAR, raising=False)
    assert checks_values(cpu) and not checks_values(meta) and not checks_values(cpu, meta)
    monkeypatch.setenv(DEBUG_CHECKS_ENV_VAR, "1")
    assert checks_values(meta) and checks_values(cpu, meta)
