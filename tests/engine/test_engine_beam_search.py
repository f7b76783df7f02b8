"""The engine's trie-constrained beam search against the naive oracle (HF ``generate``).

Same titles in the same order and the same scores, for both latent modes, length
penalties 1.0 and 0.0, 2 to 10 beams, ragged prompts, the catalogue's trie, a trie with
varied title lengths and more titles than beams, and a trie with fewer titles than beams
(HF's filler beams). Also: every prompt is encoded once, with no HF forward at all.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from fastlatent.data.batch import collate
from fastlatent.data.prompt import PromptBuilder
from fastlatent.data.trie import TitleTrie, TrieTensors
from fastlatent.engine import beam_rules
from fastlatent.engine import beam_search as engine_module
from fastlatent.engine.beam_search import engine_beam_search
from fastlatent.engine.decoder import Decoder
from fastlatent.evaluate import build_title_trie
from fastlatent.testing.beam_search import (
    assert_same_hypotheses,
    check_against_naive,
    naive,
    random_trie,
)

LATENTS = ["ratt", "none"]
LENGTH_PENALTIES = pytest.mark.parametrize("length_penalty", [1.0, 0.0],
                                           ids=["lp1-bigrec", "lp0-d3"])


def build_reasoner(dataset, latent: str):
    """A tiny random Llama (+ LatentRATT) with weights large enough that next-token
    distributions are far from uniform, so rankings and pruning are not decided by length
    alone."""
    from fastlatent.model.loading import load_llm
    from fastlatent.model.reasoner import LatentReasoner, ReasonerConfig

    llm, tokenizer = load_llm("tiny-random", tokenizer_texts=dataset.catalogue.titles, seed=0)
    reasoner = LatentReasoner.build(llm, tokenizer, ReasonerConfig(latent=latent))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in reasoner.parameters():
            if p.dim() == 2:
                p.copy_(0.15 * torch.randn(p.shape, generator=gen))
    return reasoner.eval()


@pytest.fixture(scope="module", params=LATENTS)
def reasoner(request, synthetic_dataset):
    return build_reasoner(synthetic_dataset, request.param)


@pytest.fixture(scope="module")
def builder(reasoner, synthetic_dataset):
    return PromptBuilder(reasoner.tokenizer, domain=synthetic_dataset.domain,
                         use_thought=reasoner.uses_latent)


@pytest.fixture(scope="module")
def catalogue_trie(builder, synthetic_dataset) -> TitleTrie:
    return build_title_trie(builder, synthetic_dataset.catalogue)


def prompts(builder, dataset, first: int, count: int):
    """``count`` test users from ``first`` on, left-padded (their prompts are ragged)."""
    rows = dataset.split("test")[first:first + count]
    batch = collate([builder.encode(ex) for ex in rows], builder.tokenizer.pad_token_id)
    if len(set(batch.prompt_mask.sum(-1).tolist())) < 2:
        raise RuntimeError("expected ragged prompt lengths")
    return batch.prompt_ids, batch.prompt_mask


@pytest.fixture(scope="module")
def varied_trie(reasoner) -> TitleTrie:
    return random_trie(reasoner.tokenizer.eos_token_id, seed=3)


@pytest.fixture(scope="module")
def small_trie(reasoner) -> TitleTrie:
    eos = reasoner.tokenizer.eos_token_id
    return TitleTrie.from_sequences([(40, eos), (40, 41, eos), (50, 51, 52, eos)],
                                    eos_token_id=eos)


@LENGTH_PENALTIES
@pytest.mark.parametrize(("num_beams", "first", "count"), [(2, 0, 5), (5, 5, 4), (10, 9, 3)],
                         ids=["N2-B5", "N5-B4", "N10-B3"])
def test_catalogue_trie_matches_naive(reasoner, builder, catalogue_trie, synthetic_dataset,
                                      num_beams, first, count, length_penalty):
    ids, mask = prompts(builder, synthetic_dataset, first, count)
    expected = check_against_naive(reasoner, ids, mask, catalogue_trie, num_beams=num_beams,
                                   num_return=num_beams, length_penalty=length_penalty)
    assert all(len(row) == num_beams for row in expected)


@LENGTH_PENALTIES
@pytest.mark.parametrize(("num_beams", "first", "count"), [(3, 12, 4), (10, 16, 3)],
                         ids=["N3-B4", "N10-B3"])
def test_varied_lengths_trie_matches_naive(reasoner, builder, varied_trie, synthetic_dataset,
                                           num_beams, first, count, length_penalty):
    ids, mask = prompts(builder, synthetic_dataset, first, count)
    expected = check_against_naive(reasoner, ids, mask, varied_trie, num_beams=num_beams,
                                   num_return=num_beams, length_penalty=length_penalty)
    assert len({len(h.token_ids) for row in expected for h in row}) > 1


@LENGTH_PENALTIES
@pytest.mark.parametrize("num_beams", [2, 5, 10])
def test_fewer_titles_than_beams_matches_naive(reasoner, builder, small_trie,
                                               synthetic_dataset, num_beams, length_penalty):
    ids, mask = prompts(builder, synthetic_dataset, 20, 3)
    expected = check_against_naive(reasoner, ids, mask, small_trie, num_beams=num_beams,
                                   num_return=num_beams, length_penalty=length_penalty)
    if num_beams >= 5:  # fillers pad the search; only the three real titles come back
        assert all(len(row) == 3 for row in expected)


@pytest.mark.parametrize(("num_beams", "max_new_tokens", "first", "length_penalty"),
                         [(2, 3, 4, 0.0), (6, 4, 0, 1.0), (6, 3, 8, 1.0)],
                         ids=["N2-T3-lp0", "N6-T4-lp1", "N6-T3-lp1"])
def test_titles_cut_off_by_max_new_tokens_match_naive(reasoner, builder, varied_trie,
                                                      synthetic_dataset, num_beams,
                                                      max_new_tokens, first, length_penalty):
    # At the last step HF admits every top candidate to the finished pool, cut-off ones
    # too (the oracle drops those afterwards), so they can displace real titles: with
    # latent="ratt", the first two cases return fewer titles if the engine does not.
    ids, mask = prompts(builder, synthetic_dataset, first, 4)
    expected = check_against_naive(reasoner, ids, mask, varied_trie, num_beams=num_beams,
                                   num_return=num_beams, length_penalty=length_penalty,
                                   max_new_tokens=max_new_tokens)
    assert all(len(h.token_ids) <= max_new_tokens for row in expected for h in row)
    assert any(row for row in expected)


def test_num_return_is_the_head(reasoner, builder, catalogue_trie, synthetic_dataset):
    ids, mask = prompts(builder, synthetic_dataset, 3, 3)
    full = engine_beam_search(reasoner, ids, mask, catalogue_trie, num_beams=6, num_return=6)
    head = engine_beam_search(reasoner, ids, mask, catalogue_trie, num_beams=6, num_return=2)
    assert head == [row[:2] for row in full]


def test_comparison_detects_a_wrong_length_penalty(reasoner, builder, varied_trie,
                                                   synthetic_dataset):
    # Guards the equality tests: the two penalties rank the titles differently here, and
    # the engine run with the wrong one fails the comparison.
    ids, mask = prompts(builder, synthetic_dataset, 0, 4)
    kwargs = dict(num_beams=8, num_return=8)
    lp1 = naive(reasoner, ids, mask, varied_trie, length_penalty=1.0, **kwargs)
    lp0 = naive(reasoner, ids, mask, varied_trie, length_penalty=0.0, **kwargs)
    assert [[h.token_ids for h in row] for row in lp1] != [[h.token_ids for h in row]
                                                           for row in lp0]
    wrong = engine_beam_search(reasoner, ids, mask, varied_trie, length_penalty=0.5, **kwargs)
    with pytest.raises(AssertionError):
        assert_same_hypotheses(wrong, lp1)


def test_comparison_detects_missing_filler_beams(reasoner, builder, catalogue_trie,
                                                 synthetic_dataset, monkeypatch):
    # Without HF's -1e9 start for beams 1..N-1, every beam expands the same prefix and the
    # results hold duplicates: the comparison must notice.
    ids, mask = prompts(builder, synthetic_dataset, 0, 3)
    kwargs = dict(num_beams=4, num_return=4)
    expected = naive(reasoner, ids, mask, catalogue_trie, **kwargs)

    def start_all_at_zero(users, beams, steps, device):
        return beam_rules.LiveBeams(
            torch.zeros(users, beams, device=device),
            torch.zeros(users, beams, dtype=torch.int64, device=device),
            torch.zeros(users, beams, steps, dtype=torch.int64, device=device))

    monkeypatch.setattr(beam_rules.LiveBeams, "start", start_all_at_zero)
    wrong = engine_beam_search(reasoner, ids, mask, catalogue_trie, **kwargs)
    with pytest.raises(AssertionError):
        assert_same_hypotheses(wrong, expected)


@pytest.fixture
def engine_calls(monkeypatch):
    """Records every Decoder.prefix call (prompt rows) and Decoder.suffix call (rows,
    tokens, rows_per_group) while a test runs; the suffix pass a prefix call makes for the
    prompts' own tokens (over their common start) is recorded under "own"."""
    calls: dict[str, list] = {"prefix": [], "suffix": [], "own": [], "steps": []}
    original_prefix, original_suffix = Decoder.prefix, Decoder.suffix
    original_advance = engine_module.advance
    inside = []

    def advance(state, logp, trie_t, step, last_step, length_penalty):  # once per step
        calls["steps"].append(step)
        return original_advance(state, logp, trie_t, step, last_step, length_penalty)

    def prefix(self, input_ids=None, attention_mask=None, **kwargs):
        calls["prefix"].append(input_ids.shape[0])
        inside.append(1)
        try:
            return original_prefix(self, input_ids, attention_mask, **kwargs)
        finally:
            inside.pop()

    def suffix(self, inputs_embeds, suffix_mask, prefix, rows_per_group, cache=None):
        calls["own" if inside else "suffix"].append((*inputs_embeds.shape[:2], rows_per_group))
        return original_suffix(self, inputs_embeds, suffix_mask, prefix, rows_per_group, cache)

    monkeypatch.setattr(Decoder, "prefix", prefix)
    monkeypatch.setattr(Decoder, "suffix", suffix)
    monkeypatch.setattr(engine_module, "advance", advance)
    return calls


@contextlib.contextmanager
def hf_forwards_counted(reasoner):
    """A list that gets one entry per call of the Hugging Face model's own forward."""
    calls = []
    handle = reasoner.llm.register_forward_pre_hook(lambda *args: calls.append(1))
    try:
        yield calls
    finally:
        handle.remove()


def test_each_prompt_is_encoded_once(reasoner, builder, catalogue_trie, synthetic_dataset,
                                     engine_calls):
    ids, mask = prompts(builder, synthetic_dataset, 0, 5)
    with hf_forwards_counted(reasoner) as hf_forwards:
        engine_beam_search(reasoner, ids, mask, catalogue_trie, num_beams=4, num_return=4)
    assert engine_calls["prefix"] == [5]  # one prefix pass, one row per user
    assert hf_forwards == []
    # Inside it, the 5 prompts' own tokens as one group over their common start; then one
    # token per beam row and step, the 4 beams of each user grouped on its prompt.
    assert [(rows, group) for rows, _, group in engine_calls["own"]] == [(5, 5)]
    # Then the beam rows, each user's beams grouped on its prompt. Only the active beams
    # run (open searches, no fillers): with a latent, one row per user at the first step
    # (the other beams are HF's -1e9 fillers); never more than the 4 beams of the 5 users.
    # Where the trie forces the next tokens of every active beam, one pass feeds them all
    # (t > 1), so there are fewer passes than search steps.
    runs = engine_calls["suffix"]
    assert runs and all(rows % group == 0 and rows // group <= 5 and group <= 4
                        for rows, _, group in runs)
    if reasoner.uses_latent:
        assert runs[0] == (5, 1, 1)
    assert sum(rows for rows, _, _ in runs) < len(runs) * 5 * 4  # rows were skipped
    assert any(t > 1 for _, t, _ in runs[1:])  # a forced run
    assert len(runs) + (0 if reasoner.uses_latent else 1) < len(engine_calls["steps"])


def test_stops_at_the_same_step_as_hf(reasoner, builder, varied_trie, synthetic_dataset,
                                      engine_calls):
    # Here HF's early_stopping=False heuristic ends the search one step before the
    # longest title (5 model passes, not 6).
    ids, mask = prompts(builder, synthetic_dataset, 4, 4)
    with hf_forwards_counted(reasoner) as hf_forwards:
        check_against_naive(reasoner, ids, mask, varied_trie, num_beams=2, num_return=2)
    assert len(hf_forwards) < varied_trie.max_length
    assert len(engine_calls["steps"]) == len(hf_forwards)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_beams": 1, "num_return": 1}, "num_beams >= 2"),
        ({"num_beams": 2, "num_return": 3}, "num_return <= num_beams"),
        ({"max_new_tokens": 0}, "max_new_tokens >= 1"),
    ],
    ids=["greedy", "return>beams", "no-tokens"],
)
def test_rejects_bad_arguments(reasoner, builder, small_trie, synthetic_dataset, kwargs,
                               message):
    ids, mask = prompts(builder, synthetic_dataset, 0, 2)
    with pytest.raises(ValueError, match=message):
        engine_beam_search(reasoner, ids, mask, small_trie, **kwargs)


def test_rejects_bad_inputs(reasoner, builder, small_trie, synthetic_dataset):
    ids, mask = prompts(builder, synthetic_dataset, 0, 2)
    eos = reasoner.tokenizer.eos_token_id
    with pytest.raises(ValueError, match="one shape"):
        engine_beam_search(reasoner, ids, mask[:, 1:], small_trie)
    holed = mask.clone()
    holed[0, -3] = 0  # a gap inside the prompt: not left padding
    with pytest.raises(ValueError, match="left-padded"):
        engine_beam_search(reasoner, ids, holed, small_trie)
    with pytest.raises(ValueError, match=f"eos {eos}"):
        engine_beam_search(reasoner, ids, mask,
                           TitleTrie.from_sequences([(40, eos + 1)], eos_token_id=eos + 1))
    vocab = reasoner.llm.get_output_embeddings().weight.shape[0]
    with pytest.raises(ValueError, match="below the vocabulary size"):
        engine_beam_search(reasoner, ids, mask,
                           TitleTrie.from_sequences([(vocab, eos)], eos_token_id=eos))
    reasoner.train()
    try:
        with pytest.raises(ValueError, match="eval mode"):
            engine_beam_search(reasoner, ids, mask, small_trie)
    finally:
        reasoner.eval()


def test_rejects_prompts_without_the_thought_token(synthetic_dataset):
    reasoner = build_reasoner(synthetic_dataset, "ratt")
    builder = PromptBuilder(reasoner.tokenizer, domain=synthetic_dataset.domain,
                            use_thought=False)
    ids, mask = prompts(builder, synthetic_dataset, 0, 2)
    trie = build_title_trie(builder, synthetic_dataset.catalogue)
    with pytest.raises(ValueError, match="thought token"):
        engine_beam_search(reasoner, ids, mask, trie)


def test_forced_tokens_follow_single_child_runs():
    """Rows advance together while every active row has one non-EOS child (or has reached
    a title's end); a branching active row stops the run, an inactive one does not."""
    eos = 2
    trie = TitleTrie.from_sequences([(5, 6, 7, 11, eos), (5, 6, 8, eos), (9, 10, eos)],
                                    eos_token_id=eos)
    trie_t = TrieTensors.from_trie(trie, 64, torch.device("cpu"))

    def node(path):
        current = torch.tensor([0])
        for token in path:
            exp = trie_t.expand(current)
            current = exp.nodes[exp.tokens == token].view(1)
        return int(current)

    def forced(paths, active, limit=8):
        nodes = torch.tensor([node(p) for p in paths])
        return engine_module._forced_tokens(trie_t, nodes, torch.tensor(active),
                                            limit).tolist()

    assert forced([(5,)], [True]) == [[6]]  # then 6 branches into 7 / 8
    assert forced([(5, 6, 7)], [True]) == [[11]]  # then EOS only: the run ends
    assert forced([(9,), (5, 6, 7)], [True, True]) == [[10], [11]]  # both end together
    assert forced([(9,), (5,)], [True, True], limit=0) == [[], []]
    assert forced([(9, 10), (5,)], [True, True]) == [[eos], [6]]  # row 0 has ended
    assert forced([(9,), (5, 6)], [True, True]) == [[], []]  # 5 6 branches
    assert forced([(9,), (5, 6)], [True, False]) == [[10], [eos]]  # ... but is a filler
    assert forced([(5, 6, 8)], [True]) == [[]]  # at a title's end already
