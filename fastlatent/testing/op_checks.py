"""What the kernel-op tests share: where the Triton kernels can run, NaN-poisoned buffers (an
element a kernel fails to write shows up), the backend cases, the tolerance tables and the
"within twice the torch path's error" bound, and each op's input builder."""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Callable
from typing import Any

import pytest
import torch

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"

needs_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None or not (ON_GPU or INTERPRETING),
    reason="Triton needs to be installed, and CUDA or TRITON_INTERPRET=1")


# ---- where the kernels run ----------------------------------------------------------------

@functools.cache
def _runtime_loops_skip_reason() -> str | None:
    """Why the interpreter cannot loop over a runtime bound, or None where it can."""
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
            return (f"Triton {triton.__version__} interpreter with this numpy cannot "
                    "loop over runtime bounds (needs Triton >= 3.7 or numpy < 2.4)")
        raise
    if out.item() != 3:
        raise RuntimeError(f"interpreter probe counted {out.item()} iterations, expected 3")
    return None


def skip_unless_runtime_loops() -> None:
    """Triton 3.5-3.6's interpreter with numpy >= 2.4 cannot run ``range`` over a runtime
    value (int() of a one-element array); the kernels loop that way, as they must to
    pipeline on the GPU. Skip there with the reason, rather than fail on the toolchain.
    The probe runs once per process."""
    if INTERPRETING and (reason := _runtime_loops_skip_reason()) is not None:
        pytest.skip(reason)


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


def poisoning(module: Any) -> Callable[..., list[torch.Tensor]]:
    """The ``poisoned`` fixture of an op's test module (bind it as ``poisoned = poisoning(
    module)``): skips where the interpreter cannot run the kernels' loops, then makes every
    buffer ``module``'s Triton launchers allocate start as NaN; its value is the list of
    them."""

    @pytest.fixture(name="poisoned")
    def fixture(monkeypatch: pytest.MonkeyPatch) -> list[torch.Tensor]:
        skip_unless_runtime_loops()
        return poison_allocations(monkeypatch, module)

    return fixture


def triton_path(test: Callable[..., Any]) -> Callable[..., Any]:
    """Marks a test of an op's Triton path: skipped where Triton cannot run, and run with
    the module's ``poisoned`` fixture (see ``poisoning``). Without CUDA the kernels run
    under Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1) on tiny shapes;
    with CUDA the same tests run compiled, plus the real-size ones marked ``gpu``."""
    return needs_triton(pytest.mark.usefixtures("poisoned")(test))


class NoLaunch:
    """Stands in for a kernel: launching it writes nothing (so a poisoned buffer it should
    have written stays NaN)."""

    def __getitem__(self, grid: Any) -> Callable[..., None]:
        return lambda *args, **kwargs: None


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


# ---- tolerances and bounds ----------------------------------------------------------------

FP32_TOL = dict(rtol=1e-5, atol=1e-5)
_HEAD_TOL = {torch.float32: FP32_TOL, torch.float16: dict(rtol=2e-3, atol=2e-3),
             torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2)}
# op -> dtype -> torch.testing.assert_close tolerances against the float64 oracle
TOL = {
    "fused_logprob": _HEAD_TOL,
    "latent_attention": _HEAD_TOL,
    "shared_prefix_attention": {torch.float32: FP32_TOL,
                                torch.float16: dict(rtol=5e-3, atol=5e-3),
                                torch.bfloat16: dict(rtol=3e-2, atol=3e-2)},
}
# op -> dtype -> error floor (relative to the oracle's largest magnitude) added to the
# 2x-the-torch-path bound: the paths sum in different orders, so in fp32 both sit at ~1e-7.
_HEAD_FLOOR = {torch.float32: 1e-6, torch.float16: 2 ** -12, torch.bfloat16: 2 ** -9}
FLOOR = {
    "fused_logprob": _HEAD_FLOOR,
    "latent_attention": _HEAD_FLOOR,
    "shared_prefix_attention": {torch.float32: 1e-6, torch.float16: 2 ** -11,
                                torch.bfloat16: 2 ** -8},
}


def max_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return (x.double() - ref).abs().max().item() if x.numel() else 0.0


def assert_within_twice_torch(tri: torch.Tensor, tor: torch.Tensor, oracle: torch.Tensor,
                              dtype: torch.dtype, what: str, *, op: str) -> None:
    """Triton's error against the oracle is at most 2x the torch path's (plus a floor)."""
    scale = max(oracle.abs().max().item(), 1.0)
    tri_err, tor_err = max_err(tri, oracle), max_err(tor, oracle)
    bound = 2 * tor_err + FLOOR[op][dtype] * scale
    assert tri_err <= bound, f"{what}: triton err {tri_err:.3g} > {bound:.3g} (torch {tor_err:.3g})"


# ---- inputs -------------------------------------------------------------------------------

def fused_logprob_inputs(n: int, d: int, v: int, dtype: torch.dtype, seed: int = 0,
                         ignore_every: int = 0, *, weight_scale: float = 2.0,
                         device: str = DEVICE):
    """hidden [N, D] ~ N(0, 1), weight [V, D] ~ N(0, weight_scale^2 / D) (so the logits are
    ~ N(0, weight_scale^2)), targets [N] with every ``ignore_every``-th one ignored."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g).to(dtype)
    weight = (torch.randn(v, d, generator=g) * weight_scale / d ** 0.5).to(dtype)
    targets = torch.randint(0, v, (n,), generator=g)
    if ignore_every:
        targets[::ignore_every] = -100
    return hidden.to(device), weight.to(device), targets.to(device)


def shared_prefix_attention_inputs(g: int, rows_per_group: int, t: int, cached: int,
                                   n_rep: int, d: int, dtype: torch.dtype, seed: int = 0, *,
                                   common: int = 0, hkv: int = 2, length: int = 7,
                                   device: str = DEVICE) -> dict[str, Any]:
    """The op's keyword arguments: ragged left-padded prompts of width ``length`` (G=3:
    full, short, empty), random suffix validity (non-contiguous, as after beam reordering),
    S = T + cached; with ``common`` > 0, that many keys common to every group."""
    gen = torch.Generator().manual_seed(seed)
    r, s = g * rows_per_group, t + cached

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(dtype).to(device)

    lengths = torch.tensor([length, 2, 0] if g == 3 else
                           [max(length - 3 - 5 * i, 1) for i in range(g)])
    prefix_mask = (torch.arange(length)[None, :] >= length - lengths[:, None]).long()
    suffix_valid = torch.rand(r, s, generator=gen) < 0.7
    suffix_valid[0, -1] = True  # at least one valid query even over the empty prompt
    inputs = dict(q=rand(r, hkv * n_rep, t, d), k=rand(r, hkv, s, d), v=rand(r, hkv, s, d),
                  suffix_valid=suffix_valid.to(device), prefix_k=rand(g, hkv, length, d),
                  prefix_v=rand(g, hkv, length, d), prefix_mask=prefix_mask.to(device),
                  rows_per_group=rows_per_group, scale=d ** -0.5)
    if common:
        inputs.update(common_k=rand(1, hkv, common, d), common_v=rand(1, hkv, common, d))
    return inputs


def latent_attention_inputs(b: int, length: int, d: int, pad: str, dtype: torch.dtype,
                            seed: int = 0, poison: float = 1e4, *, device: str = DEVICE):
    """Ragged prompts: lengths [L, L-3, 1, L//2] (at least 1), padded on ``pad``'s side
    ("left", "right", or "none" when every row is full), padding content = ``poison``.
    Weights ~ N(0, 1/d) and biases ~ N(0, 0.1) so the softmax is far from one-hot.
    Returns hidden [B, L, d], mask [B, L] and the six weight tensors (fp32)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, length, d, generator=g)
    mask = torch.zeros(b, length, dtype=torch.long)
    lengths = [length, length - 3, 1, length // 2, length - 1][:b]
    for i, n in enumerate(lengths):
        n = length if pad == "none" else max(1, n)
        if pad == "left":
            mask[i, length - n:] = 1
        else:
            mask[i, :n] = 1
    hidden[mask == 0] = poison
    tensors = []
    for i in range(6):
        shape = (d, d) if i % 2 == 0 else (d,)
        scale = d ** -0.5 if i % 2 == 0 else 0.1
        tensors.append((torch.randn(*shape, generator=g) * scale).to(device))
    return hidden.to(dtype).to(device), mask.to(device), tensors


def grads_of(loss, params):
    return torch.autograd.grad(loss, params, allow_unused=True)


def assert_grads_close(got, ref, rtol=1e-4, atol=1e-5):
    """Gradients compared after scaling by the reference's largest entry (fp32 sums of
    advantage-weighted terms cancel, so elementwise relative error is not meaningful)."""
    for g, r in zip(got, ref, strict=True):
        if r is None:
            assert g is None or float(g.abs().max()) == 0.0
            continue
        scale = float(r.abs().max()) + 1e-12
        torch.testing.assert_close(g / scale, r / scale, rtol=rtol, atol=atol)
