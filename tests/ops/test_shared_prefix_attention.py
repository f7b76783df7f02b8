"""Shared-prefix attention: the torch path and the Triton path (``triton_path``:
interpreter on the CPU, NaN-poisoned buffers), against each other and the float64
expand-and-concatenate oracle, and the backend switch; on CUDA also Qwen2.5-1.5B sizes in
bf16."""

from __future__ import annotations

import importlib
import itertools
import random

import pytest
import torch

from fastlatent.ops._backend import resolve_backend
from fastlatent.ops.shared_prefix_attention import (
    shared_prefix_attention,
    shared_prefix_attention_torch,
)
from fastlatent.testing.naive import naive_shared_prefix_attention
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
from fastlatent.testing.op_checks import shared_prefix_attention_inputs as make_inputs

OP = "shared_prefix_attention"
spa = importlib.import_module("fastlatent.ops.shared_prefix_attention")
poisoned = poisoning(spa)

# the input builder's kv heads and prompt width; the torch-path tests cache this many
# suffix slots before the queries
HKV, L, CACHED = 2, 7, 3
GRAD_NAMES = ("q", "k", "v", "prefix_k", "prefix_v")
COMMON_NAMES = GRAD_NAMES + ("common_k", "common_v")


def query_valid(inputs):
    """[R, 1, T, 1] bool: the queries whose own slot is real (the only ones compared)."""
    t = inputs["q"].shape[2]
    return inputs["suffix_valid"][:, -t:][:, None, :, None]


# ---- torch path ---------------------------------------------------------------------------

def grad_names(inputs):
    return [n for n in COMMON_NAMES if n in inputs]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("common", [0, 1, 5], ids=["C0", "C1", "C5"])
@pytest.mark.parametrize("d", [6, 8], ids=["D6", "D8"])
@pytest.mark.parametrize("n_rep", [1, 3], ids=["rep1", "rep3"])
@pytest.mark.parametrize("t", [1, 5], ids=["T1", "T5"])
@pytest.mark.parametrize("rows_per_group", [1, 4], ids=["P1", "P4"])
@pytest.mark.parametrize("g", [1, 3], ids=["G1", "G3"])
def test_forward_and_gradients_match_oracle(g, rows_per_group, t, n_rep, d, dtype, common):
    inputs = make_inputs(g, rows_per_group, t, CACHED, n_rep, d, dtype, common=common,
                         device="cpu")
    names = grad_names(inputs)
    ref_in = {n: inputs[n].double().requires_grad_() for n in names}
    tri_in = {n: inputs[n].clone().requires_grad_() for n in names}
    ref = naive_shared_prefix_attention(**{**inputs, **ref_in})
    out = shared_prefix_attention(**{**inputs, **tri_in})
    assert out.dtype == dtype and out.shape == inputs["q"].shape
    assert bool(torch.isfinite(out).all())
    keep = query_valid(inputs)
    tol = TOL[OP][dtype]
    torch.testing.assert_close((out.double() * keep), ref * keep, **tol)
    upstream = torch.randn(ref.shape, dtype=torch.float64) * keep
    ref_grads = torch.autograd.grad(ref, list(ref_in.values()), upstream)
    tri_grads = torch.autograd.grad(out, list(tri_in.values()), upstream.to(dtype))
    for name, ref_g, tri_g in zip(names, ref_grads, tri_grads, strict=True):
        assert tri_g.dtype == dtype and bool(torch.isfinite(tri_g).all()), name
        torch.testing.assert_close(tri_g.double(), ref_g, **tol, msg=lambda m, n=name: f"{n}: {m}")


def test_strided_inputs_match_contiguous():
    """Projections arrive as [R, T, H, D].transpose(1, 2): strided, not contiguous."""
    inputs = make_inputs(3, 4, 5, CACHED, 3, 8, torch.float32, device="cpu")
    strided = {n: inputs[n].transpose(1, 2).contiguous().transpose(1, 2) for n in GRAD_NAMES}
    assert not strided["q"].is_contiguous()
    torch.testing.assert_close(shared_prefix_attention(**{**inputs, **strided}),
                               shared_prefix_attention(**inputs), **TOL[OP][torch.float32])


def test_padded_queries_stay_finite_with_gradients():
    """Every query padded and the prompt empty: no key at all, yet no NaN anywhere."""
    inputs = make_inputs(3, 2, 2, CACHED, 1, 4, torch.float32, device="cpu")
    inputs["suffix_valid"][:] = False
    inputs["prefix_mask"][:] = 0
    grads_in = {n: inputs[n].requires_grad_() for n in GRAD_NAMES}
    out = shared_prefix_attention(**inputs)
    assert bool(torch.isfinite(out).all())
    grads = torch.autograd.grad(out.sum(), list(grads_in.values()))
    assert all(bool(torch.isfinite(gr).all()) for gr in grads)


def matmul_shapes(monkeypatch, inputs):
    """The (a, b) shapes of every torch.matmul one call of the op makes."""
    original, shapes = torch.matmul, []

    def recording_matmul(a, b):
        shapes.append((tuple(a.shape), tuple(b.shape)))
        return original(a, b)

    monkeypatch.setattr(torch, "matmul", recording_matmul)
    shared_prefix_attention(**inputs)
    return shapes


def test_prefix_is_read_once_per_group(monkeypatch):
    """64 rows over one prompt: every matmul touching prompt K/V has batch G = 1, i.e. the
    rows' queries are stacked against the prompt instead of the prompt copied per row."""
    inputs = make_inputs(1, 64, 1, CACHED, 1, 8, torch.float32, device="cpu")
    shapes = matmul_shapes(monkeypatch, inputs)
    prefix_batches = [a[0] for a, b in shapes if L in (b[-1], b[-2])]
    assert len(prefix_batches) == 2 and set(prefix_batches) == {1}


def test_common_keys_are_read_once_per_batch(monkeypatch):
    """3 groups x 4 rows over 6 common keys: the common K/V enter exactly two matmuls (the
    scores and the values), unbatched over groups and rows -- read once for the batch,
    never copied per group or row."""
    inputs = make_inputs(3, 4, 2, CACHED, 1, 8, torch.float32, common=6, device="cpu")
    shapes = matmul_shapes(monkeypatch, inputs)
    common = [(a, b) for a, b in shapes if 6 in (b[-1], b[-2])]
    assert len(common) == 2
    assert all(len(a) == 3 and a[0] == HKV for a, _ in common)  # [Hkv, all queries, .]


@pytest.mark.parametrize("change,match", [
    (dict(rows_per_group=3), "rows_per_group"),
    (dict(k=torch.zeros(4, 2, 1, 8)), "S >= query tokens"),
    (dict(q=torch.zeros(4, 3, 2, 8)), "multiple of kv heads"),
    (dict(v=torch.zeros(4, 2, 5, 6)), "expected v"),
    (dict(prefix_k=torch.zeros(1, 3, 7, 8)), "expected prefix_k"),
    (dict(prefix_v=torch.zeros(1, 2, 6, 8)), "expected prefix_v"),
    (dict(suffix_valid=torch.ones(4, 4, dtype=torch.bool)), "suffix_valid"),
    (dict(prefix_mask=torch.ones(1, 6)), "prefix_mask"),
    (dict(q=torch.zeros(4, 2, 2, 8, dtype=torch.float64)), "dtype"),
    (dict(q=torch.zeros(4, 2, 2)), "rank 4"),
    (dict(common_k=torch.zeros(1, 2, 3, 8)), "common_k and common_v"),
    (dict(common_k=torch.zeros(2, 2, 3, 8), common_v=torch.zeros(2, 2, 3, 8)),
     "expected common_k"),
    (dict(common_k=torch.zeros(1, 2, 3, 8), common_v=torch.zeros(1, 2, 3, 8,
                                                              dtype=torch.float16)), "dtype"),
], ids=["groups", "short-suffix", "heads", "v-shape", "prefix-k-shape", "prefix-v-shape",
        "valid-shape", "mask-shape", "dtype", "rank", "common-alone", "common-groups",
        "common-dtype"])
def test_bad_inputs_raise(change, match):
    inputs = make_inputs(1, 4, 2, CACHED, 1, 8, torch.float32, device="cpu")
    with pytest.raises(ValueError, match=match):
        shared_prefix_attention(**{**inputs, **change})


def test_bad_backend_name_raises():
    inputs = make_inputs(1, 1, 1, CACHED, 1, 8, torch.float32, device="cpu")
    with pytest.raises(ValueError, match="backend"):
        shared_prefix_attention(**inputs, backend="cuda")


# ---- backend switch ---------------------------------------------------------------------
CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.fixture
def clean_env(monkeypatch):
    monkeypatch.delenv("FASTLATENT_BACKEND", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    return monkeypatch


def test_auto_picks_triton_on_cuda_only_where_available(clean_env):
    assert resolve_backend(CPU) == "torch"
    assert resolve_backend(CUDA) == "torch"  # the op has no triton implementation
    assert resolve_backend(CUDA, available=("torch", "triton")) == "triton"
    assert resolve_backend(CPU, available=("torch", "triton")) == "torch"


def test_override_beats_env_and_env_beats_auto(clean_env):
    both = ("torch", "triton")
    clean_env.setenv("FASTLATENT_BACKEND", "torch")
    assert resolve_backend(CUDA, available=both) == "torch"
    assert resolve_backend(CUDA, "triton", available=both) == "triton"
    clean_env.setenv("FASTLATENT_BACKEND", "triton")
    assert resolve_backend(CUDA, available=both) == "triton"
    assert resolve_backend(CUDA, available=("torch",)) == "torch"
    assert resolve_backend(CUDA, "auto", available=both) == "triton"


def test_triton_on_cpu_needs_the_interpreter(clean_env):
    both = ("torch", "triton")
    assert resolve_backend(CPU, "triton", available=both) == "torch"
    clean_env.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend(CPU, "triton", available=both) == "triton"
    assert resolve_backend(CPU, "auto", available=both) == "torch"


def test_invalid_backend_names_list_the_choices(clean_env):
    with pytest.raises(ValueError, match="auto.*triton.*torch"):
        resolve_backend(CPU, "cuda")
    clean_env.setenv("FASTLATENT_BACKEND", "fast")
    with pytest.raises(ValueError, match="FASTLATENT_BACKEND"):
        resolve_backend(CPU)


# ---- Triton path --------------------------------------------------------------------------

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
    return [pytest.param(*c, id=case_id(*c)) for c in picked]


def case_id(g, rows_per_group, t, cached, n_rep, d, dtype, common=None):
    names = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
    keys = "" if common is None else f"C{common}-"
    return f"G{g}-P{rows_per_group}-T{t}-S{t + cached}-rep{n_rep}-D{d}-{keys}{names[dtype]}"


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
    torch.testing.assert_close(tri.double() * keep, ref * keep, **TOL[OP][dtype])
    assert_within_twice_torch(tri * keep, tor * keep, ref * keep, dtype, "out", op=OP)
    # padded queries too: same algorithm, so the same meaningless-but-finite value
    torch.testing.assert_close(tri, tor, **TOL[OP][dtype])

    upstream = torch.randn(ref.shape, dtype=torch.float64,
                           generator=torch.Generator().manual_seed(1)).to(DEVICE) * keep
    ref_g = torch.autograd.grad(ref, list(ref_in.values()), upstream)
    tor_g = torch.autograd.grad(tor, list(tor_in.values()), upstream.to(dtype))
    tri_g = torch.autograd.grad(tri, list(tri_in.values()), upstream.to(dtype))
    for name, r_, o_, t_ in zip(names, ref_g, tor_g, tri_g, strict=True):
        assert t_.dtype == dtype and t_.shape == r_.shape, name
        assert bool(torch.isfinite(t_).all()), name
        torch.testing.assert_close(t_.double(), r_, **TOL[OP][dtype],
                                   msg=lambda m, n=name: f"{n}: {m}")
        assert_within_twice_torch(t_, o_, r_, dtype, name, op=OP)
    assert len(poisoned) == buffers
    assert not any(bool(torch.isnan(b).any()) for b in poisoned)


@triton_path
@pytest.mark.parametrize("g,rows_per_group,t,cached,n_rep,d,dtype", _sampled_cases())
def test_matches_torch_and_oracle(g, rows_per_group, t, cached, n_rep, d, dtype, poisoned):
    inputs = make_inputs(g, rows_per_group, t, cached, n_rep, d, dtype)
    # out, lse, dq, dk, dv, dprefix_k, dprefix_v
    check_against_torch_and_oracle(inputs, GRAD_NAMES, dtype, poisoned, buffers=7)


@triton_path
@pytest.mark.parametrize("g,rows_per_group,t,cached,n_rep,d,dtype,common", [
    pytest.param(*c, id=case_id(*c)) for c in [
        (3, 4, 5, 3, 3, 6, torch.float32, 5),
        (1, 1, 1, 0, 1, 8, torch.float16, 1),
        (2, 3, 4, 2, 2, 8, torch.float32, 37),  # common keys over several tiles
        (2, 3, 4, 2, 2, 8, torch.bfloat16, 37),
    ]])
def test_common_keys_match_torch_and_oracle(g, rows_per_group, t, cached, n_rep, d, dtype,
                                            common, poisoned):
    """The third level: keys common to every group, seen by every query first."""
    inputs = make_inputs(g, rows_per_group, t, cached, n_rep, d, dtype, seed=7)
    gen = torch.Generator().manual_seed(8)
    for name in ("common_k", "common_v"):
        inputs[name] = torch.randn(1, HKV, common, d, generator=gen).to(dtype).to(DEVICE)
    # ... and dcommon_k, dcommon_v
    check_against_torch_and_oracle(inputs, COMMON_NAMES, dtype, poisoned, buffers=9)


@triton_path
def test_long_prompt_spans_several_tiles():
    """A prompt of several key tiles (ragged), more queries than one query block."""
    inputs = make_inputs(2, 3, 4, 2, 2, 8, torch.float32, seed=5, length=37)
    ref_in = {n: inputs[n].double().requires_grad_() for n in GRAD_NAMES}
    tri_in = {n: inputs[n].clone().requires_grad_() for n in GRAD_NAMES}
    keep = query_valid(inputs)
    ref = naive_shared_prefix_attention(**{**inputs, **ref_in})
    tri = shared_prefix_attention(**{**inputs, **tri_in}, backend="triton")
    torch.testing.assert_close(tri.double() * keep, ref * keep, **TOL[OP][torch.float32])
    upstream = torch.randn(ref.shape, dtype=torch.float64).to(DEVICE) * keep
    ref_g = torch.autograd.grad(ref, list(ref_in.values()), upstream)
    tri_g = torch.autograd.grad(tri, list(tri_in.values()), upstream.float())
    for name, r_, t_ in zip(GRAD_NAMES, ref_g, tri_g, strict=True):
        torch.testing.assert_close(t_.double(), r_, **TOL[OP][torch.float32],
                                   msg=lambda m, n=name: f"{n}: {m}")


@triton_path
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
        torch.testing.assert_close(t_.double(), r_, **TOL[OP][torch.float32],
                                   msg=lambda m, n=name: f"{n}: {m}")
    assert len(poisoned) == 5


@triton_path
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
    torch.testing.assert_close(tri.double(), tor, **TOL[OP][torch.float32])
    tri_g = torch.autograd.grad(tri.sum(), list(tri_in.values()))
    ref_g = torch.autograd.grad(tor.sum(), list(ref_in.values()))
    for name, r_, t_ in zip(GRAD_NAMES, ref_g, tri_g, strict=True):
        torch.testing.assert_close(t_.double(), r_, **TOL[OP][torch.float32],
                                   msg=lambda m, n=name: f"{n}: {m}")


@triton_path
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


@triton_path
def test_unwritten_output_is_caught(monkeypatch):
    """The poisoning bites: without the forward kernel, the output stays NaN."""
    from fastlatent.kernels import shared_prefix_attention as kern

    monkeypatch.setattr(kern, "_shared_prefix_attention_fwd_kernel", NoLaunch())
    out = shared_prefix_attention(**make_inputs(1, 2, 2, 1, 1, 8, torch.float32),
                                  backend="triton")
    assert bool(torch.isnan(out).all())


@triton_path
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
                               **TOL[OP][torch.float32])


@triton_path
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


@triton_path
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
    assert_within_twice_torch(tri * keep, tor * keep, ref * keep, dtype, "out", op=OP)
    upstream = torch.randn(ref.shape, dtype=torch.float64, device=DEVICE) * keep
    ref_g = torch.autograd.grad(ref, list(ref_in.values()), upstream)
    tor_g = torch.autograd.grad(tor, list(tor_in.values()), upstream.to(dtype))
    tri_g = torch.autograd.grad(tri, list(tri_in.values()), upstream.to(dtype))
    for name, r_, o_, t_ in zip(wrt, ref_g, tor_g, tri_g, strict=True):
        assert t_.dtype == dtype and bool(torch.isfinite(t_).all()), name
        assert_within_twice_torch(t_, o_, r_, dtype, name, op=OP)
