"""One autograd-aware entry point per fused op; each picks Triton or PyTorch per device
(see ``_backend.resolve_backend``)."""

from fastlatent.ops.fused_logprob import fused_logprob
from fastlatent.ops.latent_attention import latent_attention
from fastlatent.ops.shared_prefix_attention import shared_prefix_attention

__all__ = ["fused_logprob", "latent_attention", "shared_prefix_attention"]
