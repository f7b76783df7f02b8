"""fastlatent: an engine for LatentR3, latent-reasoning RL for LLM recommenders.

Public API (imported on first use, so ``import fastlatent`` stays light):
``ppl_reward`` (perplexity reward of many latents per prompt from one prompt encoding),
``latent_grpo_loss`` (pooled-advantage latent GRPO loss) and ``recommend(reasoner,
histories, top=10)`` (the next titles for users, from a trained model).
"""

from __future__ import annotations

from typing import Any

__all__ = ["latent_grpo_loss", "ppl_reward", "recommend"]


def __getattr__(name: str) -> Any:
    if name == "ppl_reward":
        from fastlatent.reward import ppl_reward

        return ppl_reward
    if name == "latent_grpo_loss":
        from fastlatent.engine.grpo import latent_grpo_loss

        return latent_grpo_loss
    if name == "recommend":
        from fastlatent.recommendation import recommend

        return recommend
    raise AttributeError(f"module 'fastlatent' has no attribute {name!r}")
