"""Hugging Face's beam-search bookkeeping for trie-constrained search, without a model.

The model's part of a step is the live beams' next-token log-probs ``logp`` [B·N, V]
(B users, N beams; full-vocabulary fp32 ``log_softmax``, not renormalised). The rest is
here, in the fp32 arithmetic of HF ``generate`` (``early_stopping=False``), step by step
with :func:`advance`. Every step works on tensors: each beam carries its trie node, and
its continuations come from :meth:`TrieTensors.expand` as [B·N, C] (C = the most
children of any current node).

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
  beam's ``score / step ** length_penalty`` no longer beats the pool's worst score. The
  search ends when every search is closed or every candidate is done, or after the step
  cap (the caller's: ``min(max_new_tokens, trie.max_length)``, by which every beam that is
  not a filler has finished).

Result (:func:`hypotheses`), as the oracle filters HF's output: the pool entries that
entered as titles (a complete trie path, admitted without a -1e9 charge, raw log-prob
above -1e8, i.e. not a filler), best first.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastlatent.data.trie import TrieTensors

# HF's charge for filler beams, done candidates kept as live beams, and candidates that
# may not enter the finished pool.
CHARGE = -1.0e9
# The log-prob sums of paths without a charge are finite and far above this; fillers and
# every other charged beam fall below.
FILLER_FLOOR = -1.0e8


@dataclass(frozen=True)
class Hypothesis:
    token_ids: tuple[int, ...]  # generated tokens, ending in eos
    score: float  # Σ log p (full vocabulary) / len(token_ids) ** length_penalty


@dataclass
class LiveBeams:
    """HF's running beams, [B, N] per user (B users, N beams), best first."""

    scores: torch.Tensor  # [B, N] fp32 cumulative log-prob (incl. -1e9 charges)
    nodes: torch.Tensor  # [B, N] int64 trie node reached, -1 = off the trie
    tokens: torch.Tensor  # [B, N, S] int64 generated tokens (S = the step cap)

    @classmethod
    def start(cls, users: int, beams: int, steps: int, device: torch.device) -> LiveBeams:
        scores = torch.zeros(users, beams, dtype=torch.float32, device=device)
        scores[:, 1:] = CHARGE
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
    is_title: torch.Tensor  # [B, N] bool, a title admitted without a charge (returned)
    lengths: torch.Tensor  # [B, N] int64 generated tokens incl. EOS
    tokens: torch.Tensor  # [B, N, S] int64

    @classmethod
    def empty(cls, users: int, beams: int, steps: int, device: torch.device) -> FinishedPool:
        flags = torch.zeros(users, beams, dtype=torch.bool, device=device)
        scores = torch.full((users, beams), CHARGE, dtype=torch.float32, device=device)
        return cls(scores, flags, flags.clone(),
                   torch.zeros(users, beams, dtype=torch.int64, device=device),
                   torch.zeros(users, beams, steps, dtype=torch.int64, device=device))


@dataclass
class SearchState:
    """Where the searches of B users stand after a step."""

    live: LiveBeams
    pool: FinishedPool
    still_open: torch.Tensor  # [B, 1] bool, users whose search has not closed
    parents: torch.Tensor | None = None  # [B, N] each live beam's parent beam, last step
    over: bool = False  # every search closed or every candidate done: stop here

    @classmethod
    def start(cls, users: int, beams: int, steps: int, device: torch.device) -> SearchState:
        """Before step 1: beam 0 at 0, the fillers at -1e9, an empty pool; ``steps`` is
        the step cap (the width of the token histories)."""
        return cls(LiveBeams.start(users, beams, steps, device),
                   FinishedPool.empty(users, beams, steps, device),
                   torch.ones(users, 1, dtype=torch.bool, device=device))


def advance(state: SearchState, logp: torch.Tensor, trie_t: TrieTensors, step: int,
            last_step: int, length_penalty: float) -> SearchState:
    """HF's step ``step`` (1-based; ``last_step`` = the step cap) from the live beams'
    next-token log-probs ``logp`` [B·N, V]. Rows whose log-probs cannot change the result
    (fillers, closed searches) may hold anything finite."""
    beams = state.live.scores.shape[1]
    cand = top_candidates(state.live, logp, trie_t, step, last_step)
    live, parents = next_live(cand, beams)
    pool = update_pool(state.pool, cand, state.still_open, step, length_penalty)
    still_open = update_open(state.still_open, live, pool, step, length_penalty)
    over = not bool(still_open.any()) or bool(cand.done.all())
    return SearchState(live, pool, still_open, parents, over)


def top_candidates(live: LiveBeams, logp: torch.Tensor, trie_t: TrieTensors, step: int,
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


def next_live(cand: Candidates, beams: int) -> tuple[LiveBeams, torch.Tensor]:
    """HF's next live beams: the best N candidates, done ones charged -1e9. Returns them
    and their parents [B, N] (beam index within the user)."""
    charged = cand.scores + cand.done.to(torch.float32) * CHARGE
    scores, pick = charged.topk(beams, dim=1)
    tokens = cand.tokens.gather(1, pick[..., None].expand(-1, -1, cand.tokens.shape[2]))
    return LiveBeams(scores, cand.nodes.gather(1, pick), tokens), cand.parents.gather(1, pick)


def update_pool(pool: FinishedPool, cand: Candidates, still_open: torch.Tensor, step: int,
                length_penalty: float) -> FinishedPool:
    """Merge the done candidates of rank < N into the pool and keep the best N.
    still_open [B, 1]: users whose search has not closed."""
    beams = pool.scores.shape[1]
    admitted = cand.done.clone()
    admitted[:, beams:] = False
    scores = cand.scores / (step**length_penalty)
    scores = scores + (~still_open).to(torch.float32) * CHARGE
    scores = scores + (~admitted).to(torch.float32) * CHARGE
    is_title = cand.complete & admitted & still_open & (cand.scores > FILLER_FLOOR)
    merged_scores = torch.cat((pool.scores, scores), dim=1)
    keep = merged_scores.topk(beams, dim=1).indices

    def merge(old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        both = torch.cat((old, new), dim=1)
        index = keep.view(*keep.shape, *([1] * (both.dim() - 2))).expand(-1, -1,
                                                                          *both.shape[2:])
        return both.gather(1, index)

    return FinishedPool(merged_scores.gather(1, keep), merge(pool.finished, admitted),
                        merge(pool.is_title, is_title),
                        merge(pool.lengths, torch.full_like(cand.parents, step)),
                        merge(pool.tokens, cand.tokens))


def update_open(still_open: torch.Tensor, live: LiveBeams, pool: FinishedPool, step: int,
                length_penalty: float) -> torch.Tensor:
    """HF's ``early_stopping=False`` heuristic [B, 1]: a user's search stays open while a
    pool slot is unfinished or the best live beam, scored at its current length, beats the
    pool's worst score."""
    best = live.scores[:, :1] / (step**length_penalty)
    worst = torch.where(pool.finished, pool.scores.min(dim=1, keepdim=True).values, CHARGE)
    return still_open & (best > worst).any(dim=1, keepdim=True)


def hypotheses(pool: FinishedPool, num_return: int) -> list[list[Hypothesis]]:
    """Per user, the pool's titles, best first, at most ``num_return``."""
    is_title, scores = pool.is_title.tolist(), pool.scores.tolist()
    lengths, tokens = pool.lengths.tolist(), pool.tokens.tolist()
    out = []
    for u in range(len(is_title)):
        kept = [Hypothesis(tuple(tokens[u][j][: lengths[u][j]]), scores[u][j])
                for j in range(len(is_title[u])) if is_title[u][j]]
        kept.sort(key=lambda hyp: hyp.score, reverse=True)
        out.append(kept[:num_return])
    return out
