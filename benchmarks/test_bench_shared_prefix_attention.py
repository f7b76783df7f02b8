"""Suffix attention over a shared prompt: naive = SDPA over the prompt cache expanded per
row (what a generic engine does), torch / triton = the cascade op (prompt K/V read once
per group). The "-tree" shapes add the third level: keys common to every prompt (the
release template's instruction), read once per batch by the op and copied into every row
by the naive path."""

from __future__ import annotations

import pytest
import torch
from conftest import device, timed
from shapes import CPU_STEP, CPU_TREE_STEP, PAPER_STEP, PAPER_TREE_STEP

from fastlatent.ops.shared_prefix_attention import shared_prefix_attention

# (name, query heads, kv heads, head dim): one layer of SmolLM2-135M and of Qwen2.5-1.5B
LAYERS = [("smollm2", 9, 3, 64), ("qwen2.5-1.5b", 12, 2, 128)]


def make(step, heads, kv_heads, dim, dev):
    g, k, length, t = step.prompts, step.k, step.prompt_len, step.target_len + 1
    rows = g * k
    q = torch.randn(rows, heads, t, dim, device=dev)
    ks = torch.randn(rows, kv_heads, t, dim, device=dev)
    vs = torch.randn(rows, kv_heads, t, dim, device=dev)
    valid = torch.ones(rows, t, dtype=torch.bool, device=dev)
    pk = torch.randn(g, kv_heads, length, dim, device=dev)
    pv = torch.randn(g, kv_heads, length, dim, device=dev)
    pmask = torch.ones(g, length, dtype=torch.long, device=dev)
    common = {}
    if step.common_len:
        common = dict(common_k=torch.randn(1, kv_heads, step.common_len, dim, device=dev),
                      common_v=torch.randn(1, kv_heads, step.common_len, dim, device=dev))
    return (q, ks, vs, valid, pk, pv, pmask, k), common


def sdpa_expanded(q, k, v, valid, pk, pv, pmask, rows_per_group, *, scale, common_k=None,
                  common_v=None):
    """Copy the common and each prompt's K/V to its rows, concatenate the suffix, one
    masked SDPA call."""
    n_rep = q.shape[1] // k.shape[1]
    t = q.shape[2]
    if common_k is not None:
        g = pk.shape[0]
        pk = torch.cat((common_k.expand(g, -1, -1, -1), pk), dim=2)
        pv = torch.cat((common_v.expand(g, -1, -1, -1), pv), dim=2)
        pmask = torch.cat((pmask.new_ones(g, common_k.shape[2]), pmask), dim=1)
    keys = torch.cat((pk.repeat_interleave(rows_per_group, 0), k), dim=2)
    values = torch.cat((pv.repeat_interleave(rows_per_group, 0), v), dim=2)
    keys = keys.repeat_interleave(n_rep, 1)
    values = values.repeat_interleave(n_rep, 1)
    causal = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
    allowed = torch.cat((pmask.bool().repeat_interleave(rows_per_group, 0)[:, None, :]
                         .expand(-1, t, -1), causal[None] & valid[:, None, :]), dim=2)
    return torch.nn.functional.scaled_dot_product_attention(
        q, keys, values, attn_mask=allowed[:, None], scale=scale)


@pytest.mark.parametrize("provider", ["naive", "torch", "triton"])
@pytest.mark.parametrize("layer", LAYERS, ids=[n for n, *_ in LAYERS])
@pytest.mark.parametrize("step", [CPU_STEP, PAPER_STEP, CPU_TREE_STEP, PAPER_TREE_STEP],
                         ids=["cpu", "paper", "cpu-tree", "paper-tree"])
def test_shared_prefix_attention(benchmark, provider, layer, step):
    if step.prompts > CPU_STEP.prompts and not torch.cuda.is_available():
        pytest.skip("paper-sized batch only on a GPU")
    if provider == "triton" and not torch.cuda.is_available():
        pytest.skip("the Triton kernel is timed on a GPU only (the interpreter is not a speed)")
    name, heads, kv_heads, dim = layer
    args, common = make(step, heads, kv_heads, dim, device())
    scale = dim ** -0.5
    if provider == "naive":
        def fn():
            return sdpa_expanded(*args, scale=scale, **common)
    else:
        def fn():
            return shared_prefix_attention(*args, scale=scale, backend=provider, **common)
    benchmark.group = f"shared_prefix_attention/{name}-{step.name}"
    benchmark.extra_info.update(prompts=step.prompts, k=step.k, prompt_len=step.prompt_len,
                                common_len=step.common_len)
    benchmark(timed(fn))
