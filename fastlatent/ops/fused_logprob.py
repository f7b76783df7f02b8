"""Fused log-prob head: per-token ``log softmax(h W^T)[target]`` without ``[N, V]`` logits.

The LM-head product is taken over vocabulary tiles with an online log-sum-exp, every row
of the call against each tile (so the weight is read once per call, not once per row
chunk); accumulation in float32. Backward recomputes each tile's logits from the saved
per-row log-sum-exp:

    d logp_n / d h_n = W[t_n] - sum_v p_nv W_v,   d logp_n / d W_v = (1[v = t_n] - p_nv) h_n

Targets equal to -100 are ignored (log-prob 0, no gradient).
"""

from __future__ import annotations

import torch

from fastlatent.ops._backend import resolve_backend

IGNORE_INDEX = -100
VOCAB_TILE = 8192


def _check_inputs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> None:
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"expected hidden [N, D] and weight [V, D], got "
                         f"{tuple(hidden.shape)} and {tuple(weight.shape)}")
    if targets.shape != hidden.shape[:1] or targets.dtype != torch.long:
        raise ValueError(f"expected int64 targets [{hidden.shape[0]}], got "
                         f"{targets.dtype} {tuple(targets.shape)}")
    if not (hidden.device == weight.device == targets.device):
        raise ValueError(f"expected hidden, weight and targets on one device, got "
                         f"{hidden.device}, {weight.device}, {targets.device}")
    if not (hidden.is_floating_point() and weight.is_floating_point()):
        raise ValueError(f"expected floating-point hidden and weight, got "
                         f"{hidden.dtype} and {weight.dtype}")
    valid = targets[targets != IGNORE_INDEX]
    if valid.numel() and (int(valid.min()) < 0 or int(valid.max()) >= weight.shape[0]):
        raise ValueError(f"expected targets in [0, {weight.shape[0]}) or {IGNORE_INDEX}, got "
                         f"values in [{int(valid.min())}, {int(valid.max())}]")


def _fused_logprob_fwd(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                       vocab_tile: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (logp [N] fp32 with 0 at ignored rows, lse [N] fp32)."""
    h = hidden.float()
    n, v = h.shape[0], weight.shape[0]
    running_max = torch.full((n,), float("-inf"), device=h.device)
    running_sum = torch.zeros(n, device=h.device)
    target_logit = torch.zeros(n, device=h.device)
    safe_targets = targets.clamp_min(0)
    for start in range(0, v, vocab_tile):
        tile = h @ weight[start:start + vocab_tile].float().T  # [N, tile]
        new_max = torch.maximum(running_max, tile.amax(-1))
        running_sum = running_sum * torch.exp(running_max - new_max) + torch.exp(
            tile - new_max[:, None]).sum(-1)
        running_max = new_max
        inside = (safe_targets >= start) & (safe_targets < start + tile.shape[1])
        local = (safe_targets - start).clamp(0, tile.shape[1] - 1)
        target_logit = torch.where(inside, tile.gather(1, local[:, None])[:, 0], target_logit)
    lse = running_max + torch.log(running_sum)
    logp = torch.where(targets == IGNORE_INDEX, torch.zeros_like(lse), target_logit - lse)
    return logp, lse


def _fused_logprob_bwd(grad_logp: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor,
                       targets: torch.Tensor, lse: torch.Tensor, vocab_tile: int,
                       need_hidden: bool, need_weight: bool):
    h = hidden.float()
    g = torch.where(targets == IGNORE_INDEX, torch.zeros_like(grad_logp), grad_logp.float())
    grad_h = torch.zeros_like(h) if need_hidden else None
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
        if need_weight else None
    for start in range(0, weight.shape[0], vocab_tile):
        w_tile = weight[start:start + vocab_tile].float()
        p = torch.exp(h @ w_tile.T - lse[:, None]) * g[:, None]  # [N, tile] = g * softmax
        if need_hidden:
            grad_h -= p @ w_tile
        if need_weight:
            grad_w[start:start + vocab_tile] -= p.T @ h
    valid = targets != IGNORE_INDEX
    rows, tgt = valid.nonzero()[:, 0], targets[valid]
    if need_hidden:
        grad_h[rows] += g[rows, None] * weight[tgt].float()
    if need_weight:
        grad_w.index_add_(0, tgt, g[rows, None] * h[rows])
    return (grad_h.to(hidden.dtype) if need_hidden else None,
            grad_w.to(weight.dtype) if need_weight else None)


class _FusedLogprobTorchFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, vocab_tile: int):
        logp, lse = _fused_logprob_fwd(hidden, weight, targets, vocab_tile)
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.vocab_tile = vocab_tile
        return logp

    @staticmethod
    def backward(ctx, grad_logp):
        hidden, weight, targets, lse = ctx.saved_tensors
        grad_h, grad_w = _fused_logprob_bwd(
            grad_logp, hidden, weight, targets, lse, ctx.vocab_tile,
            ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        return grad_h, grad_w, None, None


def fused_logprob_torch(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                        vocab_tile: int = VOCAB_TILE) -> torch.Tensor:
    """PyTorch implementation of :func:`fused_logprob` (tiled over the vocabulary)."""
    return _FusedLogprobTorchFn.apply(hidden, weight, targets, vocab_tile)


def fused_logprob(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                  backend: str | None = None, vocab_tile: int = VOCAB_TILE) -> torch.Tensor:
    """Per-token log p(target) without materialising logits.

    Args: hidden [N, D], weight [V, D] (the LM head), targets [N] int64 (-100 = ignore).
    Returns: logp [N] float32 (0 at ignored rows); differentiable in hidden and weight.
    """
    _check_inputs(hidden, weight, targets)
    if vocab_tile < 1:
        raise ValueError(f"expected vocab_tile >= 1, got {vocab_tile}")
    resolve_backend(hidden.device, backend, available=("torch",))
    return fused_logprob_torch(hidden, weight, targets, vocab_tile=vocab_tile)
