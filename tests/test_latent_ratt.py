"""LatentRATT against an explicit, loop-by-loop formula (float64)."""

from __future__ import annotations

import math

import pytest
import torch

from fastlatent.model.latent_ratt import LatentRATT


def explicit_ratt(module: LatentRATT, hidden: torch.Tensor, length: int) -> torch.Tensor:
    """One unpadded row: hidden [length, d]. Rotation written as 2x2 rotations of the pairs
    (i, i + dh/2), positions 0..length-1, query at length-1."""
    d, h = module.hidden_size, module.num_heads
    dh = d // h
    wq, bq = module.q_proj.weight.double(), module.q_proj.bias.double()
    wk, bk = module.k_proj.weight.double(), module.k_proj.bias.double()
    wv, bv = module.v_proj.weight.double(), module.v_proj.bias.double()
    x = hidden[:length].double()

    def rotate(vec: torch.Tensor, pos: int) -> torch.Tensor:
        out = vec.clone()
        for i in range(dh // 2):
            theta = pos * module.rope_base ** (-2 * i / dh)
            a, b = vec[i], vec[i + dh // 2]
            out[i] = a * math.cos(theta) - b * math.sin(theta)
            out[i + dh // 2] = b * math.cos(theta) + a * math.sin(theta)
        return out

    result = torch.zeros(d, dtype=torch.float64)
    for head in range(h):
        sl = slice(head * dh, (head + 1) * dh)
        q = rotate((wq @ x[length - 1] + bq)[sl], length - 1)
        scores = torch.stack([rotate((wk @ x[j] + bk)[sl], j) @ q / math.sqrt(dh)
                              for j in range(length)])
        weights = torch.softmax(scores, dim=0)
        result[sl] = sum(weights[j] * (wv @ x[j] + bv)[sl] for j in range(length))
    return result


@pytest.mark.parametrize("heads,d", [(1, 16), (2, 12), (1, 58)], ids=["h1-d16", "h2-d12", "h1-d58"])
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
        expected = explicit_ratt(module, hidden[i], n).float()
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
