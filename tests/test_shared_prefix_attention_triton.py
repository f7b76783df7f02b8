"""Shared-prefix attention, Triton path, against the torch path and the float64 oracle.

Without CUDA the kernels run under Triton's interpreter (conftest sets TRITON_INTERPRET=1)
on tiny shapes; with CUDA the same tests run compiled, plus the Qwen2.5-1.5B-size bf16
test. Every Triton buffer is NaN-poisoned (``poisoned`` fixture), so an element a kernel
fails to write shows up as NaN.
"""

from __future__ import annotations

import importlib
import itertools
import random

import pytest
import torch

from fastlatent.ops.shared_prefix_attention import (
    shared_prefix_attention,
    shared_prefix_attention_torch,
)
from fastlatent.testing.attention import naive_shared_prefix_attention

spa = importlib.import_module("fastlatent.ops.shared_prefix_attention")

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

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=5e-3, atol=5e-3),
       torch.bfloat16: dict(rtol=3e-2, atol=3e-2)}
# Error floor (relative to the oracle's largest magnitude) added to the 2x-the-torch-path
# bound: the paths sum in different orders, so in fp32 both sit at ~1e-7.
FLOOR = {torch.float32: 1e-6, torch.float16: 2 ** -11, torch.bfloat16: 2 ** -8}
GRAD_NAMES = ("q", "k", "v", "prefix_k", "prefix_v")
HKV, L = 2, 7


@pytest.fixture(scope="module", autouse=True)
def interpreter_runs_runtime_loops():
    skip_unless_runtime_loops()


@pytest.fixture(autouse=True)
def poisoned(monkeypatch):
    """Every buffer the Triton path allocates starts as NaN; returns the list of them."""
    return poison_allocations(monkeypatch, spa)


def make_inputs(g, rows_per_group, t, cached, n_rep, d, dtype, seed=0, hkv=HKV, length=L):
    """Ragged left-padded prompts (G=3: full, short, empty), random suffix validity
    (non-contiguous, as after beam reordering), S = T + cached."""
    gen = torch.Generator().manual_seed(seed)
    r, s = g * rows_per_group, t + cached

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(dtype).to(DEVICE)

    lengths = torch.tensor([length, 2, 0] if g == 3 else
                           [max(length - 3 - 5 * i, 1) for i in range(g)])
    prefix_mask = (torch.arange(length)[None, :] >= length - lengths[:, None]).long()
    suffix_valid = torch.rand(r, s, generator=gen) < 0.7
    suffix_valid[0, -1] = True
    return dict(q=rand(r, hkv * n_rep, t, d), k=rand(r, hkv, s, d), v=rand(r, hkv, s, d),
                suffix_valid=suffix_valid.to(DEVICE), prefix_k=rand(g, hkv, length, d),
                prefix_v=rand(g, hkv, length, d), prefix_mask=prefix_mask.to(DEVICE),
                rows_per_group=rows_per_group, scale=d ** -0.5)


def query_valid(inputs):
    """[R, 1, T, 1] bool: the queries whose own slot is real (the oracle's contract)."""
    t = inputs["q"].shape[2]
    return inputs["suffix_valid"][:, -t:][:, None, :, None]


def max_err(x, ref):
    return (x.double() - ref).abs().max().item() if x.numel() else 0.0


def assert_within_twice_torch(tri, tor, oracle, dtype, what):
    """Triton's error against the oracle is at most 2x the torch path's (plus a floor)."""
    scale = max(oracle.abs().max().item(), 1.0)
    tri_err, tor_err = max_err(tri, oracle), max_err(tor, oracle)
    bound = 2 * tor_err + FLOOR[dtype] * scale
    assert tri_err <= bound, f"{what}: triton err {tri_err:.3g} > {bound:.3g} (torch {tor_err:.3g})"


def _sampled_cases():
    """A covering sample of G x P x T x cached x n_rep x D x dtype (the full product, 128
    cases, is too slow for the interpreter): the largest case, the smallest, and a seeded
    sample in which every value of every axis appears."""
    grid = list(itertools.product([1, 3], [1, 4], [1, 5], [0, 3], [1, 3], [6, 8],
                                  [torch.float32, torch.float16]))
    picked = [(3, 4, 5, 3, 3, 6, torch.float32), (1, 1, 1, 0, 1, 8, torch.float16)]
    picked += random.Random(0).sample([c for c in grid if c not in picked], 24)
    # bf16: the dots take bf16 operands (p and ds rounded to bf16), emulated under the
    # interpreter by rounding to bf16 values
    picked += [(3, 4, 5, 3, 3, 6, torch.bfloat16), (1, 4, 1, 0, 1, 8, torch.bfloat16)]
    names = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
    return [pytest.param(*c, id=f"G{c[0]}-P{c[1]}-T{c[2]}-S{c[2] + c[3]}-rep{c[4]}-D{c[5]}-"
                         f"{names[c[6]]}") for c in picked]


def check_against_torch_and_oracle(inputs, names, dtype, poisoned, buffers):
    """Triton vs the float64 oracle (values and the gradients of ``names``) within TOL
    and within twice the torch path's error; padded queries equal the torch path's; every
    one of the ``buffers`` Triton allocations written in full."""
    ref_in = {n: inputs[n].double().requires_grad_() for n in names}
    tor_in = {n: inputs[n].clone().requires_grad_() for n in names}
    tri_in = {n: inputs[n].clone().requires_grad_() for n in names}
    keep = query_valid(inputs)
    ref = naive_shared_prefix_attention(**{**inputs, **ref_in})
    tor = shared_prefix_attention(**{**inputs, **tor_in}, backend="torch")
    tri = shared_prefix_attention(**{**inputs, **tri_in}, backend="triton")

    assert tri.dtype == dtype and tri.shape == inputs["q"].shape
    assert bool(torch.isfinite(tri).all())
    torch.testing.assert_close(tri.double() * keep, ref * keep, **TOL[dtype])
    assert_within_twice_torch(tri * keep, tor * keep, ref * keep, dtype, "out")
    # padded queries too: same algorithm, so the same meaningless-but-finite value
    torch.testing.assert_close(tri, tor, **TOL[dtype])

    upstream = torch.randn(ref.shape, dtype=torch.float64,
                           generator=torch.Generator().manual_seed(1)).to(DEVICE) * keep
    ref_g = torch.autograd.grad(ref, list(ref_in.values()), upstream)
    tor_g = torch.autograd.grad(tor, list(tor_in.values()), upstream.to(dtype))
    tri_g = torch.autograd.grad(tri, list(tri_in.values()), upstream.to(dtype))
    for name, r_, o_, t_ in zip(names, ref_g, tor_g, tri_g, strict=True):
        assert t_.dtype == dtype and t_.shape == r_.shape, name
        assert bool(torch.isfinite(t_).all()), name
        torch.testing.assert_close(t_.double(), r_, **TOL[dtype],
                                   msg=lambda m, n=name: f"{n}: {m}")
        assert_within_twice_torch(t_, o_, r_, dtype, name)
    assert len(poisoned) == buffers
    assert not any(bool(torch.isnan(b).any()) for b in poisoned)


@pytest.mark.parametrize("g,rows_per_group,t,cached,n_rep,d,dtype", _sampled_cases())
def test_matches_torch_and_oracle(g, rows_per_group, t, cached, n_rep, d, dtype, poisoned):
    inputs = make_inputs(g, rows_per_group, t, cached, n_rep, d, dtype)
    # out, lse, dq, dk, dv, dprefix_k, dprefix_v
    check_against_torch_and_oracle(inputs, GRAD_NAMES, dtype, poisoned, buffers=7)


COMMON_NAMES = GRAD_NAMES + ("common_k", "common_v")


@pytest.mark.parametrize("g,rows_per_group,t,cached,n_rep,d,dtype,common", [
    (3, 4, 5, 3, 3, 6, torch.float32, 5),
    (1, 1, 1, 0, 1, 8, torch.float16, 1),
    (2, 3, 4, 2, 2, 8, torch.float32, 37),  # common keys over several tiles
    (2, 3, 4, 2, 2, 8, torch.bfloat16, 37),
], ids=["G3-P4-C5-fp32", "G1-P1-C1-fp16", "G2-P3-C37-fp32", "G2-P3-C37-bf16"])
def test_common_keys_match_torch_and_oracle(g, rows_per_group, t, cached, n_rep, d, dtype,
                                            common, poisoned):
    """The third level: keys common to every group, seen by every query first."""
    inputs = make_inputs(g, rows_per_group, t, cached, n_rep, d, dtype, seed=7)
    gen = torch.Generator().manual_seed(8)
    for name in ("common_k", "common_v"):
        inputs[name] = torch.randn(1, HKV, common, d, generator=gen).to(dtype).to(DEVICE)
    # ... and dcommon_k, dcommon_v
    check_against_torch_and_oracle(inputs, COMMON_NAMES, dtype, poisoned, buffers=9)


def test_long_prompt_spans_several_tiles():
    """A prompt of several key tiles (ragged), more queries than one query block."""
    inputs = make_inputs(2, 3, 4, 2, 2, 8, torch.float32, seed=5, length=37)
    ref_in = {n: inputs[n].double().requires_grad_() for n in GRAD_NAMES}
    tri_in = {n: inputs[n].clone().requires_grad_() for n in GRAD_NAMES}
    keep = query_valid(inputs)
    ref = naive_shared_prefix_attention(**{**inputs, **ref_in})
    tri = shared_prefix_attention(**{**inputs, **tri_in}, backend="triton")
    torch.testing.assert_close(tri.double() * keep, ref * keep, **TOL[torch.float32])
    upstream = torch.randn(ref.shape, dtype=torch.float64).to(DEVICE) * keep
    ref_g = torch.autograd.grad(ref, list(ref_in.values()), upstream)
    tri_g = torch.autograd.grad(tri, list(tri_in.values()), upstream.float())
    for name, r_, t_ in zip(GRAD_NAMES, ref_g, tri_g, strict=True):
        torch.testing.assert_close(t_.double(), r_, **TOL[torch.float32],
                                   msg=lambda m, n=name: f"{n}: {m}")


def test_frozen_prefix_skips_its_gradient_kernel(poisoned):
    """RL: the prompt KV is frozen; only dq, dk, dv are computed (5 buffers, not 7)."""
    inputs = make_inputs(3, 4, 5, 3, 3, 8, torch.float32, seed=2)
    wrt = GRAD_NAMES[:3]
    ref_in = {n: inputs[n].double().requires_grad_() for n in wrt}
    tri_in = {n: inputs[n].clone().requires_grad_() for n in wrt}
    keep = query_valid(inputs)
    ref = naive_shared_prefix_attention(**{**inputs, **ref_in})
    tri = shared_prefix_attention(**{**inputs, **tri_in}, backend="triton")
    upstream = torch.randn(ref.shape, dtype=torch.float64).to(DEVICE) * keep
    ref_g = torch.autograd.grad(ref, list(ref_in.values()), upstream)
    tri_g = torch.autograd.grad(tri, list(tri_in.values()), upstream.float())
    for name, r_, t_ in zip(wrt, ref_g, tri_g, strict=True):
        torch.testing.assert_close(t_.double(), r_, **TOL[torch.float32],
                                   msg=lambda m, n=name: f"{n}: {m}")
    assert len(poisoned) == 5


def test_strided_inputs_and_expanded_upstream():
    """Projections arrive as [R, T, H, D].transpose(1, 2); out.sum()'s upstream gradient
    is an expanded (stride-0) tensor; a prompt cache with inner stride 2 is copied."""
    inputs = make_inputs(3, 4, 5, 3, 3, 8, torch.float32, seed=3)
    strided = {n: inputs[n].transpose(1, 2).contiguous().transpose(1, 2) for n in GRAD_NAMES}
    wide = torch.zeros(*inputs["prefix_v"].shape[:3], 16, device=DEVICE)
    wide[..., ::2] = inputs["prefix_v"]
    strided["prefix_v"] = wide[..., ::2]
    assert not strided["q"].is_contiguous() and strided["prefix_v"].stride(-1) == 2
    tri_in = {n: x.requires_grad_() for n, x in strided.items()}
    ref_in = {n: inputs[n].double().requires_grad_() for n in GRAD_NAMES}
    tri = shared_prefix_attention(**{**inputs, **tri_in}, backend="triton")
    tor = shared_prefix_attention_torch(**{**inputs, **ref_in})
    torch.testing.assert_close(tri.double(), tor, **TOL[torch.float32])
    tri_g = torch.autograd.grad(tri.sum(), list(tri_in.values()))
    ref_g = torch.autograd.grad(tor.sum(), list(ref_in.values()))
    for name, r_, t_ in zip(GRAD_NAMES, ref_g, tri_g, strict=True):
        torch.testing.assert_close(t_.double(), r_, **TOL[torch.float32],
                                   msg=lambda m, n=name: f"{n}: {m}")


def test_padded_queries_over_empty_prompts_stay_finite():
    """No key at all for any query: output 0 and zero gradients, never NaN."""
    inputs = make_inputs(3, 2, 2, 0, 1, 4, torch.float32)
    inputs["suffix_valid"][:] = False
    inputs["prefix_mask"][:] = 0
    tri_in = {n: inputs[n].clone().requires_grad_() for n in GRAD_NAMES}
    out = shared_prefix_attention(**{**inputs, **tri_in}, backend="triton")
    assert bool((out == 0).all())
    grads = torch.autograd.grad(out.sum(), list(tri_in.values()))
    assert all(bool((gr == 0).all()) for gr in grads)


class _Skip:
    """Stands in for a kernel launch that writes nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def test_unwritten_output_is_caught(monkeypatch):
    """The poisoning bites: without the forward kernel, the output stays NaN."""
    from fastlatent.kernels import shared_prefix_attention as kern

    monkeypatch.setattr(kern, "_shared_prefix_attention_fwd_kernel", _Skip())
    out = shared_prefix_attention(**make_inputs(1, 2, 2, 1, 1, 8, torch.float32),
                                  backend="triton")
    assert bool(torch.isnan(out).all())


@backend_cases
def test_backend_selection(monkeypatch, env, override, expect_triton):
    set_backend_env(monkeypatch, env)
    calls = spy_on(monkeypatch, spa, "_shared_prefix_attention_fwd")
    inputs = make_inputs(1, 2, 2, 1, 1, 8, torch.float32)
    out = shared_prefix_attention(**inputs, backend=override)
    assert bool(calls) == expect_triton
    keep = query_valid(inputs)
    torch.testing.assert_close(out.double() * keep,
                               naive_shared_prefix_attention(**inputs) * keep,
                               **TOL[torch.float32])


def test_unsupported_dtype_and_plain_cpu_fall_back_to_torch(monkeypatch):
    calls = []
    monkeypatch.setattr(spa, "_shared_prefix_attention_fwd", lambda *a, **k: calls.append(1))
    inputs = make_inputs(1, 2, 2, 1, 1, 8, torch.float64)
    out = shared_prefix_attention(**inputs, backend="triton")
    assert not calls and out.dtype == torch.float64
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    cpu = {n: x.cpu() if torch.is_tensor(x) else x
           for n, x in make_inputs(1, 2, 2, 1, 1, 8, torch.float32).items()}
    shared_prefix_attention(**cpu, backend="triton")
    assert not calls


@pytest.mark.gpu
@pytest.mark.parametrize("frozen_prefix", [True, False], ids=["rl-frozen-prompt", "sft"])
def test_qwen25_1p5b_sizes_bf16(frozen_prefix):
    """Qwen2.5-1.5B attention (H=12, Hkv=2, D=128), 126-token prompts, T=10 suffix
    tokens, 32 prompts x K=8 rows, bf16: within 2x the torch path's error."""
    dtype, g, rows, t = torch.bfloat16, 32, 8, 10
    inputs = make_inputs(g, rows, t, 0, 6, 128, dtype, hkv=2, length=126)
    lengths = torch.randint(60, 127, (g,), generator=torch.Generator().manual_seed(4))
    inputs["prefix_mask"] = (torch.arange(126)[None, :] >= 126 - lengths[:, None]).long().to(
        DEVICE)
    wrt = GRAD_NAMES[:3] if frozen_prefix else GRAD_NAMES
    ref_in = {n: inputs[n].double().requires_grad_() for n in wrt}
    tor_in = {n: inputs[n].clone().requires_grad_() for n in wrt}
    tri_in = {n: inputs[n].clone().requires_grad_() for n in wrt}
    keep = query_valid(inputs)
    ref = naive_shared_prefix_attention(**{**inputs, **ref_in})
    tor = shared_prefix_attention(**{**inputs, **tor_in}, backend="torch")
    tri = shared_prefix_attention(**{**inputs, **tri_in}, backend="triton")
    assert tri.dtype == dtype and bool(torch.isfinite(tri).all())
    assert_within_twice_torch(tri * keep, tor * keep, ref * keep, dtype, "out")
    upstream = torch.randn(ref.shape, dtype=torch.float64, device=DEVICE) * keep
    ref_g = torch.autograd.grad(ref, list(ref_in.values()), upstream)
    tor_g = torch.autograd.grad(tor, list(tor_in.values()), upstream.to(dtype))
    tri_g = torch.autograd.grad(tri, list(tri_in.values()), upstream.to(dtype))
    for name, r_, o_, t_ in zip(wrt, ref_g, tor_g, tri_g, strict=True):
        assert t_.dtype == dtype and bool(torch.isfinite(t_).all()), name
        assert_within_twice_torch(t_, o_, r_, dtype, name)
