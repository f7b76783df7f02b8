"""Shared-prefix attention (torch path) against the float64 expand-and-concatenate oracle,
and the backend switch."""

from __future__ import annotations

import pytest
import torch

from fastlatent.ops._backend import resolve_backend
from fastlatent.ops.shared_prefix_attention import shared_prefix_attention
from fastlatent.testing.attention import naive_shared_prefix_attention

HKV, L, CACHED = 2, 7, 3  # kv heads, prompt width, suffix slots cached before the queries
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=5e-3, atol=5e-3)}


def make_inputs(g, rows_per_group, t, n_rep, d, dtype, seed=0, common=0):
    """Ragged left-padded prompts (one of them empty when g == 3), random suffix validity
    (non-contiguous slots happen after beam reordering), S = T + CACHED; with ``common``
    > 0, that many keys common to every group."""
    gen = torch.Generator().manual_seed(seed)
    r, s = g * rows_per_group, t + CACHED

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(dtype)

    lengths = torch.tensor([L, 2, 0][:g] if g == 3 else [4] * g)
    prefix_mask = (torch.arange(L)[None, :] >= L - lengths[:, None]).long()
    suffix_valid = torch.rand(r, s, generator=gen) < 0.7
    suffix_valid[0, -1] = True  # at least one valid query even over the empty prompt
    inputs = dict(q=rand(r, HKV * n_rep, t, d), k=rand(r, HKV, s, d), v=rand(r, HKV, s, d),
                  suffix_valid=suffix_valid, prefix_k=rand(g, HKV, L, d),
                  prefix_v=rand(g, HKV, L, d), prefix_mask=prefix_mask,
                  rows_per_group=rows_per_group, scale=d ** -0.5)
    if common:
        inputs.update(common_k=rand(1, HKV, common, d), common_v=rand(1, HKV, common, d))
    return inputs


def grad_names(inputs):
    return [n for n in GRAD_NAMES + ("common_k", "common_v") if n in inputs]


def query_valid(inputs):
    """[R, 1, T, 1] bool: the queries whose own slot is real (the only ones compared)."""
    t = inputs["q"].shape[2]
    return inputs["suffix_valid"][:, -t:][:, None, :, None]


GRAD_NAMES = ("q", "k", "v", "prefix_k", "prefix_v")


@pytest.mark.parametrize("common", [0, 1, 5], ids=["C0", "C1", "C5"])
@pytest.mark.parametrize("d", [6, 8], ids=["D6", "D8"])
@pytest.mark.parametrize("n_rep", [1, 3], ids=["rep1", "rep3"])
@pytest.mark.parametrize("t", [1, 5], ids=["T1", "T5"])
@pytest.mark.parametrize("rows_per_group", [1, 4], ids=["P1", "P4"])
@pytest.mark.parametrize("g", [1, 3], ids=["G1", "G3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_forward_and_gradients_match_oracle(g, rows_per_group, t, n_rep, d, dtype, common):
    inputs = make_inputs(g, rows_per_group, t, n_rep, d, dtype, common=common)
    names = grad_names(inputs)
    ref_in = {n: inputs[n].double().requires_grad_() for n in names}
    tri_in = {n: inputs[n].clone().requires_grad_() for n in names}
    ref = naive_shared_prefix_attention(**{**inputs, **ref_in})
    out = shared_prefix_attention(**{**inputs, **tri_in})
    assert out.dtype == dtype and out.shape == inputs["q"].shape
    assert bool(torch.isfinite(out).all())
    keep = query_valid(inputs)
    tol = TOL[dtype]
    torch.testing.assert_close((out.double() * keep), ref * keep, **tol)
    upstream = torch.randn(ref.shape, dtype=torch.float64) * keep
    ref_grads = torch.autograd.grad(ref, list(ref_in.values()), upstream)
    tri_grads = torch.autograd.grad(out, list(tri_in.values()), upstream.to(dtype))
    for name, ref_g, tri_g in zip(names, ref_grads, tri_grads, strict=True):
        assert tri_g.dtype == dtype and bool(torch.isfinite(tri_g).all()), name
        torch.testing.assert_close(tri_g.double(), ref_g, **tol, msg=lambda m, n=name: f"{n}: {m}")


def test_strided_inputs_match_contiguous():
    """Projections arrive as [R, T, H, D].transpose(1, 2): strided, not contiguous."""
    inputs = make_inputs(3, 4, 5, 3, 8, torch.float32)
    strided = {n: inputs[n].transpose(1, 2).contiguous().transpose(1, 2) for n in GRAD_NAMES}
    assert not strided["q"].is_contiguous()
    torch.testing.assert_close(shared_prefix_attention(**{**inputs, **strided}),
                               shared_prefix_attention(**inputs), **TOL[torch.float32])


def test_padded_queries_stay_finite_with_gradients():
    """Every query padded and the prompt empty: no key at all, yet no NaN anywhere."""
    inputs = make_inputs(3, 2, 2, 1, 4, torch.float32)
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
    shapes = matmul_shapes(monkeypatch, make_inputs(1, 64, 1, 1, 8, torch.float32))
    prefix_batches = [a[0] for a, b in shapes if L in (b[-1], b[-2])]
    assert len(prefix_batches) == 2 and set(prefix_batches) == {1}


def test_common_keys_are_read_once_per_batch(monkeypatch):
    """3 groups x 4 rows over 6 common keys: the common K/V enter exactly two matmuls (the
    scores and the values), unbatched over groups and rows -- read once for the batch,
    never copied per group or row."""
    shapes = matmul_shapes(monkeypatch, make_inputs(3, 4, 2, 1, 8, torch.float32, common=6))
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
    inputs = make_inputs(1, 4, 2, 1, 8, torch.float32)
    with pytest.raises(ValueError, match=match):
        shared_prefix_attention(**{**inputs, **change})


def test_bad_backend_name_raises():
    inputs = make_inputs(1, 1, 1, 1, 8, torch.float32)
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
