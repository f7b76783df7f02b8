"""Log-prob head: full logits (naive) vs the vocabulary-tiled fused op (torch, triton)."""

from __future__ import annotations

import pytest
import torch
from conftest import device, timed
from shapes import CPU_STEP, PAPER_STEP, QWEN25_15B_HEAD, SMOLLM2_HEAD

from fastlatent.ops.fused_logprob import fused_logprob
from fastlatent.testing.naive_steps import target_logprobs_from_logits

CASES = [(SMOLLM2_HEAD, CPU_STEP), (QWEN25_15B_HEAD, CPU_STEP), (SMOLLM2_HEAD, PAPER_STEP)]


def naive(hidden, weight, targets):
    return target_logprobs_from_logits(hidden @ weight.T, targets)


@pytest.mark.parametrize("provider", ["naive", "torch", "triton"])
@pytest.mark.parametrize("head,step", CASES, ids=[f"{h.name}-{s.name}" for h, s in CASES])
def test_fused_logprob(benchmark, provider, head, step):
    if step is PAPER_STEP and not torch.cuda.is_available():
        pytest.skip("paper-sized batch only on a GPU")
    if provider == "triton" and not torch.cuda.is_available():
        pytest.skip("the Triton kernel is timed on a GPU only (the interpreter is not a speed)")
    dev = device()
    rows = step.prompts * step.k * step.target_len
    hidden = torch.randn(rows, head.hidden, device=dev, requires_grad=True)
    weight = torch.randn(head.vocab, head.hidden, device=dev) / head.hidden ** 0.5
    targets = torch.randint(0, head.vocab, (rows,), device=dev)
    if provider == "naive":
        fn = naive
    else:
        def fn(h, w, t):
            return fused_logprob(h, w, t, backend=provider)

    def fwd_bwd():
        logp = fn(hidden, weight, targets)
        (grad,) = torch.autograd.grad(logp.sum(), hidden)
        return grad

    benchmark.group = f"fused_logprob/{head.name}-{step.name}"
    benchmark.extra_info.update(rows=rows, vocab=head.vocab, hidden=head.hidden,
                                logits_mib=rows * head.vocab * 4 / 2**20)
    benchmark(timed(fwd_bwd))
    benchmark.extra_info["tokens_per_s"] = rows / benchmark.stats.stats.median
