"""Fused log-prob head (torch path) against the float64 full-logits oracle."""

from __future__ import annotations

import pytest
import torch

from fastlatent.ops.fused_logprob import fused_logprob
from fastlatent.testing.logprob import naive_fused_logprob

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=2e-3, atol=2e-3)}


def make_inputs(n, d, v, dtype, seed=0, ignore_every=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g).to(dtype)
    weight = (torch.randn(v, d, generator=g) / d ** 0.5).to(dtype)
    targets = torch.randint(0, v, (n,), generator=g)
    if ignore_every:
        targets[::ignore_every] = -100
    return hidden, weight, targets


@pytest.mark.parametrize("n,d,v,tile", [(1, 59, 1001, 256), (13, 16, 1001, 1001),
                                        (7, 8, 33, 5), (20, 32, 300, 64)],
                         ids=["N1-D59-V1001", "N13-onetile", "N7-V33-tile5", "N20-V300"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_forward_and_gradients_match_oracle(n, d, v, tile, dtype):
    hidden, weight, targets = make_inputs(n, d, v, dtype, ignore_every=3 if n > 2 else 0)
    ref_h = hidden.double().requires_grad_()
    ref_w = weight.double().requires_grad_()
    tri_h = hidden.clone().requires_grad_()
    tri_w = weight.clone().requires_grad_()
    ref = naive_fused_logprob(ref_h, ref_w, targets)
    out = fused_logprob(tri_h, tri_w, targets, vocab_tile=tile)
    assert out.dtype == torch.float32 and out.shape == (n,)
    tol = TOL[dtype]
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
    hidden, weight, targets = make_inputs(4, 8, 50, torch.float32)
    hidden.requires_grad_()
    out = fused_logprob(hidden, weight, targets, vocab_tile=16)
    (grad,) = torch.autograd.grad(out.sum(), hidden)
    assert weight.grad is None and grad.shape == hidden.shape


def test_bad_inputs_raise():
    hidden, weight, targets = make_inputs(4, 8, 50, torch.float32)
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
