"""The naive training-step oracles: the generic full-sequence steps of the runtime
(full sequences, full logits, no reused prompt cache), under their oracle names."""

from fastlatent.engine.generic import generic_rl_step as naive_rl_step
from fastlatent.engine.generic import generic_sft_step as naive_sft_step
from fastlatent.engine.scoring import target_logprobs_from_logits

__all__ = ["naive_rl_step", "naive_sft_step", "target_logprobs_from_logits"]
