"""kernels/rounding.py: the bf16/fp16 rounding the kernels use for dot operands equals
torch's (round to nearest, ties to even) -- on the GPU through ``.to(OPERAND)``, under
the interpreter through bit arithmetic for bf16 (the interpreter's own bf16 conversion
truncates) and numpy's conversion for fp16."""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

import triton.language as tl  # noqa: E402
from fastlatent.kernels.rounding import dot_operand  # noqa: E402

from fastlatent.testing.op_checks import DEVICE, INTERPRETING, needs_triton  # noqa: E402

pytestmark = needs_triton


def values() -> torch.Tensor:
    """Random magnitudes from 1e-30 to 1e30 of both signs, exact bf16 values, the ties
    halfway between neighbours (odd and even last bits) and points just beside them."""
    g = torch.Generator().manual_seed(0)
    rand = torch.randn(4000, generator=g) * torch.exp(torch.empty(4000).uniform_(-69, 69,
                                                                                  generator=g))
    base = torch.randn(500, generator=g).to(torch.bfloat16).float().view(torch.int32)
    ties = (base + 0x8000).view(torch.float32)
    near = torch.cat([(base + 0x7FFF).view(torch.float32), (base + 0x8001).view(torch.float32)])
    return torch.cat([rand, base.view(torch.float32), ties, near, torch.zeros(1)])


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")  # numpy, fp16 -> inf
@pytest.mark.parametrize("name,dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_dot_operands_are_rounded_as_torch_rounds(name, dtype):
    """What the kernels multiply: the GPU's conversion (OPERAND, where it runs) and the
    interpreter's emulation (ROUND_TO) both give torch's rounding, fp16's subnormals and
    overflow to inf included."""
    operand = {"bf16": tl.bfloat16, "fp16": tl.float16}[name]

    @triton.jit
    def _round(x, y, n, OPERAND: tl.constexpr, ROUND_TO: tl.constexpr, BLOCK: tl.constexpr):
        o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        b = dot_operand(tl.load(x + o, mask=o < n), OPERAND, ROUND_TO)
        tl.store(y + o, b.to(tl.float32), mask=o < n)

    x = values().to(DEVICE)
    want = x.to(dtype).float()
    for round_to in ([name, ""] if not INTERPRETING else [name]):
        y = torch.full_like(x, float("nan"))
        _round[(triton.cdiv(x.numel(), 256),)](x, y, x.numel(), OPERAND=operand,
                                               ROUND_TO=round_to, BLOCK=256)
        assert torch.equal(y, want), f"ROUND_TO={round_to!r}: {(y != want).sum()} differ"


@pytest.mark.skipif(not INTERPRETING, reason="documents the interpreter's conversion")
def test_the_interpreters_own_conversion_truncates():
    """Why the emulation exists: if this starts failing, the interpreter rounds and the
    bit arithmetic can go."""

    @triton.jit
    def _convert(x, y, n, BLOCK: tl.constexpr):
        o = tl.arange(0, BLOCK)
        tl.store(y + o, tl.load(x + o, mask=o < n).to(tl.bfloat16).to(tl.float32),
                 mask=o < n)

    x = torch.tensor([1 + 2 ** -8 + 2 ** -12])  # bf16 steps by 2^-7 here: nearest 1 + 2^-7
    y = torch.empty_like(x)
    _convert[(1,)](x, y, 1, BLOCK=16)
    assert x.to(torch.bfloat16).item() == 1 + 2 ** -7
    assert y.item() == 1.0
