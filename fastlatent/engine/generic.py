"""The full-sequence (generic) path and the one place that chooses it.

The generic steps do what the authors' release does: full sequences through the model's
own forward, full ``[rows, tokens, vocab]`` logits, no reuse of the prompt's KV cache.
They run for model families the engine's Decoder does not reproduce, and are the oracles
every fast path is tested against (the test helpers re-export them as ``naive_*``).
:func:`step_for` and :func:`beam_search_for` choose engine or generic for every stage.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import partial
from typing import Any

import torch

from fastlatent import distributed
from fastlatent.data.batch import Batch
from fastlatent.data.trie import TitleTrie
from fastlatent.engine.beam_search import TrieTensors, engine_beam_search
from fastlatent.engine.decoder import Decoder, UnsupportedModelError
from fastlatent.engine.exact_match import exact_match_rl_step
from fastlatent.engine.generate_search import generate_beam_search
from fastlatent.engine.grpo import negative_perplexity
from fastlatent.engine.scoring import body_hidden, fp32_logits, target_logprobs_from_logits
from fastlatent.engine.steps import (
    RLStepOutput,
    SFTStepOutput,
    check_noise,
    rl_step,
    sft_step,
)
from fastlatent.model.reasoner import LatentReasoner
from fastlatent.ops.positions import positions_from_mask


def generic_sft_step(reasoner: LatentReasoner, batch: Batch) -> SFTStepOutput:
    """Cross-entropy over target + EOS, the release's way: one full pass over the prompt
    for r, then a second full pass over [prompt, r, target]; gradients through both."""
    prompt, prompt_mask = reasoner.prompt_inputs(batch.prompt_ids, batch.prompt_mask)
    embeds = torch.cat((prompt, reasoner.embed(batch.target_ids)), dim=1)
    mask = torch.cat((prompt_mask, batch.target_mask), dim=1)
    logits = fp32_logits(reasoner.llm, body_hidden(
        reasoner.llm, inputs_embeds=embeds, attention_mask=mask,
        position_ids=positions_from_mask(mask)))
    length, t = prompt.shape[1], batch.target_ids.shape[1]
    logp = target_logprobs_from_logits(logits[:, length - 1:length - 1 + t], batch.target_ids)
    weight = batch.target_mask.to(logp.dtype)
    return SFTStepOutput(-(logp * weight).sum(), int(batch.target_mask.sum()))


def generic_rl_step(reasoner: LatentReasoner, batch: Batch, *, noise: torch.Tensor,
                    sigma: float) -> RLStepOutput:
    """Token log-probs and perplexity rewards of the K latent rows of each prompt,
    straightforwardly.

    r from one prefix pass (the LLM is frozen, so without gradient); then, for each
    prompt, one forward over its K full rows [prompt, r + sigma*eps_k (+ further latents),
    target]; log-probs from the LM head in float32 over the target positions. ``noise``
    eps [B, K, d] (row 0 zero for r^0 = r).
    """
    if not reasoner.uses_latent:
        raise ValueError("RL needs a latent: this model was built with latent='none'")
    reasoner.check_prompt(batch.prompt_ids, batch.prompt_mask)
    b, d = len(batch), reasoner.llm.config.hidden_size
    k = check_noise(noise, b, d)
    with torch.no_grad():
        hidden = reasoner.prefix_hidden(batch.prompt_ids, batch.prompt_mask)
    r = reasoner.thought(hidden, batch.prompt_mask[:, :-1])  # [B, d] fp32, grad to LatentRATT
    latents = r[:, None] + sigma * noise.to(r)  # [B, K, d]
    t = batch.target_ids.shape[1]
    rows = []
    for i in range(b):
        prompt_ids = batch.prompt_ids[i, :-1][batch.prompt_mask[i, :-1].bool()]
        target_ids = batch.target_ids[i][batch.target_mask[i].bool()]
        n_prompt, n_target = prompt_ids.numel(), target_ids.numel()
        prompt = reasoner.embed(prompt_ids)[None].expand(k, -1, -1)
        target = reasoner.embed(target_ids)[None].expand(k, -1, -1)
        ones = torch.ones(k, n_prompt, dtype=torch.long, device=prompt.device)
        chain = reasoner.full_sequence_latents(prompt, ones, latents[i])
        n_latent = chain.shape[1]
        embeds = torch.cat((prompt, chain.to(prompt.dtype), target), dim=1)
        logits = fp32_logits(reasoner.llm, body_hidden(reasoner.llm, inputs_embeds=embeds))
        first = n_prompt + n_latent - 1  # the first target is predicted at the last latent
        logp = target_logprobs_from_logits(logits[:, first:first + n_target],
                                           target_ids[None].expand(k, -1))
        rows.append(torch.nn.functional.pad(logp, (0, t - n_target)))
    token_logprobs = torch.stack(rows)  # [B, K, T]
    rewards = negative_perplexity(token_logprobs.detach(), batch.target_mask[:, None, :])
    return RLStepOutput(token_logprobs, batch.target_mask, rewards,
                        r.detach().float().norm(dim=-1))


def _unsupported(reasoner: LatentReasoner) -> UnsupportedModelError | None:
    try:
        Decoder(reasoner.llm)
    except UnsupportedModelError as err:
        return err
    return None


def step_for(reasoner: LatentReasoner, stage: str, *, reward: str = "ppl",
             trie: TitleTrie | None = None, train_llm: bool = False) -> Callable[..., Any]:
    """The engine's ``sft_step`` / ``rl_step`` bound to one Decoder, or, for a model family
    the Decoder does not reproduce, the generic full-sequence step (with a one-line
    notice). RL with ``reward="exact-match"`` (it decodes over ``trie``) or ``train_llm``
    runs on the engine only."""
    if stage not in ("sft", "rl"):
        raise ValueError(f"expected stage 'sft' or 'rl', got {stage!r}")
    if reward not in ("ppl", "exact-match"):
        raise ValueError(f"expected reward 'ppl' or 'exact-match', got {reward!r}")
    err = _unsupported(reasoner)
    if stage == "rl" and (reward == "exact-match" or train_llm):
        if err is not None:
            raise UnsupportedModelError(f"{err}; --reward exact-match and --rl-trainable all "
                                        "need the engine (Llama, Qwen2/2.5/3, Mistral)")
        decoder = Decoder(reasoner.llm)
        if reward == "ppl":
            return partial(rl_step, decoder=decoder, train_llm=train_llm)
        if trie is None:
            raise ValueError("the exact-match reward needs the catalogue's trie")
        vocab = reasoner.llm.get_output_embeddings().weight.shape[0]
        return partial(exact_match_rl_step, decoder=decoder, train_llm=train_llm,
                       trie=TrieTensors.from_trie(trie, vocab, reasoner.device))
    if err is not None:
        if distributed.is_main():
            print(f"notice: {err}; using the straightforward (slower) path", file=sys.stderr)
        return generic_sft_step if stage == "sft" else generic_rl_step
    return partial(sft_step if stage == "sft" else rl_step, decoder=Decoder(reasoner.llm))


def generic_beam_search(reasoner: LatentReasoner, prompt_ids: torch.Tensor,
                        prompt_mask: torch.Tensor, trie: TitleTrie, **kwargs: Any):
    """Constrained beam search through HF ``generate`` on the prompt as the LLM reads it
    (latents in place of the thought token)."""
    tok = reasoner.tokenizer
    embeds, mask = reasoner.prompt_inputs(prompt_ids, prompt_mask)
    return generate_beam_search(reasoner.llm, embeds, mask, trie,
                                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                **kwargs)


def beam_search_for(reasoner: LatentReasoner) -> Callable[..., list]:
    """The engine's shared-prefix beam search, or HF generate with a notice for a model
    family the Decoder does not reproduce."""
    err = _unsupported(reasoner)
    if err is not None:
        if distributed.is_main():
            print(f"notice: {err}; evaluating with HF generate (slower)", file=sys.stderr)
        return generic_beam_search
    return engine_beam_search
