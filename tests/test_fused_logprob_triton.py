"""Fused log-prob head, Triton path, against the torch path and the float64 oracle.

Without CUDA the kernels run under Triton's interpreter (conftest sets TRITON_INTERPRET=1)
on tiny shapes; with CUDA the same tests run compiled, plus the real-size bf16 test.
Every Triton buffer is NaN-poisoned (``poisoned`` fixture), so an element a kernel fails
to write shows up as NaN.
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch

from fastlatent.ops.fused_logprob import _FusedLogprobFn, fused_logprob, fused_logprob_torch
from fastlatent.testing.logprob import naive_fused_logprob

# the module, not the function that fastlatent.ops re-exports under the same name
fl = importlib.import_module("fastlatent.ops.fused_logprob")

triton = pytest.importorskip("triton")

from fastlatent.testing.triton_checks import (  # noqa: E402
    DEVICE,
    backend_cases,
    needs_triton,
    poison_allocations,
    set_backend_env,
    skip_unless_runtime_loops,
    spy_on,
)

pytestmark = needs_triton

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=2e-3, atol=2e-3),
       torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2)}
# Error floor (relative to the oracle's largest magnitude) added to the 2x-the-torch-path
# bound: the two paths sum in different orders, so in fp32 both sit at ~1e-7.
FLOOR = {torch.float32: 1e-6, torch.float16: 2 ** -12, torch.bfloat16: 2 ** -9}


@pytest.fixture(scope="module", autouse=True)
def interpreter_runs_runtime_loops():
    skip_unless_runtime_loops()


@pytest.fixture(autouse=True)
def poisoned(monkeypatch):
    """Every buffer the Triton path allocates starts as NaN; returns the list of them."""
    return poison_allocations(monkeypatch, fl)


def make_inputs(n, d, v, dtype, seed=0, ignore_every=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g).to(dtype)
    weight = (torch.randn(v, d, generator=g) * 2 / d ** 0.5).to(dtype)  # logits ~ N(0, 4)
    targets = torch.randint(0, v, (n,), generator=g)
    if ignore_every:
        targets[::ignore_every] = -100
    return hidden.to(DEVICE), weight.to(DEVICE), targets.to(DEVICE)


def max_err(x, ref):
    return (x.double() - ref).abs().max().item()


def assert_within_twice_torch(tri, tor, oracle, dtype, what):
    """Triton's error against the oracle is at most 2x the torch path's (plus a floor)."""
    scale = max(oracle.abs().max().item(), 1.0)
    tri_err, tor_err = max_err(tri, oracle), max_err(tor, oracle)
    bound = 2 * tor_err + FLOOR[dtype] * scale
    assert tri_err <= bound, f"{what}: triton err {tri_err:.3g} > {bound:.3g} (torch {tor_err:.3g})"


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
    torch.testing.assert_close(tri.double(), ref, **TOL[dtype])
    assert_within_twice_torch(tri, tor, ref, dtype, "logp")
    ignored = targets == -100
    assert bool((tri[ignored] == 0).all())

    upstream = torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    upstream = upstream.to(DEVICE)
    ref_gh, ref_gw = torch.autograd.grad(ref, (ref_h, ref_w), upstream)
    tor_gh, tor_gw = torch.autograd.grad(tor, (tor_h, tor_w), upstream.float())
    tri_gh, tri_gw = torch.autograd.grad(tri, (tri_h, tri_w), upstream.float())
    assert tri_gh.dtype == dtype and tri_gw.dtype == dtype
    torch.testing.assert_close(tri_gh.double(), ref_gh, **TOL[dtype])
    torch.testing.assert_close(tri_gw.double(), ref_gw, **TOL[dtype])
    assert_within_twice_torch(tri_gh, tor_gh, ref_gh, dtype, "grad_hidden")
    assert_within_twice_torch(tri_gw, tor_gw, ref_gw, dtype, "grad_weight")
    assert bool((tri_gh[ignored] == 0).all())  # ignored rows get no gradient
    # logp, lse, the partials and one coefficient buffer per chunk of rows: all written in
    # full (an empty split's running max is -inf by design, so the check is for NaN)
    assert [b.shape for b in poisoned[3:]] == [
        (min(rows or n, n - start), v) for start in range(0, n, rows or n)]
    assert not any(bool(torch.isnan(b).any()) for b in poisoned)


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
        assert_within_twice_torch(t, o, r, dtype, name)


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
    torch.testing.assert_close(tri.double(), ref, **TOL[torch.float32])
    tri_gh, tri_gw = torch.autograd.grad(tri.sum(), (tri_h, tri_w))
    ref_gh, ref_gw = torch.autograd.grad(ref.sum(), (ref_h, ref_w))
    torch.testing.assert_close(tri_gh.double(), ref_gh, **TOL[torch.float32])
    torch.testing.assert_close(tri_gw.double(), ref_gw, **TOL[torch.float32])


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
    torch.testing.assert_close(tri_gh.double(), ref_gh, **TOL[torch.float32])
    # ...and the stub does refuse once the weight wants a gradient
    tri_w = weight.clone().requires_grad_()
    tri = fused_logprob(hidden, tri_w, targets, backend="triton")
    with pytest.raises(AssertionError, match="grad weight computed"):
        torch.autograd.grad(tri.sum(), tri_w)


def test_all_rows_ignored():
    hidden, weight, targets = make_inputs(6, 16, 90, torch.float32)
    targets[:] = -100
    tri_h, tri_w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    tri = fused_logprob(tri_h, tri_w, targets, backend="triton")
    assert bool((tri == 0).all())
    tri_gh, tri_gw = torch.autograd.grad(tri.sum(), (tri_h, tri_w))
    assert bool((tri_gh == 0).all()) and bool((tri_gw == 0).all())


class _Skip:
    """Stands in for a kernel launch that writes nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def test_unwritten_output_is_caught(monkeypatch):
    """The poisoning bites: without the combine kernel, logp stays NaN."""
    from fastlatent.kernels import fused_logprob as kern

    monkeypatch.setattr(kern, "_fused_logprob_combine_kernel", _Skip())
    hidden, weight, targets = make_inputs(4, 8, 40, torch.float32)
    out = fused_logprob(hidden, weight, targets, backend="triton")
    assert bool(torch.isnan(out).all())


@backend_cases
def test_backend_selection(monkeypatch, env, override, expect_triton):
    set_backend_env(monkeypatch, env)
    calls = spy_on(monkeypatch, fl, "_fused_logprob_fwd")
    hidden, weight, targets = make_inputs(3, 8, 50, torch.float32)
    out = fused_logprob(hidden, weight, targets, backend=override)
    assert bool(calls) == expect_triton
    torch.testing.assert_close(out.double(), naive_fused_logprob(hidden, weight, targets),
                               **TOL[torch.float32])


def test_unsupported_dtype_and_plain_cpu_fall_back_to_torch(monkeypatch):
    calls = []
    monkeypatch.setattr(fl, "_fused_logprob_fwd", lambda *a, **k: calls.append(1))
    hidden, weight, targets = make_inputs(3, 8, 50, torch.float32)
    out = fused_logprob(hidden.double(), weight.double(), targets, backend="triton")
    assert not calls and out.dtype == torch.float32
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    fused_logprob(hidden.cpu(), weight.cpu(), targets.cpu(), backend="triton")
    assert not calls


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
    assert_within_twice_torch(tri, tor, ref, dtype, "logp")
    assert bool((tri[targets == -100] == 0).all())
    upstream = torch.randn(n, dtype=torch.float64, device=DEVICE)
    wrt = (0, 1) if train_head else (0,)
    ref_g = torch.autograd.grad(ref, [(ref_h, ref_w)[i] for i in wrt], upstream)
    tor_g = torch.autograd.grad(tor, [(tor_h, tor_w)[i] for i in wrt], upstream.float())
    tri_g = torch.autograd.grad(tri, [(tri_h, tri_w)[i] for i in wrt], upstream.float())
    names = ("grad_hidden", "grad_weight")[:len(wrt)]
    for name, r, o, t in zip(names, ref_g, tor_g, tri_g, strict=True):
        assert t.dtype == dtype and bool(torch.isfinite(t).all())
        assert_within_twice_torch(t, o, r, dtype, name)
    assert math.isfinite(tri.sum().item())
