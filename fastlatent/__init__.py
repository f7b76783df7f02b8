"""fastlatent: an engine for LatentR3, latent-reasoning RL for LLM recommenders."""
