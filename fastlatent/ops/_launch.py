"""What every Triton launcher in ``fastlatent/ops`` needs: output buffers, grid sizes, the
unit-inner-stride rule, bucketed autotune keys and the dot-operand constexprs."""

from __future__ import annotations

import os

import torch


def interpreting() -> bool:
    """Whether Triton kernels run under the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def alloc(shape: tuple[int, ...], device: torch.device,
          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A buffer a Triton kernel writes in full (tests swap in a NaN-filled one through
    each launcher module's ``_alloc``)."""
    return torch.empty(shape, dtype=dtype, device=device)


def dot_args(dtype: torch.dtype) -> dict:
    """The ``tl.dot`` constexprs of a kernel whose dot operands come from tensors of
    ``dtype``: PRECISION ("tf32" is exact for bf16/fp16 operands, "tf32x3" keeps fp32
    accuracy), OPERAND (bf16/fp16 as they are on the GPU; fp32 for fp32 and under the
    interpreter, whose bf16 arithmetic is wrong) and ROUND_TO (under the interpreter,
    "bf16"/"fp16": the rounding the kernel emulates on the tiles it computes and rounds
    on the GPU, see kernels/rounding.py; "" otherwise)."""
    import triton.language as tl

    low = {torch.bfloat16: ("bf16", tl.bfloat16), torch.float16: ("fp16", tl.float16)}
    name, operand = low.get(dtype, ("", tl.float32))
    precision = "tf32" if name else "tf32x3"
    if interpreting():
        return dict(PRECISION=precision, OPERAND=tl.float32, ROUND_TO=name)
    return dict(PRECISION=precision, OPERAND=operand, ROUND_TO="")


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def unit_inner(x: torch.Tensor) -> torch.Tensor:
    """The kernels take any strides but a unit inner one."""
    return x if x.stride(-1) == 1 else x.contiguous()


def tune_bucket(n: int) -> int:
    """The autotune key for a length that changes from batch to batch (prompt length,
    query rows): the next power of two (at least 16), so a new padded length reuses the
    benchmark of its bucket instead of re-running the autotuner."""
    return max(16, 1 << max(0, n - 1).bit_length())
