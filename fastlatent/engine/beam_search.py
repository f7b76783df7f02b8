"""Trie-constrained beam search on the shared-prefix engine: the model's part.

Returns what :func:`fastlatent.engine.generate_search.generate_beam_search` (Hugging Face
``generate``) returns, but encodes each prompt once with :meth:`Decoder.prefix` and runs
the ``num_beams`` beams of a user as suffix rows over that shared prompt cache
(:meth:`Decoder.suffix` with ``rows_per_group = num_beams``). HF's bookkeeping (candidates,
live beams, the finished pool, when a search closes) needs no model and lives in
:mod:`fastlatent.engine.beam_rules`; this module feeds it the live beams' next-token
log-probs, shaped as prefill then one decode step per search step:

- :func:`_prefill` encodes the prompts. With a latent it computes each user's latents,
  the first suffix input of every beam; without one, the prompt's last hidden state gives
  step 1's log-probs and the suffix starts with the first generated token.
- :func:`_decode_step` gives one step's log-probs [B·N, V]: full-vocabulary fp32
  ``log_softmax``, not renormalised.

Work skipped without changing the result (:func:`_run_active_beams`): the model runs only
the active beams (not HF's -1e9 fillers, not the beams of closed searches), and when the
trie forces every active beam's next tokens, one suffix pass feeds them all and the
following decode steps read their log-probs from it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from fastlatent.data.trie import TitleTrie, TrieTensors
from fastlatent.engine.beam_rules import (
    FILLER_FLOOR,
    Hypothesis,
    LiveBeams,
    SearchState,
    advance,
    hypotheses,
)
from fastlatent.engine.decoder import Decoder, PrefixCache, SuffixCache
from fastlatent.engine.latents import chain_latents
from fastlatent.model.reasoner import LatentReasoner


@torch.no_grad()
def engine_beam_search(
    reasoner: LatentReasoner,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    trie: TitleTrie,
    *,
    num_beams: int = 10,
    num_return: int = 10,
    length_penalty: float = 1.0,
    max_new_tokens: int = 128,
    prefix: PrefixCache | None = None,
) -> list[list[Hypothesis]]:
    """Beam search constrained to the titles of ``trie``, prompts encoded once.

    Args:
        reasoner: in eval mode; its LLM of a family :class:`Decoder` supports.
        prompt_ids, prompt_mask: ``[B, L]`` left-padded prompts; with a latent every row
            ends in the thought token.
        trie: the catalogue; its EOS must be the tokenizer's.
        num_beams: at least 2 (as the oracle). num_return: 1..num_beams.
        prefix: the prompts' cache when the caller holds it already (a prompt extended by
            generated tokens: :meth:`PrefixCache.extend`), of the prompts as this function
            encodes them (with a latent, without the thought column); None: encode here.
    Returns:
        per user, up to ``num_return`` hypotheses, best first: distinct complete trie
        paths (generated tokens ending in EOS) with ``Σ log p / len ** length_penalty``;
        the same as ``naive_beam_search`` on the embeddings and mask that
        ``reasoner.prompt_inputs(prompt_ids, prompt_mask)`` returns (the prompt with its
        latents in place of the thought token).
    """
    _check_inputs(reasoner, prompt_ids, prompt_mask, trie, num_beams, num_return,
                  max_new_tokens)
    if prefix is not None:
        _check_prefix(reasoner, prefix, prompt_mask)
    decoder = Decoder(reasoner.llm)
    users, device = prompt_ids.shape[0], prompt_ids.device
    steps = min(max_new_tokens, trie.max_length)  # the oracle's cap: titles end by then
    vocab_size = reasoner.llm.get_output_embeddings().weight.shape[0]
    trie_t = TrieTensors.from_trie(trie, vocab_size, device)
    prompts = _prefill(reasoner, decoder, prompt_ids, prompt_mask, num_beams, prefix)
    search = SearchState.start(users, num_beams, steps, device)
    running = None  # the newest model run: its rows, hidden states and cache
    for step in range(1, steps + 1):
        logp, running = _decode_step(decoder, prompts, trie_t, search, running, step, steps,
                                     vocab_size)
        search = advance(search, logp, trie_t, step, steps, length_penalty)
        if search.over:
            break
    return hypotheses(search.pool, num_return)


@dataclass
class Prompts:
    """What :func:`_prefill` leaves for the decode steps: the prompts' cache and either
    each user's latents (with a latent) or step 1's log-probs (without)."""

    cache: PrefixCache  # B groups, the prompts without the thought column
    latents: torch.Tensor | None  # [B, num_latents, d]: every beam's first suffix input
    first_logp: torch.Tensor | None  # [B·N, V]: from each prompt's last hidden state


def _prefill(reasoner: LatentReasoner, decoder: Decoder, prompt_ids: torch.Tensor,
             prompt_mask: torch.Tensor, num_beams: int,
             prefix: PrefixCache | None = None) -> Prompts:
    """Encode each prompt once (or take the caller's ``prefix`` of them), then compute its
    latents or, without a latent, the first step's log-probs."""
    if reasoner.uses_latent:
        if prefix is None:
            prefix = decoder.prefix(prompt_ids[:, :-1], prompt_mask[:, :-1])
        first = reasoner.thought(prefix.hidden, prefix.hidden_mask)
        latents = chain_latents(reasoner, decoder, prefix, first, 1).to(prefix.hidden.dtype)
        return Prompts(prefix, latents, None)
    if prefix is None:
        prefix = decoder.prefix(prompt_ids, prompt_mask)
    logp = _log_probs(decoder, prefix.last_hidden)
    return Prompts(prefix, None, logp.repeat_interleave(num_beams, dim=0))


def _decode_step(decoder: Decoder, prompts: Prompts, trie_t: TrieTensors,
                 search: SearchState, running: RunningRows | None, step: int, steps: int,
                 vocab_size: int) -> tuple[torch.Tensor, RunningRows | None]:
    """The live beams' next-token log-probs at ``step`` [B·N, V] (after step 1, 0 in the
    rows of inactive beams) and the model run they were read from: the previous run, one
    token further on, while it holds the next token of a forced run; a new run of the
    active beams otherwise (:func:`_run_active_beams`). ``steps``: the step cap."""
    if prompts.first_logp is not None and step == 1:
        return prompts.first_logp, None
    if running is not None:
        running = running.follow(search.parents)
    active = ActiveBeams.of(search.live, search.still_open)
    if running is None or not running.has_next():
        running = _run_active_beams(decoder, prompts, trie_t, search.live, active, running,
                                    step, steps)
    return running.log_probs(decoder, search.live, active, step, vocab_size), running


@dataclass
class ActiveBeams:
    """The beams whose log-probs can change the result at a step: the live beams of open
    searches that are not fillers (cumulative score above -1e8, i.e. without HF's -1e9
    charge). Live beams are sorted by score, so a user's active beams come first: the
    block of the first ``width`` beams (the most active beams of any user) of each of
    ``users`` holds them all; ``mask`` [G·width] says which of the block's rows are
    active."""

    users: torch.Tensor  # [G] int64, users holding an active beam
    width: int
    mask: torch.Tensor

    @classmethod
    def of(cls, live: LiveBeams, still_open: torch.Tensor) -> ActiveBeams:
        active = (live.scores > FILLER_FLOOR) & still_open
        count = active.sum(1)
        users = (count > 0).nonzero().squeeze(1)
        width = int(count.max())
        return cls(users, width, active[users, :width].flatten())

    def rows(self, beams: int) -> torch.Tensor:
        """[G·width] the block's rows in the flat [B·N] beam numbering."""
        return (self.users[:, None] * beams
                + torch.arange(self.width, device=self.users.device)).flatten()


@dataclass
class RunningRows:
    """One model run: the first ``width`` beams of each of ``users`` [G] fed ``length``
    tokens (the newest chosen token, then the trie's forced continuation), their final
    hidden states [G·width, length, d], cache and prompt caches. ``origin`` [B, N] maps
    each live beam to the row it descends from (-1: none ran); ``offset`` is the token
    whose hidden state gives the current step's log-probs."""

    users: torch.Tensor
    width: int
    hidden: torch.Tensor | None
    forced: torch.Tensor | None  # [G·width, length - 1] tokens fed after the first
    cache: SuffixCache | None
    prefix: PrefixCache | None
    origin: torch.Tensor
    offset: int = 0

    def follow(self, parents: torch.Tensor) -> RunningRows:
        """After a step: each new live beam inherits its parent's origin; the next step
        reads the next token's state."""
        return replace(self, origin=self.origin.gather(1, parents), offset=self.offset + 1)

    def has_next(self) -> bool:
        return self.hidden is not None and self.offset < self.hidden.shape[1]

    def log_probs(self, decoder: Decoder, live: LiveBeams, active: ActiveBeams, step: int,
                  vocab_size: int) -> torch.Tensor:
        """[B·N, V] fp32: the model's log-probs for the active beams, 0 for every other
        row (see :func:`_run_active_beams`)."""
        out = torch.zeros(live.scores.numel(), vocab_size, dtype=torch.float32,
                          device=live.scores.device)
        if active.width == 0:
            return out
        users, width = active.users, active.width
        source = self.origin[users, :width].flatten()[active.mask]
        if bool((source < 0).any()):
            raise RuntimeError("beam search: an active beam without a computed ancestor")
        if self.offset > 0:  # a forced token: the beam must have taken it
            taken = live.tokens[users, :width, step - 2].flatten()[active.mask]
            if not torch.equal(taken, self.forced[source, self.offset - 1]):
                raise RuntimeError("beam search: a beam left its forced trie path")
        rows = active.rows(live.scores.shape[1])[active.mask]
        out[rows] = _log_probs(decoder, self.hidden[source, self.offset])
        return out


def _run_active_beams(decoder: Decoder, prompts: Prompts, trie_t: TrieTensors,
                      live: LiveBeams, active: ActiveBeams, previous: RunningRows | None,
                      step: int, steps: int) -> RunningRows:
    """One model pass on the rows whose log-probs can change the result, for as many steps
    ahead as the trie forces.

    Rows skipped: every beam of a closed search (its pool is final), and filler beams
    (cumulative score at or below -1e8: a -1e9 charge). A filler's continuations are
    fillers, never titles, and HF's -1e9 charges swamp whatever log-prob it gets, so the
    returned titles, order and scores are unchanged. The model runs the first ``width``
    beams of each user with an active beam; each takes the cache of its origin (an active
    beam's ancestors were active, hence ran).

    Forced runs: when every active beam's next trie steps have one child each (a title
    spelled out after its distinguishing tokens), those tokens are what the beams will
    take, so they are fed in the same pass; the following steps read their log-probs
    from it (full-vocabulary, as HF's) instead of running the model once per token.
    """
    users, width = active.users, active.width
    origin = torch.full_like(live.nodes, -1)
    if width == 0:
        return RunningRows(users, 0, None, None, None, None, origin)
    origin[users, :width] = torch.arange(len(users) * width,
                                         device=users.device).view(-1, width)
    if step == 1:  # with a latent: each beam reads [latents] (only beam 0 is active)
        inputs = prompts.latents[users].repeat_interleave(width, dim=0)
        forced = torch.zeros(len(users) * width, 0, dtype=torch.int64, device=users.device)
        cache = None
    else:
        forced = _forced_tokens(trie_t, live.nodes[users, :width].flatten(), active.mask,
                                steps - step)
        tokens = torch.cat((live.tokens[users, :width, step - 2].flatten()[:, None], forced),
                           dim=1)
        inputs = decoder.llm.get_input_embeddings()(tokens)
        cache = None if previous is None else previous.cache
        if cache is not None:
            parent = previous.origin[users, :width]
            parent = torch.where(parent >= 0, parent, 0)  # fillers: any row of the cache
            cache = cache.gather(parent.flatten(), width)
    same = (previous is not None and previous.prefix is not None
            and torch.equal(previous.users, users))
    prefix_t = previous.prefix if same else prompts.cache.select(users)
    hidden, cache = decoder.suffix(inputs, torch.ones_like(inputs[..., 0]), prefix_t, width,
                                   cache)
    if step == 1:
        hidden = hidden[:, -1:]
    return RunningRows(users, width, hidden, forced, cache, prefix_t, origin)


def _forced_tokens(trie_t: TrieTensors, nodes: torch.Tensor, active: torch.Tensor,
                   limit: int) -> torch.Tensor:
    """[R, n] the next n tokens the active rows will take (n <= limit), while each active
    row is either at a trie node with exactly one child other than EOS, or has reached an
    end (only EOS allowed: it takes EOS next and becomes a finished, charged beam whose
    log-probs are no longer read). Ended and inactive rows get EOS (never read)."""
    tokens = []
    eos = trie_t.eos_token_id
    ended = torch.zeros_like(active)
    for _ in range(limit):
        count, token, child = trie_t.only_child(nodes)
        ended = ended | (count == 0) | (token == eos)
        single = (count == 1) & ~ended
        if bool((ended | ~active).all()) or not bool((single | ended | ~active).all()):
            break
        tokens.append(torch.where(single, token, eos))
        nodes = torch.where(single, child, -1)
    if not tokens:
        return torch.zeros(nodes.shape[0], 0, dtype=torch.int64, device=nodes.device)
    return torch.stack(tokens, dim=1)


def _log_probs(decoder: Decoder, hidden: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary fp32 log-probs [R, V] of the next token from hidden [R, d]."""
    return torch.log_softmax(decoder.logits(hidden).float(), dim=-1)


def _check_inputs(reasoner: LatentReasoner, prompt_ids: torch.Tensor,
                  prompt_mask: torch.Tensor, trie: TitleTrie, num_beams: int,
                  num_return: int, max_new_tokens: int) -> None:
    if reasoner.training or reasoner.llm.training:
        raise ValueError("expected the reasoner in eval mode (reasoner.eval()), got training "
                         "mode")
    reasoner.check_prompt(prompt_ids, prompt_mask)
    mask = prompt_mask.long()
    if prompt_ids.shape[0] == 0 or prompt_ids.shape[1] < (2 if reasoner.uses_latent else 1):
        raise ValueError(f"expected [B >= 1, L] prompts with a real token before the thought "
                         f"token, got shape {tuple(prompt_ids.shape)}")
    if not ((mask == 0) | (mask == 1)).all() or (mask.diff(dim=-1) < 0).any() or (
        mask[:, -1] != 1
    ).any():
        raise ValueError("expected a left-padded 0/1 prompt_mask (rows 0…0 1…1), got another")
    eos = reasoner.tokenizer.eos_token_id
    if trie.eos_token_id != eos:
        raise ValueError(f"expected a trie with the tokenizer's eos {eos}, got "
                         f"{trie.eos_token_id}")
    if num_beams < 2:
        raise ValueError(f"expected num_beams >= 2, got {num_beams}")
    if not 1 <= num_return <= num_beams:
        raise ValueError(f"expected 1 <= num_return <= num_beams ({num_beams}), got {num_return}")
    if max_new_tokens < 1:
        raise ValueError(f"expected max_new_tokens >= 1, got {max_new_tokens}")


def _check_prefix(reasoner: LatentReasoner, prefix: PrefixCache,
                  prompt_mask: torch.Tensor) -> None:
    """A caller's prefix cache must hold the prompts (thought column excluded)."""
    prompt_tokens = prompt_mask[:, :-1] if reasoner.uses_latent else prompt_mask
    lengths = prompt_tokens.long().sum(-1)
    if prefix.num_groups != prompt_mask.shape[0] or not torch.equal(
            prefix.lengths.to(lengths.device), lengths):
        raise ValueError(f"expected a prefix cache of the {prompt_mask.shape[0]} prompts "
                         f"(lengths without padding {lengths.tolist()}), got "
                         f"{prefix.num_groups} prompts of lengths {prefix.lengths.tolist()}")
