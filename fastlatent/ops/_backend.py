"""Backend selection for the ops: one switch, ``FASTLATENT_BACKEND=auto|triton|torch``.

Order of precedence: the op's ``backend=`` argument, then the environment variable, then
``auto`` (Triton on CUDA devices, torch elsewhere). An op passes the implementations it
has as ``available``; a request for one it lacks falls back to ``"torch"``, as does a
Triton request for a CPU tensor outside Triton's interpreter (``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import os

import torch

from fastlatent.ops._launch import interpreting

ENV_VAR = "FASTLATENT_BACKEND"
CHOICES = ("auto", "triton", "torch")


def resolve_backend(device: torch.device, override: str | None = None,
                    available: tuple[str, ...] = ("torch",)) -> str:
    """Return ``"triton"`` or ``"torch"`` for an op on ``device`` (see module docstring)."""
    requested = override if override is not None else os.environ.get(ENV_VAR, "auto")
    if requested not in CHOICES:
        source = "backend" if override is not None else ENV_VAR
        raise ValueError(f"expected {source} in {CHOICES}, got {requested!r}")
    device = torch.device(device)
    if requested == "auto":
        requested = "triton" if device.type == "cuda" else "torch"
    if requested == "torch" or "triton" not in available:
        return "torch"
    if device.type != "cuda" and not interpreting():
        return "torch"
    return "triton"
