"""The original GRPO of the paper's App. F on the engine: each latent row writes a title,
the reward is whether it is the target.

For each prompt, K latent rows (r^0 = r and r + sigma*eps_k, the same noise as the PPL
reward's) each write an answer by greedy decoding constrained to the catalogue's trie.
The K rows of a prompt share its KV cache as beams do (``Decoder.suffix`` with
``rows_per_group = K``), and a row whose trie path has a single continuation is fed the
whole forced run in one pass: the model runs once per branching decision, not once per
token. Reward 1 if the written tokens are the target's (its trie path: the title as the
catalogue spells it, then EOS), else 0. Loss: the GRPO surrogate over the WRITTEN tokens,
``-(1/(B*K)) sum_b sum_k A_bk * mean_t log pi(yhat_t | x_b, r_b^k, yhat_<t)``, through
the reparameterised latent (and the LLM with ``train_llm``).

The straightforward twin (each row decoded alone by HF ``generate``, full-sequence
log-probs) is ``fastlatent.testing.exact_match``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastlatent.data.batch import Batch
from fastlatent.data.trie import TrieTensors
from fastlatent.engine.decoder import Decoder, PrefixCache
from fastlatent.engine.latents import chain_latents
from fastlatent.engine.scoring import score_targets
from fastlatent.engine.steps import RLStepOutput, check_noise
from fastlatent.model.reasoner import LatentReasoner

_OFF = -1  # no token in this slot of a forced run


@dataclass
class Answers:
    """The titles the rows wrote: ``token_ids`` [R, S] int64 (EOS after the end),
    ``mask`` [R, S] int64 (1 = a written token, EOS included)."""

    token_ids: torch.Tensor
    mask: torch.Tensor


def _forced_runs(trie_t: TrieTensors, first: torch.Tensor, nodes: torch.Tensor,
                 limit: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the chosen token ``first`` [R] then every token the trie forces after it
    (from the node it reached, ``nodes`` [R], while that node has exactly one child).
    Returns the runs [R, n] (``_OFF`` after a row's run ends) and the node each row
    stands at after its run (-1 once it wrote EOS)."""
    eos = trie_t.eos_token_id
    runs = [first]
    ended = first == eos
    for _ in range(limit - 1):
        count, token, child = trie_t.only_child(nodes)
        forced = (count == 1) & ~ended
        if not bool(forced.any()):
            break
        runs.append(torch.where(forced, token, _OFF))
        nodes = torch.where(forced, child, nodes)
        ended = ended | (forced & (token == eos))
    return torch.stack(runs, dim=1), torch.where(ended, -1, nodes)


@torch.no_grad()
def greedy_titles(decoder: Decoder, prefix: PrefixCache, latents: torch.Tensor,
                  trie_t: TrieTensors, rows_per_group: int, max_length: int) -> Answers:
    """Greedy decoding constrained to the trie, for R = prompts * rows_per_group rows
    that start with their ``latents`` [R, N, d] after the shared prompt ``prefix``.

    At each branching node the row takes the allowed child of highest full-vocabulary
    log-prob (as HF ``generate`` with ``prefix_allowed_tokens_fn`` and one beam); forced
    tokens are taken without a model run. Every trie path ends in EOS, so every row ends
    within ``max_length`` (the trie's longest path) tokens.
    """
    rows, n = latents.shape[:2]
    device, eos = latents.device, trie_t.eos_token_id
    ones = torch.ones(rows, n, dtype=torch.long, device=device)
    hidden, cache = decoder.suffix(latents.to(prefix.hidden.dtype), ones, prefix,
                                   rows_per_group)
    state = hidden[:, -1]  # [R, d]: predicts each row's next token
    nodes = torch.zeros(rows, dtype=torch.int64, device=device)  # the root
    tokens = torch.full((rows, max_length), eos, dtype=torch.int64, device=device)
    lengths = torch.zeros(rows, dtype=torch.int64, device=device)
    open_ = torch.ones(rows, dtype=torch.bool, device=device)
    arange = torch.arange(rows, device=device)
    while bool(open_.any()):
        logp = torch.log_softmax(decoder.logits(state).float(), dim=-1)
        exp = trie_t.expand(nodes)
        allowed = logp.gather(1, exp.tokens).masked_fill(~exp.valid, float("-inf"))
        pick = allowed.argmax(dim=1, keepdim=True)
        room = int((max_length - lengths[open_]).min())
        runs, nodes_after = _forced_runs(trie_t, exp.tokens.gather(1, pick).squeeze(1),
                                         exp.nodes.gather(1, pick).squeeze(1), room)
        written = (runs != _OFF) & open_[:, None]  # [R, n]
        width = runs.shape[1]
        slots = lengths[:, None] + torch.arange(width, device=device)
        rows_w, cols_w = written.nonzero(as_tuple=True)
        tokens[rows_w, slots[rows_w, cols_w]] = runs[rows_w, cols_w]
        lengths = lengths + written.sum(1)
        nodes = torch.where(open_, nodes_after, nodes)
        open_ = open_ & (nodes >= 0) & (lengths < max_length)
        if not bool(open_.any()):
            break
        # the rows still deciding are fed their run (no EOS in it); the others nothing
        feed = written & open_[:, None]
        fed = torch.where(feed, runs, eos)
        hidden, cache = decoder.suffix(decoder.llm.get_input_embeddings()(fed), feed.long(),
                                       prefix, rows_per_group, cache)
        last = (feed.sum(1) - 1).clamp(min=0)
        state = hidden[arange, last]
    mask = (torch.arange(max_length, device=device) < lengths[:, None]).long()
    return Answers(tokens, mask)


def exact_match_rewards(answers: Answers, target_ids: torch.Tensor,
                        target_mask: torch.Tensor) -> torch.Tensor:
    """1.0 where a row wrote exactly its target's tokens (target + EOS), else 0.0; [R]
    float32. ``target_ids`` / ``target_mask`` [R, T] right-padded."""
    width = max(answers.token_ids.shape[1], target_ids.shape[1])

    def padded(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        ids = torch.where(mask.bool(), ids, -1)
        return torch.nn.functional.pad(ids, (0, width - ids.shape[1]), value=-1)

    same = padded(answers.token_ids, answers.mask) == padded(target_ids, target_mask)
    return same.all(dim=1).float()


def exact_match_rl_step(reasoner: LatentReasoner, batch: Batch, *, noise: torch.Tensor,
                        sigma: float, trie: TrieTensors, train_llm: bool = False,
                        decoder: Decoder | None = None,
                        backend: str | None = None) -> RLStepOutput:
    """The original GRPO's forward for one micro-batch; the contract of
    :func:`fastlatent.engine.steps.rl_step` (same noise), with rewards in {0, 1} and
    ``token_logprobs`` [B, K, S] over each row's written title (``mask`` [B, K, S]).

    A no-grad pass encodes the prompts once and decodes every row (see
    :func:`greedy_titles`); a second pass scores the written tokens with gradients to
    LatentRATT (and, with ``train_llm``, to the LLM through the prompt and the answer).
    """
    if not reasoner.uses_latent:
        raise ValueError("RL needs a latent: this model was built with latent='none'")
    b, d = len(batch), reasoner.llm.config.hidden_size
    k = check_noise(noise, b, d)
    if k < 2:
        raise ValueError(f"the exact-match reward compares a prompt's K rows: expected "
                         f"k >= 2, got {k}")
    reasoner.check_prompt(batch.prompt_ids, batch.prompt_mask)
    decoder = decoder or Decoder(reasoner.llm)
    ids, mask = batch.prompt_ids[:, :-1], batch.prompt_mask[:, :-1]
    with torch.no_grad():
        prefix = decoder.prefix(ids, mask)
        first = reasoner.thought(prefix.hidden, prefix.hidden_mask, noise=noise, sigma=sigma)
        latents = chain_latents(reasoner, decoder, prefix, first.reshape(b * k, d), k)
        answers = greedy_titles(decoder, prefix, latents, trie, k, trie.max_length)
        rewards = exact_match_rewards(answers, batch.target_ids.repeat_interleave(k, 0),
                                      batch.target_mask.repeat_interleave(k, 0)).view(b, k)
    if train_llm and torch.is_grad_enabled():
        prefix = decoder.prefix(ids, mask)
    first = reasoner.thought(prefix.hidden, prefix.hidden_mask, noise=noise, sigma=sigma)
    latents = chain_latents(reasoner, decoder, prefix, first.reshape(b * k, d), k)
    span = int(answers.mask.sum(1).max())
    answer_ids, answer_mask = answers.token_ids[:, :span], answers.mask[:, :span]
    logp = score_targets(decoder, prefix, latents, answer_ids, answer_mask, k,
                         backend=backend)
    return RLStepOutput(logp.view(b, k, -1), answer_mask.view(b, k, -1), rewards,
                        first[:, 0].detach().float().norm(dim=-1))
