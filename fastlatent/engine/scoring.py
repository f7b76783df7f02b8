"""Score target tokens after a shared prompt: the suffix pass plus the fused log-prob head.

Rows are grouped contiguously, ``rows_per_group`` per prompt. With latents, each row's
suffix is ``[latent_1..latent_N, y_1..y_T]`` and target j is predicted at suffix index
N-1+j. Without latents (plain SFT), y_1 is predicted from the prompt's last hidden state
and the suffix is the target itself.
"""

from __future__ import annotations

import torch

from fastlatent.engine.decoder import Decoder, PrefixCache
from fastlatent.ops.fused_logprob import fused_logprob


def target_logprobs_from_logits(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[target] in float32 from full logits [..., V] (the naive
    oracles' and the full-sequence path's last step)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return logp.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)


def body_hidden(model: torch.nn.Module, **inputs: torch.Tensor) -> torch.Tensor:
    """The last hidden states [R, L, d] (final norm applied) of one forward of the
    model's body (``model.base_model``): its own logits are never formed."""
    return model.base_model(**inputs, use_cache=False).last_hidden_state


def fp32_logits(model: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Logits [..., V] in float32 from the body's hidden states [..., d]: the LM head in
    float32, as the spec asks also for a bf16 model (whose own logits would be rounded to
    bf16 first), then the logit transform of the families that have one (Cohere's
    ``logit_scale``, Granite's ``logits_scaling``, Gemma 2's
    ``final_logit_softcapping``). For a float32 model: its own logits, bit for bit."""
    head = model.get_output_embeddings()
    bias = getattr(head, "bias", None)
    logits = torch.nn.functional.linear(hidden.float(), head.weight.float(),
                                        None if bias is None else bias.float())
    cfg = model.config
    if getattr(cfg, "logit_scale", None) is not None:
        logits = logits * cfg.logit_scale
    if getattr(cfg, "logits_scaling", None):
        logits = logits / cfg.logits_scaling
    if getattr(cfg, "final_logit_softcapping", None):
        cap = cfg.final_logit_softcapping
        logits = torch.tanh(logits / cap) * cap
    return logits


def lm_head_weight(llm: torch.nn.Module) -> torch.Tensor:
    head = llm.get_output_embeddings()
    if head is None or getattr(head, "bias", None) is not None:
        raise ValueError(f"{type(llm).__name__}: expected a bias-free linear LM head")
    return head.weight


def score_targets(decoder: Decoder, prefix: PrefixCache, latents: torch.Tensor | None,
                  target_ids: torch.Tensor, target_mask: torch.Tensor, rows_per_group: int,
                  *, backend: str | None = None) -> torch.Tensor:
    """Per-token log p(target) [R, T] float32 (0 at padding).

    latents [R, N, d] or None; target_ids / target_mask [R, T] right-padded;
    R = prefix.num_groups * rows_per_group. Differentiable in the latents (and in the
    prefix and weights when they carry gradients).
    """
    rows, t = target_ids.shape
    embed = decoder.llm.get_input_embeddings()
    targets_emb = embed(target_ids)
    if latents is not None:
        n = latents.shape[1]
        embeds = torch.cat((latents.to(targets_emb.dtype), targets_emb), dim=1)
        mask = torch.cat((torch.ones(rows, n, dtype=target_mask.dtype,
                                     device=target_mask.device), target_mask), dim=1)
        hidden, _ = decoder.suffix(embeds, mask, prefix, rows_per_group)
        predicting = hidden[:, n - 1:n - 1 + t]
    else:
        hidden, _ = decoder.suffix(targets_emb, target_mask, prefix, rows_per_group)
        first = prefix.last_hidden[:, None].repeat_interleave(rows_per_group, dim=0)
        predicting = torch.cat((first, hidden[:, :t - 1]), dim=1)
    return head_logprobs(predicting, target_ids, target_mask, lm_head_weight(decoder.llm),
                         backend=backend)


def head_logprobs(hidden: torch.Tensor, target_ids: torch.Tensor, target_mask: torch.Tensor,
                  weight: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """log p(target) [R, T] float32 from the hidden states [R, T, d] that predict each
    target, through the fused head; 0 at padding. Only the real positions go through the
    head (padding is ~half the rows when target lengths vary; finding them costs one
    device sync)."""
    rows, t = target_ids.shape
    real = target_mask.reshape(-1).bool()
    index = real.nonzero().squeeze(1)
    logp = fused_logprob(hidden.reshape(rows * t, -1).index_select(0, index), weight,
                         target_ids.reshape(-1).index_select(0, index), backend=backend)
    out = logp.new_zeros(rows * t).index_put((index,), logp)
    return out.view(rows, t)
