"""HF's beam-search rules (fastlatent.engine.beam_rules) on random log-probs, no model.

The log-probs of a beam are a fixed random function of its user and generated tokens, as a
model's would be. The rules, stepped as the engine steps them, must return what a
straightforward per-user transcription of Hugging Face's beam search (lists, sorting,
float32 sums) returns: the same titles in the same order with the same scores. Then the
single rules: EOS handling, the finished pool's admission and length penalty, closing a
search, ties.
"""

from __future__ import annotations

import random
import zlib

import numpy as np
import pytest
import torch

from fastlatent.data.trie import TitleTrie, TrieTensors
from fastlatent.engine.beam_rules import (
    CHARGE,
    FILLER_FLOOR,
    FinishedPool,
    LiveBeams,
    SearchState,
    advance,
    hypotheses,
    top_candidates,
    update_open,
    update_pool,
)

EOS, VOCAB = 2, 12  # title tokens are 3..11
CPU = torch.device("cpu")
f32 = np.float32


def random_trie(seed: int, num_titles: int) -> TitleTrie:
    """Titles of 1..4 tokens plus EOS; some are prefixes of others."""
    rng = random.Random(seed)
    titles: set[tuple[int, ...]] = set()
    while len(titles) < num_titles:
        body = [rng.randrange(3, VOCAB) for _ in range(rng.randint(1, 4))]
        titles.add((*body, EOS))
        if len(body) > 1 and rng.random() < 0.3:
            titles.add((*body[:-1], EOS))
    return TitleTrie.from_sequences(sorted(titles), eos_token_id=EOS)


def random_logp(seed: int, scale: float):
    """A fixed random next-token distribution per (user, generated tokens), fp32."""
    table: dict[tuple[int, tuple[int, ...]], torch.Tensor] = {}

    def logp(user: int, tokens: tuple[int, ...]) -> torch.Tensor:
        key = (user, tokens)
        if key not in table:
            gen = torch.Generator().manual_seed(zlib.crc32(repr((seed, key)).encode()))
            table[key] = torch.log_softmax(scale * torch.randn(VOCAB, generator=gen), dim=0)
        return table[key]

    return logp


def run_rules(trie: TitleTrie, users: int, beams: int, length_penalty: float,
              max_new_tokens: int, logp_of) -> list:
    """The rules stepped as the engine steps them, log-probs from ``logp_of``."""
    trie_t = TrieTensors.from_trie(trie, VOCAB, CPU)
    steps = min(max_new_tokens, trie.max_length)
    state = SearchState.start(users, beams, steps, CPU)
    for step in range(1, steps + 1):
        history = state.live.tokens[:, :, :step - 1].tolist()
        logp = torch.stack([logp_of(u, tuple(history[u][b]))
                            for u in range(users) for b in range(beams)])
        state = advance(state, logp, trie_t, step, steps, length_penalty)
        if state.over:
            break
    return hypotheses(state.pool, beams)


def reference_search(trie: TitleTrie, user: int, beams: int, length_penalty: float,
                     max_new_tokens: int, logp_of) -> list[tuple[tuple[int, ...], float]]:
    """HF ``generate``'s beam search for one user with ``prefix_allowed_tokens_fn`` = the
    trie (EOS only where it allows nothing) and ``early_stopping=False``, written out with
    lists; returns the finished titles, best first, as the oracle filters them."""
    steps = min(max_new_tokens, trie.max_length)
    live = [(f32(0.0 if b == 0 else CHARGE), ()) for b in range(beams)]  # (score, tokens)
    pool = [(f32(CHARGE), False, False, ())] * beams  # (score, finished, is_title, tokens)
    still_open = True
    for step in range(1, steps + 1):
        penalty = f32(step**length_penalty)
        cands = []  # (score, tokens), in (beam, token) order before sorting
        for score, tokens in live:
            row = logp_of(user, tokens).tolist()
            for token in trie.allowed(tokens) or [EOS]:
                cands.append((score + f32(row[token]), (*tokens, token)))
        cands = sorted(cands, key=lambda c: -c[0])[:2 * beams]
        done = [tokens[-1] == EOS or step == steps for _, tokens in cands]
        charged = [(score + f32(CHARGE if d else 0.0), tokens)
                   for (score, tokens), d in zip(cands, done, strict=True)]
        live = sorted(charged, key=lambda c: -c[0])[:beams]
        new = []
        for rank, ((score, tokens), d) in enumerate(zip(cands, done, strict=True)):
            admitted = d and rank < beams
            entry = score / penalty + f32(0.0 if still_open else CHARGE)
            entry = entry + f32(0.0 if admitted else CHARGE)
            is_title = (admitted and still_open and score > FILLER_FLOOR
                        and tokens[-1] == EOS and trie.contains(tokens))
            new.append((entry, admitted, is_title, tokens))
        pool = sorted(pool + new, key=lambda e: -e[0])[:beams]
        worst = min(e[0] for e in pool)
        best = live[0][0] / penalty
        still_open = still_open and any(best > (worst if e[1] else CHARGE) for e in pool)
        if not still_open or all(done):
            break
    titles = [(e[3], float(e[0])) for e in pool if e[2]]
    return sorted(titles, key=lambda t: -t[1])


CASES = [  # (trie seed, titles, beams, users, length penalty, max_new_tokens, logp scale)
    (0, 30, 4, 3, 1.0, 16, 2.0),
    (1, 30, 4, 3, 0.0, 16, 2.0),
    (2, 40, 8, 2, 1.0, 16, 1.0),
    (3, 40, 3, 3, 0.5, 16, 4.0),
    (4, 20, 10, 2, 1.0, 16, 2.0),
    (5, 5, 8, 3, 1.0, 16, 2.0),  # fewer titles than beams: fillers reach the pool
    (6, 5, 8, 3, 0.0, 16, 2.0),
    (7, 30, 5, 3, 1.0, 3, 2.0),  # cut off: unfinished candidates enter the pool at step 3
    (8, 30, 6, 3, 0.0, 2, 1.0),
    (9, 60, 2, 4, 1.0, 16, 3.0),
    (16, 40, 3, 6, 1.0, 16, 6.0),  # peaked log-probs: searches close before a longer title
    (11, 30, 5, 6, 2.0, 16, 4.0),  # that would have scored better (HF's heuristic)
]


@pytest.mark.parametrize(("seed", "titles", "beams", "users", "lp", "max_new", "scale"), CASES,
                         ids=[f"T{c[1]}-N{c[2]}-B{c[3]}-lp{c[4]}-S{c[5]}" for c in CASES])
def test_rules_match_the_reference_on_random_log_probs(seed, titles, beams, users, lp,
                                                       max_new, scale):
    trie = random_trie(seed, titles)
    logp_of = random_logp(seed, scale)
    got = run_rules(trie, users, beams, lp, max_new, logp_of)
    assert len(got) == users
    for user, row in enumerate(got):
        expected = reference_search(trie, user, beams, lp, max_new, logp_of)
        assert [h.token_ids for h in row] == [tokens for tokens, _ in expected]
        assert [h.score for h in row] == pytest.approx([s for _, s in expected], rel=1e-6)
        assert len(set(h.token_ids for h in row)) == len(row)
        for h in row:  # the score is the path's log-prob sum over its length ** lp
            assert trie.contains(h.token_ids) and len(h.token_ids) <= max_new
            total = sum(float(logp_of(user, h.token_ids[:i])[t])
                        for i, t in enumerate(h.token_ids))
            assert h.score == pytest.approx(total / len(h.token_ids) ** lp, rel=1e-5)
    assert any(got)


def test_reference_comparison_detects_a_wrong_length_penalty():
    # Guards the comparison above: these log-probs rank the titles differently under the
    # two penalties.
    trie, logp_of = random_trie(0, 30), random_logp(0, 2.0)
    got = run_rules(trie, 3, 4, 0.0, 16, logp_of)
    expected = [reference_search(trie, u, 4, 1.0, 16, logp_of) for u in range(3)]
    assert [[h.token_ids for h in row] for row in got] != [[t for t, _ in row]
                                                           for row in expected]


def live_at(paths: list[tuple[int, ...]], trie: TitleTrie, steps: int = 6) -> LiveBeams:
    """One user whose live beams have generated ``paths`` (scores 0, -1, -2, ...)."""
    beams = len(paths)
    tokens = torch.zeros(1, beams, steps, dtype=torch.int64)
    for b, path in enumerate(paths):
        tokens[0, b, :len(path)] = torch.tensor(path, dtype=torch.int64)
    nodes = torch.tensor([[trie.node_of(p) for p in paths]])
    return LiveBeams(-torch.arange(beams, dtype=torch.float32)[None], nodes, tokens)


def test_a_finished_or_off_trie_beam_may_only_emit_eos():
    trie = TitleTrie.from_sequences([(5, 6, 7, EOS), (5, 6, 7, 9, EOS), (5, 6, EOS), (8, EOS)],
                                    eos_token_id=EOS)
    trie_t = TrieTensors.from_trie(trie, VOCAB, CPU)
    # at step 4: a trie node (EOS or 9 next), a title's end, and off the trie
    live = live_at([(5, 6, 7), (5, 6, EOS), (8, EOS, EOS)], trie)
    logp = torch.log_softmax(torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(0)),
                             dim=1)
    cand = top_candidates(live, logp, trie_t, step=4, last_step=6)
    finite = cand.scores[0] > float("-inf")
    got = {(int(p), int(t)): (bool(d), bool(c), int(n)) for p, t, d, c, n, ok in zip(
        cand.parents[0], cand.tokens[0, :, 3], cand.done[0], cand.complete[0], cand.nodes[0],
        finite, strict=True) if ok}
    # beam 0 may end its title or go on; beams 1 and 2 may only emit EOS, which is done
    # but not a title and leads off the trie
    assert got == {(0, EOS): (True, True, trie.node_of((5, 6, 7, EOS))),
                   (0, 9): (False, False, trie.node_of((5, 6, 7, 9))),
                   (1, EOS): (True, False, -1), (2, EOS): (True, False, -1)}
    # the scores are the parents' plus the token's log-prob, full vocabulary
    for p, t, score, ok in zip(cand.parents[0], cand.tokens[0, :, 3], cand.scores[0], finite,
                               strict=True):
        if ok:
            assert float(score) == float(live.scores[0, p] + logp[p, t])
    assert cand.tokens[0, :, :3].tolist() == [list(live.tokens[0, p, :3]) for p in
                                              cand.parents[0].tolist()]


def test_the_last_step_makes_every_candidate_done():
    trie = TitleTrie.from_sequences([(5, 6, 7, EOS)], eos_token_id=EOS)
    trie_t = TrieTensors.from_trie(trie, VOCAB, CPU)
    live = live_at([(5,), (5,)], trie)
    logp = torch.zeros(2, VOCAB)
    assert not top_candidates(live, logp, trie_t, step=2, last_step=3).done[0, 0]
    last = top_candidates(live, logp, trie_t, step=2, last_step=2)
    assert last.done.all() and not last.complete.any()


def pool_of(scores: list[float], finished: list[bool], steps: int = 6) -> FinishedPool:
    n = len(scores)
    return FinishedPool(torch.tensor([scores]), torch.tensor([finished]),
                        torch.tensor([finished]), torch.full((1, n), 2),
                        torch.zeros(1, n, steps, dtype=torch.int64))


@pytest.mark.parametrize("length_penalty", [1.0, 0.0, 0.5])
def test_the_pool_keeps_the_best_titles_with_the_length_penalty(length_penalty):
    # Two beams, each at a node that allows EOS only: at step 3 both candidates end a
    # title (ranks 0 and 1 < N = 2, so both enter); the pool keeps its best 2 entries.
    trie = TitleTrie.from_sequences([(5, 6, EOS), (5, 7, EOS), (8, 9, EOS), (8, EOS)],
                                    eos_token_id=EOS)
    trie_t = TrieTensors.from_trie(trie, VOCAB, CPU)
    live = live_at([(5, 6), (8, 9)], trie)  # scores 0, -1
    logp = torch.full((2, VOCAB), -50.0)
    logp[0, EOS] = -3.0  # rank 0: (5 6 EOS) at -3
    logp[1, EOS] = -4.5  # rank 1: (8 9 EOS) at -5.5
    cand = top_candidates(live, logp, trie_t, step=3, last_step=5)
    assert cand.done[0, :2].all() and cand.complete[0, :2].all()
    old = pool_of([-1.5, CHARGE], [True, False])  # one title found before (length 2)
    pool = update_pool(old, cand, torch.tensor([[True]]), 3, length_penalty)
    penalty = 3**length_penalty
    expected = sorted([-1.5, -3.0 / penalty, -5.5 / penalty], reverse=True)[:2]
    assert pool.scores[0].tolist() == pytest.approx(expected)
    assert pool.is_title.all() and pool.finished.all()
    kept = {tuple(t[:n]) for t, n in zip(pool.tokens[0].tolist(), pool.lengths[0].tolist(),
                                         strict=True)}
    assert (5, 6, EOS) in kept  # the new best always beats -5.5 / penalty
    # A closed search admits nothing: its pool stays as it was.
    closed = update_pool(old, cand, torch.tensor([[False]]), 3, length_penalty)
    assert closed.scores[0, 0] == -1.5 and closed.is_title[0].tolist() == [True, False]


def test_a_done_candidate_below_rank_n_is_not_admitted():
    # N = 2. At step 2 the candidates are (5 6) -1, (5 7) -2, (5 EOS) -3: the title (5 EOS)
    # is done at rank 2 >= N, so HF drops it although no other title is in the pool yet.
    trie = TitleTrie.from_sequences([(5, 6, EOS), (5, 7, EOS), (5, EOS)], eos_token_id=EOS)
    trie_t = TrieTensors.from_trie(trie, VOCAB, CPU)
    live = live_at([(5,), (5,)], trie)
    live.scores[0, 1] = CHARGE  # a filler
    logp = torch.full((2, VOCAB), -40.0)
    logp[:, 6], logp[:, 7], logp[:, EOS] = -1.0, -2.0, -3.0
    state = SearchState(live, FinishedPool.empty(1, 2, 6, CPU), torch.tensor([[True]]))
    state = advance(state, logp, trie_t, 2, 6, 1.0)
    assert state.live.tokens[0, :, :2].tolist() == [[5, 6], [5, 7]] and not state.over
    assert hypotheses(state.pool, 2) == [[]]
    state = advance(state, torch.zeros(2, VOCAB), trie_t, 3, 6, 1.0)
    got = hypotheses(state.pool, 2)[0]
    assert [h.token_ids for h in got] == [(5, 6, EOS), (5, 7, EOS)]
    assert [h.score for h in got] == pytest.approx([-1 / 3, -2 / 3])
    assert hypotheses(state.pool, 1)[0] == got[:1]


def test_a_search_closes_when_no_live_beam_can_beat_the_pool():
    live = LiveBeams(torch.tensor([[-8.0, -9.0]]), torch.zeros(1, 2, dtype=torch.int64),
                     torch.zeros(1, 2, 4, dtype=torch.int64))
    open_ = torch.tensor([[True]])
    # the pool's worst finished title at -3 per token; the best live beam at -8 / 2 tokens
    assert not update_open(open_, live, pool_of([-2.0, -3.0], [True, True]), 2, 1.0)
    assert update_open(open_, live, pool_of([-2.0, -3.0], [True, True]), 2, 2.0)  # -8/4
    assert update_open(open_, live, pool_of([-2.0, CHARGE], [True, False]), 2, 1.0)
    assert not update_open(torch.tensor([[False]]), live,
                           pool_of([-2.0, CHARGE], [True, False]), 2, 1.0)  # for good


@pytest.mark.parametrize("length_penalty", [1.0, 0.0])
def test_tied_titles_are_all_returned_once(length_penalty):
    # Every token at the same log-prob: candidates tie at every step. With at least as
    # many beams as trie nodes at any depth, every title is found whichever way the ties
    # are broken, each once, at its exact score.
    titles = [(5, EOS), (6, EOS), (5, 7, EOS), (6, 8, EOS), (5, 7, 9, EOS)]
    trie = TitleTrie.from_sequences(titles, eos_token_id=EOS)
    got = run_rules(trie, 1, 6, length_penalty, 16, lambda user, tokens: torch.full((VOCAB,),
                                                                                  -0.5))
    assert sorted(h.token_ids for h in got[0]) == sorted(titles)
    for h in got[0]:
        n = len(h.token_ids)
        assert h.score == -0.5 * n / n**length_penalty
    scores = [h.score for h in got[0]]
    assert scores == sorted(scores, reverse=True)
