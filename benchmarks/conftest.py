"""Benchmarks run with `pytest benchmarks/ --benchmark-only` (not part of the test run)."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def timed(fn):
    """Wrap ``fn`` so that on CUDA the timing includes the kernels it queued."""
    if not torch.cuda.is_available():
        return fn

    def run():
        out = fn()
        torch.cuda.synchronize()
        return out
    return run
