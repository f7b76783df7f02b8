"""LatentRATT + K-way expansion: naive = one prompt at a time (the release's one prompt per
micro-batch), torch = the batched op, triton = the fused kernel (GPU only)."""

from __future__ import annotations

import pytest
import torch
from conftest import device, timed
from shapes import CPU_STEP, PAPER_STEP, QWEN25_15B_HEAD, SMOLLM2_HEAD

from fastlatent.ops.latent_attention import LatentAttentionWeights, latent_attention

CASES = [(SMOLLM2_HEAD, CPU_STEP), (QWEN25_15B_HEAD, CPU_STEP), (QWEN25_15B_HEAD, PAPER_STEP)]


@pytest.mark.parametrize("provider", ["naive", "torch", "triton"])
@pytest.mark.parametrize("head,step", CASES, ids=[f"{h.name}-{s.name}" for h, s in CASES])
def test_latent_attention(benchmark, provider, head, step):
    if (step is PAPER_STEP or provider == "triton") and not torch.cuda.is_available():
        pytest.skip("paper-sized batch and the Triton kernel are timed on a GPU only")
    dev, d = device(), head.hidden
    hidden = torch.randn(step.prompts, step.prompt_len, d, device=dev)
    mask = torch.ones(step.prompts, step.prompt_len, dtype=torch.long, device=dev)
    params = [torch.randn(d, d, device=dev) * d ** -0.5 if i % 2 == 0 else
              torch.zeros(d, device=dev) for i in range(6)]
    for p in params:
        p.requires_grad_()
    weights = LatentAttentionWeights(*params)
    noise = torch.randn(step.prompts, step.k, d, device=dev)
    noise[:, 0] = 0

    def fwd_bwd():
        if provider == "naive":
            out = torch.cat([latent_attention(hidden[i:i + 1], mask[i:i + 1], weights,
                                              noise=noise[i:i + 1], sigma=1.5, backend="torch")
                             for i in range(step.prompts)])
        else:
            out = latent_attention(hidden, mask, weights, noise=noise, sigma=1.5,
                                   backend=provider)
        return torch.autograd.grad(out.sum(), params)

    benchmark.group = f"latent_attention/{head.name}-{step.name}"
    benchmark.extra_info.update(prompts=step.prompts, k=step.k, prompt_len=step.prompt_len)
    benchmark(timed(fwd_bwd))
