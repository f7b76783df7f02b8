"""Training steps on the engine: encode each prompt once, score every latent suffix
against the shared prefix (the full-sequence twins are in fastlatent.engine.generic)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from fastlatent.data.batch import Batch
from fastlatent.engine.decoder import Decoder
from fastlatent.engine.grpo import (
    latent_grpo_loss,
    ppl_rewards,
    sample_noise,
)
from fastlatent.engine.latents import chain_latents
from fastlatent.engine.scoring import score_targets
from fastlatent.model.reasoner import LatentReasoner


@dataclass
class SFTStepOutput:
    nll_sum: torch.Tensor  # scalar, sum of -log p over target tokens (with gradient)
    num_tokens: int


@dataclass
class RLStepOutput:
    loss: torch.Tensor  # scalar, gradient reaches LatentRATT only
    rewards: torch.Tensor  # [B, K] float32
    advantages: torch.Tensor  # [B, K] float32
    token_logprobs: torch.Tensor  # [B, K, T] float32, 0 where the target is padding


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


def rl_step(reasoner: LatentReasoner, batch: Batch, *, k: int, sigma: float,
            pool: str = "batch", noise: torch.Tensor | None = None,
            generator: torch.Generator | None = None, eps: float | None = None,
            advantages: torch.Tensor | None = None,
            pool_rewards: Callable[[torch.Tensor], torch.Tensor] | None = None,
            train_llm: bool = False, decoder: Decoder | None = None,
            backend: str | None = None) -> RLStepOutput:
    """Latent GRPO loss for one micro-batch: the advantage pool, unless ``advantages``
    [B, K] pooled over a larger batch by the caller are given.

    One prefix pass per prompt (frozen LLM: no gradient, unless ``train_llm``) ->
    LatentRATT -> K-way expansion r^k = r + sigma*eps_k (eps_0 = 0) -> one suffix pass
    over [r^k, y] for all B*K rows against the shared prompt cache -> fused log-probs ->
    rewards and loss from that same pass. Same contract as
    fastlatent.engine.generic.generic_rl_step.
    """
    if k < 1:
        raise ValueError(f"expected k >= 1, got {k}")
    if not reasoner.uses_latent:
        raise ValueError("RL needs a latent: this model was built with latent='none'")
    reasoner.check_prompt(batch.prompt_ids, batch.prompt_mask)
    decoder = decoder or Decoder(reasoner.llm)
    b, d = len(batch), reasoner.llm.config.hidden_size
    with torch.set_grad_enabled(train_llm and torch.is_grad_enabled()):
        prefix = decoder.prefix(batch.prompt_ids[:, :-1], batch.prompt_mask[:, :-1])
    if noise is None:
        noise = sample_noise(b, k, d, generator=generator, device=prefix.hidden.device)
    if noise.shape != (b, k, d):
        raise ValueError(f"expected noise [{b}, {k}, {d}], got {tuple(noise.shape)}")
    # LatentRATT fused with the K-way expansion: [B, K, d] fp32, gradient to LatentRATT
    first = reasoner.thought(prefix.hidden, prefix.hidden_mask, noise=noise, sigma=sigma)
    latents = chain_latents(reasoner, decoder, prefix, first.reshape(b * k, d), k)
    logp = score_targets(decoder, prefix, latents, batch.target_ids.repeat_interleave(k, 0),
                         batch.target_mask.repeat_interleave(k, 0), k, backend=backend)
    token_logprobs = logp.view(b, k, -1)
    rewards = ppl_rewards(token_logprobs, batch.target_mask[:, None, :])
    loss, advantages = latent_grpo_loss(token_logprobs, batch.target_mask, rewards, pool=pool,
                                        eps=eps, advantages=advantages,
                                        pool_rewards=pool_rewards)
    return RLStepOutput(loss, rewards, advantages, token_logprobs.detach())
