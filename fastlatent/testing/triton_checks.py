"""Shared pieces of the Triton kernel tests: where the kernels can run, the interpreter
toolchain probe, and NaN-poisoned buffers (an element a kernel fails to write shows up)."""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"

needs_triton = pytest.mark.skipif(not (ON_GPU or INTERPRETING),
                                  reason="Triton needs CUDA or TRITON_INTERPRET=1")


def skip_unless_runtime_loops() -> None:
    """Triton 3.5-3.6's interpreter with numpy >= 2.4 cannot run ``range`` over a runtime
    value (int() of a one-element array); the kernels loop that way, as they must to
    pipeline on the GPU. Skip there with the reason, rather than fail on the toolchain."""
    if not INTERPRETING:
        return
    import triton
    import triton.language as tl

    @triton.jit
    def _count(out, n):
        acc = 0
        for _ in range(0, tl.cdiv(n, 2)):
            acc += 1
        tl.store(out, acc)

    out = torch.zeros(1, dtype=torch.int32)
    try:
        _count[(1,)](out, 5)
    except Exception as exc:  # InterpreterError wrapping numpy's TypeError
        if "0-dimensional" in str(exc):
            pytest.skip(f"Triton {triton.__version__} interpreter with this numpy cannot "
                        "loop over runtime bounds (needs Triton >= 3.7 or numpy < 2.4)")
        raise
    if out.item() != 3:
        raise RuntimeError(f"interpreter probe counted {out.item()} iterations, expected 3")


def poison_allocations(monkeypatch: pytest.MonkeyPatch, module: Any) -> list[torch.Tensor]:
    """Make ``module._alloc`` (the buffers a Triton launcher hands its kernels) return
    NaN-filled tensors; returns the list of every buffer allocated."""
    buffers: list[torch.Tensor] = []
    real = module._alloc

    def alloc(*args: Any, **kwargs: Any) -> torch.Tensor:
        buf = real(*args, **kwargs).fill_(float("nan"))
        buffers.append(buf)
        return buf

    monkeypatch.setattr(module, "_alloc", alloc)
    return buffers


# FASTLATENT_BACKEND (None = unset), the op's backend argument, whether Triton must run.
backend_cases = pytest.mark.parametrize("env,override,expect_triton", [
    ("triton", None, True),
    ("torch", None, False),
    ("torch", "triton", True),
    ("triton", "torch", False),
    ("auto", None, ON_GPU),
    (None, None, ON_GPU),
], ids=["env-triton", "env-torch", "arg-beats-env", "arg-torch", "auto", "unset"])


def set_backend_env(monkeypatch: pytest.MonkeyPatch, env: str | None) -> None:
    if env is None:
        monkeypatch.delenv("FASTLATENT_BACKEND", raising=False)
    else:
        monkeypatch.setenv("FASTLATENT_BACKEND", env)


def spy_on(monkeypatch: pytest.MonkeyPatch, module: Any, name: str) -> list[int]:
    """Wrap ``module.name`` so each call appends to the returned list, then runs it."""
    calls: list[int] = []
    real = getattr(module, name)

    def spy(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    return calls
