"""LatentRATT attention: the module (torch path) against a loop-by-loop float64 formula,
and the op's Triton path (one head; ``triton_path``: interpreter on the CPU, NaN-poisoned
buffers) against the torch path and a float64 oracle; on CUDA also the release shape in
bf16."""

from __future__ import annotations

import importlib

import pytest
import torch

from fastlatent.model.latent_ratt import LatentRATT
from fastlatent.ops.latent_attention import LatentAttentionWeights, latent_attention
from fastlatent.testing.naive import naive_latent_attention, naive_latent_ratt
from fastlatent.testing.op_checks import (
    DEVICE,
    ON_GPU,
    TOL,
    NoLaunch,
    assert_within_twice_torch,
    backend_cases,
    poisoning,
    set_backend_env,
    spy_on,
    triton_path,
)
from fastlatent.testing.op_checks import latent_attention_inputs as make_inputs

OP = "latent_attention"
# the module, not the function that fastlatent.ops re-exports under the same name
la = importlib.import_module("fastlatent.ops.latent_attention")
poisoned = poisoning(la)
NAMES = ("hidden", "q_weight", "q_bias", "k_weight", "k_bias", "v_weight", "v_bias")


# ---- the LatentRATT module (torch path) ---------------------------------------------------

@pytest.mark.parametrize("heads,d", [(1, 16), (2, 12), (1, 58)], ids=["H1-D16", "H2-D12", "H1-D58"])
def test_matches_explicit_formula_with_padding(heads, d):
    torch.manual_seed(0)
    module = LatentRATT(d, num_heads=heads, rope_base=1000.0)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.5)
    lengths = [5, 1, 3]
    width = max(lengths)
    hidden = torch.randn(len(lengths), width, d)
    left = torch.zeros(len(lengths), width, d)
    left_mask = torch.zeros(len(lengths), width, dtype=torch.long)
    right_mask = torch.zeros_like(left_mask)
    for i, n in enumerate(lengths):
        left[i, width - n:] = hidden[i, :n]
        left_mask[i, width - n:] = 1
        right_mask[i, :n] = 1
    poisoned = hidden.clone()
    poisoned[right_mask == 0] = 1e4  # padding content must not matter
    r_left = module(left, left_mask)
    r_right = module(poisoned, right_mask)
    for i, n in enumerate(lengths):
        expected = naive_latent_ratt(module, hidden[i], n).float()
        torch.testing.assert_close(r_left[i], expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(r_right[i], expected, rtol=1e-5, atol=1e-5)


def test_output_is_value_projection_of_weighted_hidden():
    """Weights sum to 1, so r = W_v (sum_j w_j h_j) + b_v: r lies in the affine image of
    W_v, and with W_v = I, b_v = 0 it is a convex combination of the hidden states."""
    torch.manual_seed(1)
    module = LatentRATT(8)
    with torch.no_grad():
        module.v_proj.weight.copy_(torch.eye(8))
        module.v_proj.bias.zero_()
    hidden = torch.randn(1, 6, 8)
    r = module(hidden, torch.ones(1, 6, dtype=torch.long))
    lo, hi = hidden[0].min(0).values, hidden[0].max(0).values
    assert bool(((r[0] >= lo - 1e-6) & (r[0] <= hi + 1e-6)).all())
    one = module(hidden[:, :1], torch.ones(1, 1, dtype=torch.long))
    torch.testing.assert_close(one[0], hidden[0, 0])  # a single key gets weight 1


def test_fp32_output_from_bf16_input_and_bad_shapes():
    module = LatentRATT(8)
    out = module(torch.randn(2, 3, 8, dtype=torch.bfloat16), torch.ones(2, 3, dtype=torch.long))
    assert out.dtype == torch.float32
    with pytest.raises(ValueError, match="hidden"):
        module(torch.randn(2, 3, 9), torch.ones(2, 3))
    with pytest.raises(ValueError, match="mask"):
        module(torch.randn(2, 3, 8), torch.ones(2, 4))
    with pytest.raises(ValueError, match="at least one real token"):
        module(torch.randn(2, 3, 8), torch.tensor([[1, 1, 1], [0, 0, 0]]))
    with pytest.raises(ValueError, match="num_heads"):
        LatentRATT(8, num_heads=3)


def test_release_initialisation():
    module = LatentRATT(256)
    for proj in (module.q_proj, module.k_proj, module.v_proj):
        assert proj.bias is not None and bool((proj.bias == 0).all())
        assert abs(float(proj.weight.detach().std()) - 0.02) < 0.002


def test_k_way_expansion_adds_scaled_noise_and_keeps_r0():
    torch.manual_seed(2)
    module = LatentRATT(8)
    hidden, mask = torch.randn(3, 5, 8), torch.ones(3, 5, dtype=torch.long)
    noise = torch.randn(3, 4, 8)
    noise[:, 0] = 0
    r = module(hidden, mask)
    expanded = module(hidden, mask, noise=noise, sigma=1.5)
    assert expanded.shape == (3, 4, 8)
    torch.testing.assert_close(expanded[:, 0], r)
    torch.testing.assert_close(expanded[:, 1:], r[:, None] + 1.5 * noise[:, 1:])
    with pytest.raises(ValueError, match="noise"):
        module(hidden, mask, noise=torch.randn(2, 4, 8), sigma=1.0)


# ---- the op, Triton path ------------------------------------------------------------------

def expand(r, noise, sigma):
    return r if noise is None else r[:, None] + sigma * noise.to(r)


def make_noise(b, n_k, d, seed=3):
    if n_k is None:
        return None
    noise = torch.randn(b, n_k, d, generator=torch.Generator().manual_seed(seed))
    noise[:, 0] = 0
    return noise.to(DEVICE)


def leaves(hidden, tensors, dtype=None):
    out = [hidden.clone() if dtype is None else hidden.to(dtype)]
    out += [t.clone() if dtype is None else t.to(dtype) for t in tensors]
    return [t.requires_grad_() for t in out]


def run(leaf, mask, noise, sigma, backend, rope_base=1000.0):
    return latent_attention(leaf[0], mask, LatentAttentionWeights(*leaf[1:]), num_heads=1,
                            rope_base=rope_base, noise=noise, sigma=sigma, backend=backend)


SHAPES = [(d, length, pad) for d in (8, 58)
          for length, pad in ((1, "none"), (5, "left"), (5, "right"), (13, "left"),
                              (13, "right"))]
CASES = ([pytest.param(d, length, pad, n_k, torch.float32,
                       id=f"B4-L{length}-D{d}-{pad}-{'K' + str(n_k) if n_k else 'nonoise'}-fp32")
          for d, length, pad in SHAPES for n_k in (None, 1, 4)]
         + [pytest.param(d, length, pad, 4, torch.float16, id=f"B4-L{length}-D{d}-{pad}-K4-fp16")
            for d, length, pad in SHAPES])


@triton_path
@pytest.mark.parametrize("d,length,pad,n_k,dtype", CASES)
def test_matches_torch_and_oracle(d, length, pad, n_k, dtype, poisoned):
    b, sigma = 4, 1.5
    hidden, mask, tensors = make_inputs(b, length, d, pad, dtype)
    noise = make_noise(b, n_k, d)
    ref_leaf = leaves(hidden, tensors, torch.float64)
    tor_leaf, tri_leaf = leaves(hidden, tensors), leaves(hidden, tensors)
    ref = expand(naive_latent_attention(ref_leaf[0], mask, ref_leaf[1:], 1000.0), noise, sigma)
    tor = run(tor_leaf, mask, noise, sigma, "torch")
    tri = run(tri_leaf, mask, noise, sigma, "triton")

    assert tri.dtype == torch.float32 and tri.shape == ref.shape
    torch.testing.assert_close(tri.double(), ref, **TOL[OP][torch.float32])
    assert_within_twice_torch(tri, tor, ref, torch.float32, "out", op=OP)
    if noise is not None:  # r^0 = r exactly, the other rows are r + sigma * eps
        torch.testing.assert_close(tri[:, 1:], tri[:, :1] + sigma * noise[:, 1:],
                                   rtol=1e-6, atol=1e-6)

    upstream = torch.randn(ref.shape, dtype=torch.float64,
                           generator=torch.Generator().manual_seed(1)).to(DEVICE)
    ref_g = torch.autograd.grad(ref, ref_leaf, upstream)
    tor_g = torch.autograd.grad(tor, tor_leaf, upstream.float())
    tri_g = torch.autograd.grad(tri, tri_leaf, upstream.float())
    for name, r, o, t in zip(NAMES, ref_g, tor_g, tri_g, strict=True):
        out_dtype = dtype if name == "hidden" else torch.float32
        assert t.dtype == out_dtype and t.shape == r.shape, name
        torch.testing.assert_close(t.double(), r, **TOL[OP][out_dtype], msg=name)
        assert_within_twice_torch(t, o, r, out_dtype, f"grad_{name}", op=OP)
    assert bool((tri_g[0][mask == 0] == 0).all())  # padding gets no gradient
    # fwd: scores, weights, lse, s, out; bwd: score grads, dq, dk, direct dh
    assert len(poisoned) == 9
    assert not any(bool(torch.isnan(buf).any()) for buf in poisoned)


@triton_path
def test_gradients_are_not_trivial():
    """The softmax is not saturated in these inputs: q/k gradients are O(1e-2) or more, so
    the comparisons above exercise the score gradient, not just the value path."""
    hidden, mask, tensors = make_inputs(4, 13, 58, "left", torch.float32)
    leaf = leaves(hidden, tensors)
    out = run(leaf, mask, None, 0.0, "triton")
    grads = torch.autograd.grad(out.square().sum(), leaf)
    for name, g in zip(NAMES, grads, strict=True):
        assert g.abs().max().item() > 1e-2, name


def assert_fp32_output_and_gradients(tri, leaf, ref, ref_leaf):
    """The Triton output and every input gradient against the float64 oracle's."""
    torch.testing.assert_close(tri.double(), ref, **TOL[OP][torch.float32])
    ref_g = torch.autograd.grad(ref.sum(), ref_leaf)
    tri_g = torch.autograd.grad(tri.sum(), leaf)
    for name, r, t in zip(NAMES, ref_g, tri_g, strict=True):
        torch.testing.assert_close(t.double(), r, **TOL[OP][torch.float32], msg=name)


@triton_path
@pytest.mark.parametrize("rope_base", [10.0, 1e4], ids=["base10", "base1e4"])
def test_rope_base_is_a_runtime_scalar(rope_base):
    """Other bases, and a both-sides padded row (zeros at both ends)."""
    hidden, mask, tensors = make_inputs(4, 13, 16, "right", torch.float32)
    mask[3] = 0
    mask[3, 2:9] = 1
    hidden[3] = torch.randn(13, 16, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    hidden[3, mask[3] == 0] = 1e4
    leaf, ref_leaf = leaves(hidden, tensors), leaves(hidden, tensors, torch.float64)
    tri = run(leaf, mask, None, 0.0, "triton", rope_base=rope_base)
    ref = naive_latent_attention(ref_leaf[0], mask, ref_leaf[1:], rope_base)
    assert_fp32_output_and_gradients(tri, leaf, ref, ref_leaf)


@triton_path
def test_nan_padding_content_never_read():
    """The kernels mask padding rows out of every load: NaN there leaves the output and
    every gradient finite (the torch path would return NaN here)."""
    hidden, mask, tensors = make_inputs(4, 13, 58, "left", torch.float32, poison=0.0)
    nan_hidden = hidden.masked_fill((mask == 0)[..., None], float("nan"))
    leaf, ref_leaf = leaves(nan_hidden, tensors), leaves(hidden, tensors, torch.float64)
    noise = make_noise(4, 4, 58)
    tri = run(leaf, mask, noise, 1.5, "triton")
    ref = expand(naive_latent_attention(ref_leaf[0], mask, ref_leaf[1:], 1000.0), noise, 1.5)
    assert_fp32_output_and_gradients(tri, leaf, ref, ref_leaf)


@triton_path
def test_noise_gradient_and_strided_inputs():
    """Noise that wants a gradient gets sigma * upstream; a hidden with inner stride 2 and a
    non-contiguous noise view are handled."""
    hidden, mask, tensors = make_inputs(3, 5, 8, "left", torch.float32)
    wide = torch.zeros(3, 5, 16, device=DEVICE)
    wide[..., ::2] = hidden
    noise = make_noise(3, 4, 8)
    noise_t = noise.transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
    leaf = leaves(hidden, tensors)
    leaf[0] = wide[..., ::2].requires_grad_()
    ref_leaf = leaves(hidden, tensors, torch.float64)
    tri = run(leaf, mask, noise_t, 0.7, "triton")
    ref = expand(naive_latent_attention(ref_leaf[0], mask, ref_leaf[1:], 1000.0), noise, 0.7)
    torch.testing.assert_close(tri.double(), ref, **TOL[OP][torch.float32])
    upstream = torch.randn(tri.shape, device=DEVICE)
    g_noise, g_hidden = torch.autograd.grad(tri, (noise_t, leaf[0]), upstream)
    torch.testing.assert_close(g_noise, 0.7 * upstream)
    (ref_gh,) = torch.autograd.grad(ref, ref_leaf[0], upstream.double())
    torch.testing.assert_close(g_hidden.double(), ref_gh, **TOL[OP][torch.float32])


@triton_path
@pytest.mark.parametrize("kernel", ["_latent_attention_fwd_kernel",
                                    "_latent_attention_expand_kernel"])
def test_unwritten_output_is_caught(monkeypatch, kernel):
    """The poisoning bites: without either forward kernel, the output stays NaN."""
    from fastlatent.kernels import latent_attention as kern

    monkeypatch.setattr(kern, kernel, NoLaunch())
    hidden, mask, tensors = make_inputs(2, 5, 8, "left", torch.float32)
    out = run(leaves(hidden, tensors), mask, make_noise(2, 3, 8), 1.0, "triton")
    assert bool(torch.isnan(out).all())


@triton_path
def test_unwritten_gradient_is_caught(monkeypatch):
    from fastlatent.kernels import latent_attention as kern

    monkeypatch.setattr(kern, "_latent_attention_bwd_kernel", NoLaunch())
    hidden, mask, tensors = make_inputs(2, 5, 8, "left", torch.float32)
    leaf = leaves(hidden, tensors)
    grads = torch.autograd.grad(run(leaf, mask, None, 0.0, "triton").sum(), leaf)
    assert bool(torch.isnan(grads[0]).all())  # hidden
    assert bool(torch.isnan(grads[3]).all())  # k_weight
    assert not bool(torch.isnan(grads[5]).any())  # v_weight: no kernel on its path


@pytest.fixture
def spy(monkeypatch):
    return spy_on(monkeypatch, la, "_latent_attention_fwd")


@triton_path
@backend_cases
def test_backend_selection(monkeypatch, spy, env, override, expect_triton):
    set_backend_env(monkeypatch, env)
    hidden, mask, tensors = make_inputs(2, 5, 8, "right", torch.float32)
    out = run(leaves(hidden, tensors), mask, None, 0.0, override)
    assert bool(spy) == expect_triton
    ref = naive_latent_attention(hidden, mask, tensors, 1000.0)
    torch.testing.assert_close(out.double(), ref, **TOL[OP][torch.float32])


@triton_path
def test_two_heads_and_fp64_fall_back_to_torch(monkeypatch, spy):
    monkeypatch.setenv("FASTLATENT_BACKEND", "triton")
    hidden, mask, tensors = make_inputs(2, 5, 8, "left", torch.float32)
    weights = LatentAttentionWeights(*tensors)
    out = latent_attention(hidden, mask, weights, num_heads=2, backend="triton")
    ref = la.latent_attention_torch(hidden, mask, weights, num_heads=2, rope_base=1000.0)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    latent_attention(hidden.double(), mask, weights, backend="triton")
    assert not spy
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if not ON_GPU:  # plain CPU without the interpreter: torch path
        latent_attention(hidden, mask, weights, backend="triton")
        assert not spy


@triton_path
@pytest.mark.gpu
def test_release_shape_bf16():
    """SmolLM2 d=576, 126-token prompts, 32 prompts x K=8, bf16 hidden states, ragged left
    padding; error at most 2x the torch path's (both against the fp64 oracle)."""
    b, length, d, n_k, dtype = 32, 126, 576, 8, torch.bfloat16
    hidden, mask, tensors = make_inputs(b, length, d, "left", dtype)
    noise = make_noise(b, n_k, d)
    ref_leaf = leaves(hidden, tensors, torch.float64)
    tor_leaf, tri_leaf = leaves(hidden, tensors), leaves(hidden, tensors)
    ref = expand(naive_latent_attention(ref_leaf[0], mask, ref_leaf[1:], 1000.0), noise, 1.5)
    tor = run(tor_leaf, mask, noise, 1.5, "torch")
    tri = run(tri_leaf, mask, noise, 1.5, "triton")
    assert_within_twice_torch(tri, tor, ref, torch.float32, "out", op=OP)
    upstream = torch.randn(ref.shape, dtype=torch.float64, device=DEVICE)
    ref_g = torch.autograd.grad(ref, ref_leaf, upstream)
    tor_g = torch.autograd.grad(tor, tor_leaf, upstream.float())
    tri_g = torch.autograd.grad(tri, tri_leaf, upstream.float())
    for name, r, o, t in zip(NAMES, ref_g, tor_g, tri_g, strict=True):
        assert bool(torch.isfinite(t).all()), name
        out_dtype = dtype if name == "hidden" else torch.float32
        assert_within_twice_torch(t, o, r, out_dtype, f"grad_{name}", op=OP)


@triton_path
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_seeded_noise_has_unit_variance_and_keeps_r0(backend):
    """The seed path draws eps in the kernel (Philox) or from torch.Generator: r^0 is exact,
    the other rows' (out - r) / sigma is N(0, 1) (3000 draws per row), deterministic per
    seed, different across seeds; gradients reach the weights through every row."""
    hidden, mask, tensors = make_inputs(3, 5, 58, "left", torch.float32)
    weights = LatentAttentionWeights(*tensors)
    r = latent_attention(hidden, mask, weights, backend="torch")
    k, sigma = 18, 1.5
    out = latent_attention(hidden, mask, weights, seed=7, num_samples=k, sigma=sigma,
                           backend=backend)
    assert out.shape == (3, k, 58)
    torch.testing.assert_close(out[:, 0], r, **TOL[OP][torch.float32])
    eps = ((out[:, 1:] - r[:, None]) / sigma).flatten().double()
    assert eps.numel() == 3 * 17 * 58
    assert abs(eps.mean().item()) < 4 / eps.numel() ** 0.5  # 4 standard errors
    assert abs(eps.var().item() - 1.0) < 0.1
    again = latent_attention(hidden, mask, weights, seed=7, num_samples=k, sigma=sigma,
                             backend=backend)
    other = latent_attention(hidden, mask, weights, seed=8, num_samples=k, sigma=sigma,
                             backend=backend)
    torch.testing.assert_close(again, out, rtol=0, atol=0)
    assert not torch.allclose(other[:, 1:], out[:, 1:])
    leaf = leaves(hidden, tensors)
    seeded = latent_attention(leaf[0], mask, LatentAttentionWeights(*leaf[1:]), seed=7,
                              num_samples=k, sigma=sigma, backend=backend)
    grads = torch.autograd.grad(seeded.sum(), leaf)
    ref_leaf = leaves(hidden, tensors)
    ref = latent_attention(ref_leaf[0], mask, LatentAttentionWeights(*ref_leaf[1:]),
                           backend="torch")
    ref_grads = torch.autograd.grad(ref.sum() * k, ref_leaf)  # eps carries no gradient
    for g, rg in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, rg, rtol=1e-4, atol=1e-4)


@triton_path
def test_seed_needs_num_samples_and_no_noise_tensor():
    hidden, mask, tensors = make_inputs(2, 5, 8, "left", torch.float32)
    weights = LatentAttentionWeights(*tensors)
    with pytest.raises(ValueError, match="num_samples"):
        latent_attention(hidden, mask, weights, seed=1, num_samples=0)
    with pytest.raises(ValueError, match="noise"):
        latent_attention(hidden, mask, weights, seed=1, num_samples=2,
                         noise=torch.zeros(2, 2, 8))
