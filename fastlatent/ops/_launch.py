"""What every Triton launcher in ``fastlatent/ops`` needs: output buffers, grid sizes, the
unit-inner-stride rule, and bucketed autotune keys."""

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
