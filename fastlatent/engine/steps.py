"""Training steps on the engine: encode each prompt once, score every latent suffix
against the shared prefix (the full-sequence twins are in fastlatent.engine.generic)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastlatent.data.batch import Batch
from fastlatent.engine.decoder import Decoder
from fastlatent.engine.grpo import negative_perplexity
from fastlatent.engine.latents import chain_latents
from fastlatent.engine.scoring import score_targets
from fastlatent.model.reasoner import LatentReasoner


@dataclass
class SFTStepOutput:
    nll_sum: torch.Tensor  # scalar, sum of -log p over target tokens (with gradient)
    num_tokens: int


@dataclass
class RLStepOutput:
    """What one RL forward gives its caller, which pools the rewards, computes the
    advantages once and builds the loss (:func:`fastlatent.engine.grpo.grpo_loss`)."""

    token_logprobs: torch.Tensor  # [B, K, T] float32 with its graph, 0 at padding
    mask: torch.Tensor  # the tokens the loss averages: [B, T], or [B, K, T] per row
    rewards: torch.Tensor  # [B, K] float32, constants
    latent_norm: torch.Tensor  # [B] float32 ||r^0|| of each prompt's first latent, constants


def check_noise(noise: torch.Tensor, batch: int, hidden_size: int) -> int:
    """K, the rows per prompt, from the noise eps [B, K, d] (eps[:, 0] = 0 for r^0 = r)."""
    if noise.dim() != 3 or noise.shape[0] != batch or noise.shape[2] != hidden_size:
        raise ValueError(f"expected noise [{batch}, K, {hidden_size}], got {tuple(noise.shape)}")
    if noise.shape[1] < 1:
        raise ValueError(f"expected K >= 1 rows per prompt, got noise {tuple(noise.shape)}")
    return noise.shape[1]


def target_logprobs(reasoner: LatentReasoner, batch: Batch, *, decoder: Decoder | None = None,
                    backend: str | None = None) -> torch.Tensor:
    """log p(y_t | x, r^0, y_<t) [B, T] float32 (0 at padding) in ONE pass: the prompt once
    (with gradients when enabled), then the suffix [r, y] against its cache."""
    decoder = decoder or Decoder(reasoner.llm)
    reasoner.check_prompt(batch.prompt_ids, batch.prompt_mask)
    if reasoner.uses_latent:
        prefix = decoder.prefix(batch.prompt_ids[:, :-1], batch.prompt_mask[:, :-1])
        latents = chain_latents(reasoner, decoder, prefix,
                                reasoner.thought(prefix.hidden, prefix.hidden_mask), 1)
    else:
        prefix = decoder.prefix(batch.prompt_ids, batch.prompt_mask)
        latents = None
    return score_targets(decoder, prefix, latents, batch.target_ids, batch.target_mask, 1,
                         backend=backend)


def sft_step(reasoner: LatentReasoner, batch: Batch, *, decoder: Decoder | None = None,
             backend: str | None = None) -> SFTStepOutput:
    """Cross-entropy over target + EOS in one pass (see :func:`target_logprobs`)."""
    logp = target_logprobs(reasoner, batch, decoder=decoder, backend=backend)
    return SFTStepOutput(-logp.sum(), int(batch.target_mask.sum()))


def rl_step(reasoner: LatentReasoner, batch: Batch, *, noise: torch.Tensor, sigma: float,
            train_llm: bool = False, decoder: Decoder | None = None,
            backend: str | None = None) -> RLStepOutput:
    """Token log-probs and perplexity rewards of the K latent rows of each prompt.

    One prefix pass per prompt (frozen LLM: no gradient, unless ``train_llm``) ->
    LatentRATT -> K-way expansion r^k = r + sigma*eps_k (``noise`` eps [B, K, d], eps_0 =
    0) -> one suffix pass over [r^k, y] for all B*K rows against the shared prompt cache
    -> fused log-probs -> rewards from that same pass. Same contract as
    fastlatent.engine.generic.generic_rl_step.
    """
    if not reasoner.uses_latent:
        raise ValueError("RL needs a latent: this model was built with latent='none'")
    reasoner.check_prompt(batch.prompt_ids, batch.prompt_mask)
    b, d = len(batch), reasoner.llm.config.hidden_size
    k = check_noise(noise, b, d)
    decoder = decoder or Decoder(reasoner.llm)
    with torch.set_grad_enabled(train_llm and torch.is_grad_enabled()):
        prefix = decoder.prefix(batch.prompt_ids[:, :-1], batch.prompt_mask[:, :-1])
    # LatentRATT fused with the K-way expansion: [B, K, d] fp32, gradient to LatentRATT
    first = reasoner.thought(prefix.hidden, prefix.hidden_mask, noise=noise, sigma=sigma)
    latents = chain_latents(reasoner, decoder, prefix, first.reshape(b * k, d), k)
    logp = score_targets(decoder, prefix, latents, batch.target_ids.repeat_interleave(k, 0),
                         batch.target_mask.repeat_interleave(k, 0), k, backend=backend)
    token_logprobs = logp.view(b, k, -1)
    rewards = negative_perplexity(token_logprobs.detach(), batch.target_mask[:, None, :])
    return RLStepOutput(token_logprobs, batch.target_mask, rewards,
                        first[:, 0].detach().float().norm(dim=-1))
