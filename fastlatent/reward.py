"""Public perplexity-reward API for latent-RL code: score many latent "thoughts" per prompt
against one encoding of the prompt.

    rewards = fastlatent.ppl_reward(model, prompt_ids, prompt_mask, latents,
                                    target_ids, target_mask)        # [B, K] float32
"""

from __future__ import annotations

import sys

import torch

from fastlatent.engine.decoder import Decoder, UnsupportedModelError
from fastlatent.engine.grpo import negative_perplexity
from fastlatent.engine.scoring import (
    body_hidden,
    fp32_logits,
    score_targets,
    target_logprobs_from_logits,
)
from fastlatent.ops.positions import positions_from_mask


def _check_ids(ids: torch.Tensor, mask: torch.Tensor, name: str, vocab_size: int) -> None:
    if ids.dim() != 2 or mask.shape != ids.shape:
        raise ValueError(f"expected {name}_ids and {name}_mask [B, length] of one shape, got "
                         f"{tuple(ids.shape)} and {tuple(mask.shape)}")
    if ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"expected integer {name}_ids, got {ids.dtype}")
    if mask.dtype != torch.bool and (mask.is_floating_point() or mask.is_complex()):
        raise ValueError(f"expected a bool or integer {name}_mask of 0s and 1s, got {mask.dtype}")
    off = (mask != 0) & (mask != 1)
    if bool(off.any()):
        where = off.nonzero()[0].tolist()
        raise ValueError(f"expected {name}_mask to hold only 0 and 1, got "
                         f"{mask[tuple(where)].item()} at [row, position] = {where}")
    if bool((mask.sum(-1) == 0).any()):
        raise ValueError(f"expected at least one real token in every {name} row "
                         f"({name}_mask has an all-zero row)")
    real = mask.bool()
    outside = real & (ids >= vocab_size)  # negative ids: _clear_padding names them
    if name == "prompt":
        outside |= real & (ids < 0)
    if bool(outside.any()):
        where = outside.nonzero()[0].tolist()
        raise ValueError(f"{name}_ids hold an id outside the model's vocabulary of "
                         f"{vocab_size}: {ids[tuple(where)].item()} at [row, position] = "
                         f"{where}")


def _clear_padding(target_ids: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
    """Padded target positions set to id 0 (they may hold -100, HF's ignore index); a
    negative id at a real position is an error."""
    real = target_mask.bool()
    if bool((target_ids[real] < 0).any()):
        raise ValueError("target_ids hold a negative id (e.g. -100) at a position "
                         "target_mask marks as real; mark it 0 in target_mask or fix the id")
    return target_ids.masked_fill(~real, 0)


def left_align(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Move each row's real tokens to the right end, keeping their order (left padding)."""
    order = torch.argsort(mask.bool().long(), dim=1, stable=True)
    return ids.gather(1, order), mask.gather(1, order)


def _is_right_padded(mask: torch.Tensor) -> bool:
    m = mask.bool()
    return bool((m[:, 1:] <= m[:, :-1]).all())


def ppl_reward(model: torch.nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
               latents: torch.Tensor, target_ids: torch.Tensor, target_mask: torch.Tensor, *,
               backend: str | None = None, return_logprobs: bool = False,
               check_finite: bool = True):
    """Reward ``-exp(mean NLL)`` of each target under each latent, from one prompt encoding.

    Args:
        model: a Hugging Face causal LM (pass a LatentReasoner's ``.llm``). The Llama,
            Qwen2/2.5, Qwen3 and Mistral families use the shared-prefix engine; other models
            that take ``inputs_embeds`` go through their own forward (a notice says so).
        prompt_ids, prompt_mask: [B, L]; left- or right-padded (the mask decides); no
            thought token.
        latents: [B, K, N, d] vectors in the model's input-embedding space, placed right
            after each prompt (N latent positions per sample).
        target_ids, target_mask: [B, T] right-padded; scored exactly as masked (append EOS
            yourself if it should count). Padded positions may hold any id, including
            Hugging Face's ignore index -100.
        backend: None/"auto", "torch" or "triton" (falls back to torch where no kernel).
        return_logprobs: also return per-token log-probs [B, K, T] (0 at padding).
        check_finite: raise ValueError when a latent holds NaN or Inf (one device sync;
            pass False where that sync costs too much and you check elsewhere).

    Returns rewards [B, K] float32, differentiable in ``latents`` when they require grad
    (the prompt pass runs without gradient), and optionally the log-probs.
    """
    vocab_size = model.get_input_embeddings().weight.shape[0]
    head = model.get_output_embeddings()
    if head is not None:
        vocab_size = min(vocab_size, head.weight.shape[0])
    _check_ids(prompt_ids, prompt_mask, "prompt", vocab_size)
    _check_ids(target_ids, target_mask, "target", vocab_size)
    if target_ids.shape[0] != prompt_ids.shape[0]:
        raise ValueError(f"expected {prompt_ids.shape[0]} target rows, got {target_ids.shape[0]}")
    if not _is_right_padded(target_mask):
        raise ValueError("expected right-padded targets (target_mask rows like 1 1 1 0 0)")
    hidden_size = model.config.hidden_size
    b = prompt_ids.shape[0]
    if latents.dim() != 4 or latents.shape[0] != b or latents.shape[3] != hidden_size:
        raise ValueError(f"expected latents [{b}, K, N, {hidden_size}], got "
                         f"{tuple(latents.shape)}")
    if not latents.is_floating_point():
        raise ValueError(f"expected floating-point latents, got {latents.dtype}")
    device = model.get_input_embeddings().weight.device
    for name, t in (("prompt_ids", prompt_ids), ("latents", latents), ("target_ids", target_ids)):
        if t.device != device:
            raise ValueError(f"expected {name} on the model's device {device}, got {t.device}")
    if check_finite:
        bad = ~torch.isfinite(latents.detach()).all(dim=-1)  # [B, K, N]
        if bool(bad.any()):
            where = bad.nonzero()[0].tolist()
            raise ValueError(f"latents hold NaN or Inf ({int(bad.sum())} of {bad.numel()} "
                             f"vectors; first at [b, k, n] = {where}); the rewards would be "
                             "NaN (check_finite=False skips this check)")
    target_ids = _clear_padding(target_ids, target_mask)
    k, n = latents.shape[1], latents.shape[2]
    ids, mask = left_align(prompt_ids.long(), prompt_mask)
    tgt_ids = target_ids.long().repeat_interleave(k, 0)
    tgt_mask = target_mask.repeat_interleave(k, 0)
    rows = latents.reshape(b * k, n, hidden_size)
    try:
        decoder = Decoder(model)
    except UnsupportedModelError:
        kind = getattr(model.config, "model_type", "?")
        print(f"notice: {type(model).__name__} ({kind}) is not a family the shared-prefix "
              "engine covers (Llama, Qwen2/2.5, Qwen3, Mistral); ppl_reward scores it "
              "through the model's own forward instead, each prompt repeated per sample: the "
              "same rewards, computed more slowly", file=sys.stderr)
        logp = _generic_logprobs(model, ids, mask, rows, tgt_ids, tgt_mask, k)
    else:
        with torch.no_grad():
            prefix = decoder.prefix(ids, mask)
        logp = score_targets(decoder, prefix, rows, tgt_ids, tgt_mask, k, backend=backend)
    logp = logp.view(b, k, -1)
    rewards = negative_perplexity(logp, target_mask[:, None, :])
    return (rewards, logp) if return_logprobs else rewards


def _generic_logprobs(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor,
                      latents: torch.Tensor, target_ids: torch.Tensor,
                      target_mask: torch.Tensor, k: int) -> torch.Tensor:
    """Per-token log-probs [B*K, T] from one forward of the model over
    [prompt (left-padded, repeated K times), latents, target] — for families the Decoder
    does not reproduce. Needs a model that accepts ``inputs_embeds``."""
    embed = model.get_input_embeddings()
    prompt = embed(ids).repeat_interleave(k, 0)
    full = torch.cat((prompt, latents.to(prompt.dtype), embed(target_ids)), dim=1)
    full_mask = torch.cat((mask.repeat_interleave(k, 0),
                           torch.ones(latents.shape[:2], dtype=mask.dtype, device=mask.device),
                           target_mask), dim=1)
    try:
        hidden = body_hidden(model, inputs_embeds=full, attention_mask=full_mask,
                             position_ids=positions_from_mask(full_mask))
    except TypeError as err:
        raise ValueError(f"{type(model).__name__} cannot be scored: it is not a supported "
                         f"family and its forward does not take inputs_embeds/position_ids "
                         f"({err})") from err
    start = ids.shape[1] + latents.shape[1] - 1
    t = target_ids.shape[1]
    logp = target_logprobs_from_logits(fp32_logits(model, hidden)[:, start:start + t],
                                       target_ids)
    return logp * target_mask.to(logp.dtype)
