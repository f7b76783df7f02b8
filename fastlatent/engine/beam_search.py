"""Trie-constrained beam search on the shared-prefix engine.

Returns what :func:`fastlatent.engine.generate_search.generate_beam_search` (Hugging Face
``generate``) returns, but encodes each prompt once with :meth:`Decoder.prefix` and runs
the ``num_beams`` beams of a user as suffix rows over that shared prompt cache
(:meth:`Decoder.suffix` with ``rows_per_group = num_beams``). With a latent, the first
suffix token of every beam is ``r``; without one, the first step reads the prompt's last
hidden state and the suffix starts with the first generated token.

Every step works on tensors: each beam carries its trie node, and its continuations are
gathered from the trie's CSR arrays into ``[R, C]`` (C = the most children of any current
node). Scores are full-vocabulary fp32 ``log_softmax`` log-probs, not renormalised.

Work skipped without changing the result (:func:`_run_real_beams`): the model runs only
the real beams of open searches (not HF's -1e9 fillers, not closed searches), and when
the trie forces every real beam's next tokens, one suffix pass feeds them all and the
following steps read their log-probs from it.

Hugging Face's rules, reproduced step by step in the same fp32 arithmetic (``N`` beams):

- Beams 1..N-1 start at -1e9 ("fillers"), so step 1 expands beam 0 only.
- A beam whose path is a finished title or left the trie may only emit EOS (the oracle's
  ``prefix_allowed_tokens_fn`` gives it ``[eos]``).
- The best ``2N`` continuations by cumulative log-prob are candidates. A candidate is done
  when it ends in EOS, or at the last step (HF's max-length criterion marks every one).
- Live beams for the next step: the best ``N`` candidates after charging done ones -1e9.
- The finished pool (N slots, starting at -1e9, unfinished) merges in the done candidates
  of rank < N at ``Σ log p / step ** length_penalty``; candidates that are not, and all
  candidates of a user whose search is closed, are charged -1e9; the pool keeps its best N.
- A user's search closes (for good) once every pool slot is finished and the best live
  beam's ``score / step ** length_penalty`` no longer beats the pool's worst score
  (``early_stopping=False``). The loop ends when every search is closed, when every
  candidate is done, or after ``min(max_new_tokens, trie.max_length)`` steps (the oracle's
  cap: by the longest title every real beam has finished).

Output, as the oracle filters HF's: the pool entries that entered as real finished titles
(a complete trie path, admitted without a -1e9 charge, raw log-prob above -1e8, i.e. not
a filler), best first, cut to ``num_return``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from fastlatent.data.trie import TitleTrie
from fastlatent.engine.decoder import Decoder, PrefixCache, SuffixCache
from fastlatent.engine.latents import chain_latents
from fastlatent.model.reasoner import LatentReasoner

# HF's charge for filler beams, done candidates kept as live beams, and candidates that
# may not enter the finished pool.
_CHARGE = -1.0e9
# Real paths have finite full-vocabulary log-prob sums far above this; fillers fall below.
_FILLER_FLOOR = -1.0e8


@dataclass(frozen=True)
class Hypothesis:
    token_ids: tuple[int, ...]  # generated tokens, ending in eos
    score: float  # Σ log p (full vocabulary) / len(token_ids) ** length_penalty


@dataclass
class TrieTensors:
    """A :class:`TitleTrie`'s CSR arrays on the search device (see ``TitleTrie.to_csr``)."""

    offsets: torch.Tensor  # [num_nodes + 1] int64
    child_tokens: torch.Tensor  # [E] int64
    child_nodes: torch.Tensor  # [E] int64
    eos_token_id: int
    max_length: int = 0  # tokens in the trie's longest path, EOS included

    @classmethod
    def from_trie(cls, trie: TitleTrie, vocab_size: int, device: torch.device) -> TrieTensors:
        offsets, tokens, nodes = trie.to_csr()
        if int(tokens.max()) >= vocab_size:
            raise ValueError(f"expected trie token ids below the vocabulary size {vocab_size}, "
                             f"got {int(tokens.max())}")
        return cls(offsets.to(device), tokens.to(device), nodes.to(device), trie.eos_token_id,
                   trie.max_length)

    def expand(self, nodes: torch.Tensor) -> Expansion:
        """Allowed continuations of beams at ``nodes`` [R] (-1 = off the trie).

        A node without children (a finished title) or off the trie allows EOS only,
        leading off the trie. Returns an :class:`Expansion` of shape [R, C], C >= 2.
        """
        live = nodes >= 0
        safe = nodes.clamp(min=0)
        start = self.offsets[safe]
        count = torch.where(live, self.offsets[safe + 1] - start, 0)
        width = max(2, int(count.max()))
        slot = torch.arange(width, device=nodes.device)
        has_child = slot < count[:, None]  # [R, C]
        edge = torch.where(has_child, start[:, None] + slot, 0)
        eos_only = (count == 0)[:, None] & (slot == 0)
        return Expansion(
            tokens=torch.where(has_child, self.child_tokens[edge], self.eos_token_id),
            nodes=torch.where(has_child, self.child_nodes[edge], -1),
            valid=has_child | eos_only,
        )


@dataclass
class Expansion:
    """Continuations per beam row, padded: ``tokens``, ``nodes`` (the child node, -1 off
    the trie) and ``valid`` (False = padding slot), all [R, C]."""

    tokens: torch.Tensor
    nodes: torch.Tensor
    valid: torch.Tensor


@dataclass
class LiveBeams:
    """HF's running beams, [B, N] per user (B users, N beams)."""

    scores: torch.Tensor  # [B, N] fp32 cumulative log-prob (incl. -1e9 charges)
    nodes: torch.Tensor  # [B, N] int64 trie node reached, -1 = off the trie
    tokens: torch.Tensor  # [B, N, S] int64 generated tokens (S = the step cap)

    @classmethod
    def start(cls, users: int, beams: int, steps: int, device: torch.device) -> LiveBeams:
        scores = torch.zeros(users, beams, dtype=torch.float32, device=device)
        scores[:, 1:] = _CHARGE
        nodes = torch.zeros(users, beams, dtype=torch.int64, device=device)
        tokens = torch.zeros(users, beams, steps, dtype=torch.int64, device=device)
        return cls(scores, nodes, tokens)


@dataclass
class Candidates:
    """The best 2N continuations per user at one step, best first, all [B, 2N] (tokens
    [B, 2N, S])."""

    scores: torch.Tensor  # fp32 cumulative log-prob
    parents: torch.Tensor  # int64 beam (0..N-1) each one extends
    nodes: torch.Tensor  # int64 trie node reached, -1 = off the trie
    tokens: torch.Tensor  # int64 generated tokens so far
    done: torch.Tensor  # bool, HF's stopping criteria: ends in EOS, or the last step
    complete: torch.Tensor  # bool, a full title (EOS taken from a trie node)


@dataclass
class FinishedPool:
    """HF's finished hypotheses, N slots per user, best first after every update."""

    scores: torch.Tensor  # [B, N] fp32 Σ log p / L ** length_penalty (incl. charges)
    finished: torch.Tensor  # [B, N] bool, HF's is_sent_finished
    real: torch.Tensor  # [B, N] bool, a real finished title (what the oracle keeps)
    lengths: torch.Tensor  # [B, N] int64 generated tokens incl. EOS
    tokens: torch.Tensor  # [B, N, S] int64

    @classmethod
    def empty(cls, users: int, beams: int, steps: int, device: torch.device) -> FinishedPool:
        flags = torch.zeros(users, beams, dtype=torch.bool, device=device)
        scores = torch.full((users, beams), _CHARGE, dtype=torch.float32, device=device)
        return cls(scores, flags, flags.clone(),
                   torch.zeros(users, beams, dtype=torch.int64, device=device),
                   torch.zeros(users, beams, steps, dtype=torch.int64, device=device))


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
        the same as ``naive_beam_search`` on ``reasoner.prompt_embeds(...)``.
    """
    _check_inputs(reasoner, prompt_ids, prompt_mask, trie, num_beams, num_return,
                  max_new_tokens)
    if prefix is not None:
        _check_prefix(reasoner, prefix, prompt_mask)
    decoder = Decoder(reasoner.llm)
    users, device = prompt_ids.shape[0], prompt_ids.device
    steps = min(max_new_tokens, trie.max_length)
    vocab_size = reasoner.llm.get_output_embeddings().weight.shape[0]
    trie_t = TrieTensors.from_trie(trie, vocab_size, device)
    live = LiveBeams.start(users, num_beams, steps, device)
    pool = FinishedPool.empty(users, num_beams, steps, device)
    still_open = torch.ones(users, 1, dtype=torch.bool, device=device)
    prefix, latents, first_logp = _encode_prompts(reasoner, decoder, prompt_ids, prompt_mask,
                                                  num_beams, prefix)
    running = None  # the newest model run: its rows, hidden states and cache
    parents = None  # each live beam's parent beam, from the previous step
    for step in range(1, steps + 1):
        if first_logp is not None and step == 1:
            logp = first_logp
        else:
            if running is not None:
                running = running.follow(parents)
            real = RealBeams.of(live, still_open)
            if running is None or not running.has_next():
                running = _run_real_beams(reasoner, decoder, prefix, latents, trie_t, live,
                                          real, running, step, steps)
            logp = running.log_probs(decoder, live, real, step, vocab_size)
        cand = _top_candidates(live, logp, trie_t, step, steps)
        live, parents = _next_live(cand, num_beams)
        pool = _update_pool(pool, cand, still_open, step, length_penalty)
        still_open = _still_open(still_open, live, pool, step, length_penalty)
        if not bool(still_open.any()) or bool(cand.done.all()):
            break
    return _hypotheses(pool, num_return)


@dataclass
class RealBeams:
    """The beams whose log-probs can matter at a step: the real ones (cumulative score
    above -1e8, i.e. without HF's -1e9 charge) of open searches. Live beams are sorted by
    score, so a user's real beams come first: the block of the first ``width`` beams
    (the most real beams of any user) of each of ``users`` holds them all; ``mask``
    [G·width] says which of the block's rows are real."""

    users: torch.Tensor  # [G] int64, users holding a real beam
    width: int
    mask: torch.Tensor

    @classmethod
    def of(cls, live: LiveBeams, still_open: torch.Tensor) -> RealBeams:
        real = (live.scores > _FILLER_FLOOR) & still_open
        count = real.sum(1)
        users = (count > 0).nonzero().squeeze(1)
        width = int(count.max())
        return cls(users, width, real[users, :width].flatten())

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

    def log_probs(self, decoder: Decoder, live: LiveBeams, real: RealBeams, step: int,
                  vocab_size: int) -> torch.Tensor:
        """[B·N, V] fp32: the model's log-probs for the real beams of open searches, 0 for
        every other row (see :func:`_run_real_beams`)."""
        out = torch.zeros(live.scores.numel(), vocab_size, dtype=torch.float32,
                          device=live.scores.device)
        if real.width == 0:
            return out
        users, width = real.users, real.width
        source = self.origin[users, :width].flatten()[real.mask]
        if bool((source < 0).any()):
            raise RuntimeError("beam search: a real beam without a computed ancestor")
        if self.offset > 0:  # a forced token: the beam must have taken it
            taken = live.tokens[users, :width, step - 2].flatten()[real.mask]
            if not torch.equal(taken, self.forced[source, self.offset - 1]):
                raise RuntimeError("beam search: a beam left its forced trie path")
        rows = real.rows(live.scores.shape[1])[real.mask]
        out[rows] = _log_probs(decoder, self.hidden[source, self.offset])
        return out


def _run_real_beams(reasoner: LatentReasoner, decoder: Decoder, prefix: PrefixCache,
                    latents: torch.Tensor | None, trie_t: TrieTensors, live: LiveBeams,
                    real: RealBeams, previous: RunningRows | None, step: int,
                    steps: int) -> RunningRows:
    """One model pass on the rows whose log-probs can matter, for as many steps ahead as
    the trie forces.

    Rows skipped: every beam of a closed search (its pool is final), and filler beams
    (cumulative score at or below -1e8: a -1e9 charge). A filler's continuations are
    fillers, never real titles, and HF's -1e9 charges swamp whatever log-prob it gets, so
    the returned titles, order and scores are unchanged. The model runs the first
    ``width`` beams of each running user; each takes the cache of its origin (a real
    beam's ancestors are real, hence ran).

    Forced runs: when every real beam's next trie steps have one child each (a title
    spelled out after its distinguishing tokens), those tokens are what the beams will
    take, so they are fed in the same pass; the following steps read their log-probs
    from it (full-vocabulary, as HF's) instead of running the model once per token.
    """
    users, width = real.users, real.width
    origin = torch.full_like(live.nodes, -1)
    if width == 0:
        return RunningRows(users, 0, None, None, None, None, origin)
    origin[users, :width] = torch.arange(len(users) * width,
                                         device=users.device).view(-1, width)
    if step == 1:  # with a latent: each beam reads [latents] (only beam 0 is real)
        inputs = latents[users].repeat_interleave(width, dim=0)
        forced = torch.zeros(len(users) * width, 0, dtype=torch.int64, device=users.device)
        cache = None
    else:
        forced = _forced_tokens(trie_t, live.nodes[users, :width].flatten(), real.mask,
                                steps - step)
        tokens = torch.cat((live.tokens[users, :width, step - 2].flatten()[:, None], forced),
                           dim=1)
        inputs = reasoner.embed(tokens)
        cache = None if previous is None else previous.cache
        if cache is not None:
            parent = previous.origin[users, :width]
            parent = torch.where(parent >= 0, parent, 0)  # fillers: any row of the cache
            cache = cache.gather(parent.flatten(), width)
    same = (previous is not None and previous.prefix is not None
            and torch.equal(previous.users, users))
    prefix_t = previous.prefix if same else prefix.select(users)
    hidden, cache = decoder.suffix(inputs, torch.ones_like(inputs[..., 0]), prefix_t, width,
                                   cache)
    if step == 1:
        hidden = hidden[:, -1:]
    return RunningRows(users, width, hidden, forced, cache, prefix_t, origin)


def _forced_tokens(trie_t: TrieTensors, nodes: torch.Tensor, real: torch.Tensor,
                   limit: int) -> torch.Tensor:
    """[R, n] the next n tokens the real rows will take (n <= limit), while each real row
    is either at a trie node with exactly one child other than EOS, or has reached an end
    (only EOS allowed: it takes EOS next and becomes a finished, charged beam whose
    log-probs are no longer read). Ended and non-real rows get EOS (never read)."""
    tokens = []
    eos = trie_t.eos_token_id
    ended = torch.zeros_like(real)
    for _ in range(limit):
        safe = nodes.clamp(min=0)
        start = trie_t.offsets[safe]
        count = torch.where(nodes >= 0, trie_t.offsets[safe + 1] - start, 0)
        edge = torch.where(count > 0, start, 0)
        token = trie_t.child_tokens[edge]
        ended = ended | (count == 0) | ((count == 1) & (token == eos))
        single = (count == 1) & (token != eos) & ~ended
        if bool((ended | ~real).all()) or not bool((single | ended | ~real).all()):
            break
        tokens.append(torch.where(single, token, eos))
        nodes = torch.where(single, trie_t.child_nodes[edge], -1)
    if not tokens:
        return torch.zeros(nodes.shape[0], 0, dtype=torch.int64, device=nodes.device)
    return torch.stack(tokens, dim=1)


def _encode_prompts(reasoner: LatentReasoner, decoder: Decoder, prompt_ids: torch.Tensor,
                    prompt_mask: torch.Tensor, num_beams: int,
                    prefix: PrefixCache | None = None
                    ) -> tuple[PrefixCache, torch.Tensor | None, torch.Tensor | None]:
    """Encode each prompt once (or take the caller's ``prefix`` of them). Returns the
    prefix cache and either the first suffix input of each user (with a latent: its
    latents, [B, num_latents, d]) or, without one, the first step's log-probs [B·N, V]
    from the prompt's last hidden state."""
    if reasoner.uses_latent:
        if prefix is None:
            prefix = decoder.prefix(prompt_ids[:, :-1], prompt_mask[:, :-1])
        first = reasoner.thought(prefix.hidden, prefix.hidden_mask)
        latents = chain_latents(reasoner, decoder, prefix, first, 1).to(prefix.hidden.dtype)
        return prefix, latents, None
    if prefix is None:
        prefix = decoder.prefix(prompt_ids, prompt_mask)
    logp = _log_probs(decoder, prefix.last_hidden)
    return prefix, None, logp.repeat_interleave(num_beams, dim=0)


def _log_probs(decoder: Decoder, hidden: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary fp32 log-probs [R, V] of the next token from hidden [R, d]."""
    return torch.log_softmax(decoder.logits(hidden).float(), dim=-1)


def _top_candidates(live: LiveBeams, logp: torch.Tensor, trie_t: TrieTensors, step: int,
                    last_step: int) -> Candidates:
    """The best 2N trie-allowed continuations per user of the live beams; logp [B·N, V]."""
    users, beams = live.scores.shape
    exp = trie_t.expand(live.nodes.flatten())
    width = exp.tokens.shape[1]
    allowed = logp.gather(1, exp.tokens).masked_fill(~exp.valid, float("-inf"))  # [R, C]
    total = (live.scores[:, :, None] + allowed.view(users, beams, width)).view(users, -1)
    scores, flat = total.topk(2 * beams, dim=1)  # [B, 2N]
    parents = flat // width

    def pick(x: torch.Tensor) -> torch.Tensor:
        return x.view(users, -1).gather(1, flat)

    tokens, nodes = pick(exp.tokens), pick(exp.nodes)
    ends = pick(exp.valid) & (tokens == trie_t.eos_token_id)
    history = live.tokens.gather(1, parents[..., None].expand(-1, -1, live.tokens.shape[2]))
    history[:, :, step - 1] = tokens
    done = ends | (step == last_step)
    return Candidates(scores, parents, nodes, history, done, ends & (nodes >= 0))


def _next_live(cand: Candidates, beams: int) -> tuple[LiveBeams, torch.Tensor]:
    """HF's next live beams: the best N candidates, done ones charged -1e9. Returns them
    and their parents [B, N] (beam index within the user)."""
    charged = cand.scores + cand.done.to(torch.float32) * _CHARGE
    scores, pick = charged.topk(beams, dim=1)
    tokens = cand.tokens.gather(1, pick[..., None].expand(-1, -1, cand.tokens.shape[2]))
    return LiveBeams(scores, cand.nodes.gather(1, pick), tokens), cand.parents.gather(1, pick)


def _update_pool(pool: FinishedPool, cand: Candidates, still_open: torch.Tensor, step: int,
                 length_penalty: float) -> FinishedPool:
    """Merge the done candidates of rank < N into the pool and keep the best N.
    still_open [B, 1]: users whose search has not closed."""
    beams = pool.scores.shape[1]
    admitted = cand.done.clone()
    admitted[:, beams:] = False
    scores = cand.scores / (step**length_penalty)
    scores = scores + (~still_open).to(torch.float32) * _CHARGE
    scores = scores + (~admitted).to(torch.float32) * _CHARGE
    real = cand.complete & admitted & still_open & (cand.scores > _FILLER_FLOOR)
    merged_scores = torch.cat((pool.scores, scores), dim=1)
    keep = merged_scores.topk(beams, dim=1).indices

    def merge(old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        both = torch.cat((old, new), dim=1)
        index = keep.view(*keep.shape, *([1] * (both.dim() - 2))).expand(-1, -1,
                                                                          *both.shape[2:])
        return both.gather(1, index)

    return FinishedPool(merged_scores.gather(1, keep), merge(pool.finished, admitted),
                        merge(pool.real, real),
                        merge(pool.lengths, torch.full_like(cand.parents, step)),
                        merge(pool.tokens, cand.tokens))


def _still_open(still_open: torch.Tensor, live: LiveBeams, pool: FinishedPool, step: int,
                length_penalty: float) -> torch.Tensor:
    """HF's ``early_stopping=False`` heuristic [B, 1]: a user's search stays open while a
    pool slot is unfinished or the best live beam, scored at its current length, beats the
    pool's worst score."""
    best = live.scores[:, :1] / (step**length_penalty)
    worst = torch.where(pool.finished, pool.scores.min(dim=1, keepdim=True).values, _CHARGE)
    return still_open & (best > worst).any(dim=1, keepdim=True)


def _hypotheses(pool: FinishedPool, num_return: int) -> list[list[Hypothesis]]:
    """Per user, the pool's real titles, best first, at most ``num_return``."""
    real, scores = pool.real.tolist(), pool.scores.tolist()
    lengths, tokens = pool.lengths.tolist(), pool.tokens.tolist()
    out = []
    for u in range(len(real)):
        kept = [Hypothesis(tuple(tokens[u][j][: lengths[u][j]]), scores[u][j])
                for j in range(len(real[u])) if real[u][j]]
        kept.sort(key=lambda hyp: hyp.score, reverse=True)
        out.append(kept[:num_return])
    return out


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
    real = prompt_mask[:, :-1] if reasoner.uses_latent else prompt_mask
    lengths = real.long().sum(-1)
    if prefix.num_groups != prompt_mask.shape[0] or not torch.equal(
            prefix.lengths.to(lengths.device), lengths):
        raise ValueError(f"expected a prefix cache of the {prompt_mask.shape[0]} prompts "
                         f"(real lengths {lengths.tolist()}), got {prefix.num_groups} prompts "
                         f"of lengths {prefix.lengths.tolist()}")
