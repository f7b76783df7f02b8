"""The ops' two environment switches: backend selection and value checks.

``FASTLATENT_BACKEND=auto|triton|torch``. Order of precedence: the op's ``backend=``
argument, then the environment variable, then ``auto`` (Triton on CUDA devices, torch
elsewhere). An op passes the implementations it has as ``available``; a request for one
it lacks falls back to ``"torch"``, as does a Triton request for a CPU tensor outside
Triton's interpreter (``TRITON_INTERPRET=1``).

``FASTLATENT_DEBUG_CHECKS=1``. Checks of input *values* (targets inside the vocabulary,
at least one real token per mask row) read tensor contents, which on a GPU is a host
sync; they run on GPU tensors only with this switch, and always on CPU tensors (no
sync). Shape, dtype and device checks need no values and always run.
"""

from __future__ import annotations

import os

import torch

from fastlatent.ops._launch import interpreting

ENV_VAR = "FASTLATENT_BACKEND"
CHOICES = ("auto", "triton", "torch")
DEBUG_CHECKS_ENV_VAR = "FASTLATENT_DEBUG_CHECKS"


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


def checks_values(*tensors: torch.Tensor) -> bool:
    """Whether an op validates the values of ``tensors`` (see module docstring): always
    when they are all on the CPU, else only with ``FASTLATENT_DEBUG_CHECKS=1``."""
    if all(t.device.type == "cpu" for t in tensors):
        return True
    return os.environ.get(DEBUG_CHECKS_ENV_VAR) == "1"
