"""The latent tokens of each row against the shared prompt cache (paper App. E).

Latent 1 is r (or r + sigma*eps in RL, one row per sample); latent j+1 is the reasoner's
latent module (LatentRATT, or the last hidden state for "w/o LatentRATT") over the final
hidden states of [prompt, latents 1..j], with its query at latent j's position, without
noise. Each extra latent costs one suffix step per row against the prompt's cache; the
straightforward twin is :meth:`LatentReasoner.full_sequence_latents`.
"""

from __future__ import annotations

import torch

from fastlatent.engine.decoder import Decoder, PrefixCache
from fastlatent.model.reasoner import LatentReasoner


def chain_latents(reasoner: LatentReasoner, decoder: Decoder, prefix: PrefixCache,
                  first: torch.Tensor, rows_per_group: int) -> torch.Tensor:
    """latents [R, N, d] float32 from latent 1 ``first`` [R, d] (R = prompts *
    rows_per_group, rows grouped by prompt); N = ``reasoner.config.num_latents``.
    Differentiable in ``first``, the latent module and (when they carry gradients) the
    LLM's weights and the prefix."""
    n = reasoner.config.num_latents
    latents = [first.float()]
    if n == 1:
        return latents[0][:, None]
    rows = first.shape[0]
    hidden = [prefix.hidden.repeat_interleave(rows_per_group, dim=0)]
    mask = prefix.hidden_mask.repeat_interleave(rows_per_group, dim=0)
    one = torch.ones(rows, 1, dtype=mask.dtype, device=mask.device)
    cache = None
    for _ in range(1, n):
        step_hidden, cache = decoder.suffix(latents[-1][:, None].to(prefix.hidden.dtype), one,
                                            prefix, rows_per_group, cache)
        hidden.append(step_hidden)
        mask = torch.cat((mask, one), dim=1)
        latents.append(reasoner.thought(torch.cat(hidden, dim=1), mask))
    return torch.stack(latents, dim=1)
