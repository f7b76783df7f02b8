"""The naive beam-search oracle against brute-force scoring of every title.

Also pins down what Hugging Face ``generate`` does with ``inputs_embeds`` in the
installed version (the fast engine relies on the same semantics): the prefix function
sees generated tokens only, positions follow the attention mask, scores are full-vocab
log-probs (not renormalised) and the length penalty counts generated tokens incl. EOS.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from fastlatent.data.trie import TitleTrie
from fastlatent.engine.beam_search import Hypothesis
from fastlatent.engine.generate_search import _row_hypotheses
from fastlatent.ops.positions import positions_from_mask
from fastlatent.testing.beam_search import naive_beam_search

PAD, EOS, VOCAB, HIDDEN = 0, 1, 40, 32
TITLES = [
    (5, EOS),
    (5, 6, EOS),
    (5, 6, 17, EOS),
    (7, EOS),
    (7, 8, 9, EOS),
    (10, EOS),
    (11, 12, 13, 14, 15, 16, EOS),
]


@pytest.fixture(scope="module")
def llm() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        pad_token_id=PAD, eos_token_id=EOS, bos_token_id=2,
        initializer_range=0.2,  # peakier than the default 0.02, so titles' scores spread out
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def trie() -> TitleTrie:
    return TitleTrie.from_sequences(TITLES, eos_token_id=EOS)


def make_prompts(lengths: list[int], seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(n, HIDDEN, generator=gen) for n in lengths]


def left_pad(prompts: list[torch.Tensor], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad with loud garbage, so that leaking padding would show."""
    width = max(p.shape[0] for p in prompts)
    gen = torch.Generator().manual_seed(seed)
    embeds = 10.0 * torch.randn(len(prompts), width, HIDDEN, generator=gen)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        embeds[i, width - p.shape[0]:] = p
        mask[i, width - p.shape[0]:] = 1
    return embeds, mask


def search(llm, prompts, trie, **kwargs) -> list[list[Hypothesis]]:
    embeds, mask = left_pad(prompts, seed=99)
    return naive_beam_search(llm, embeds, mask, trie, eos_token_id=EOS, pad_token_id=PAD,
                             **kwargs)


@torch.no_grad()
def title_logprobs(llm, prompt: torch.Tensor, title: tuple[int, ...]) -> torch.Tensor:
    """[len(title), V] full-vocab log-probs at each title position: one full forward on
    [prompt, title] without cache or mask, positions 0..n-1."""
    title_embeds = llm.get_input_embeddings()(torch.tensor(title[:-1], dtype=torch.long))
    embeds = torch.cat([prompt, title_embeds])[None]
    logits = llm(inputs_embeds=embeds).logits[0, prompt.shape[0] - 1:].double()
    return logits.log_softmax(-1)


def brute_force_score(llm, prompt, title, length_penalty: float) -> float:
    logp = title_logprobs(llm, prompt, title)
    total = logp[torch.arange(len(title)), torch.tensor(title)].sum().item()
    return total / len(title) ** length_penalty


def brute_force_ranking(llm, prompt, length_penalty) -> list[tuple[tuple[int, ...], float]]:
    scored = [(t, brute_force_score(llm, prompt, t, length_penalty)) for t in TITLES]
    return sorted(scored, key=lambda item: item[1], reverse=True)


@pytest.mark.parametrize("length_penalty", [1.0, 0.0], ids=["lp1-bigrec", "lp0-d3"])
def test_exhaustive_search_matches_brute_force(llm, trie, length_penalty):
    prompt = make_prompts([6], seed=1)[0]
    expected = brute_force_ranking(llm, prompt, length_penalty)
    gaps = [a[1] - b[1] for a, b in zip(expected, expected[1:], strict=False)]
    assert min(gaps) > 1e-3  # a well-separated ranking, so the order is a real check
    (got,) = search(llm, [prompt], trie, num_beams=8, num_return=8,
                    length_penalty=length_penalty)
    assert [h.token_ids for h in got] == [t for t, _ in expected]
    for hyp, (_, score) in zip(got, expected, strict=True):
        assert hyp.score == pytest.approx(score, abs=1e-4)


def test_length_penalty_changes_the_ranking(llm, trie):
    # Guards the test above: with L wrong (e.g. counting the prompt) one of the two
    # length penalties would disagree with brute force.
    prompt = make_prompts([6], seed=1)[0]
    by_lp1 = [t for t, _ in brute_force_ranking(llm, prompt, 1.0)]
    by_lp0 = [t for t, _ in brute_force_ranking(llm, prompt, 0.0)]
    assert by_lp1 != by_lp0
    (lp1,) = search(llm, [prompt], trie, num_beams=8, num_return=8, length_penalty=1.0)
    (lp0,) = search(llm, [prompt], trie, num_beams=8, num_return=8, length_penalty=0.0)
    scores0 = {h.token_ids: h.score for h in lp0}
    for hyp in lp1:  # same paths, score / len under lp=1
        assert hyp.score == pytest.approx(scores0[hyp.token_ids] / len(hyp.token_ids), abs=1e-5)


def test_scores_are_full_vocab_not_renormalised(llm, trie):
    prompt = make_prompts([6], seed=1)[0]
    (got,) = search(llm, [prompt], trie, num_beams=8, num_return=8, length_penalty=0.0)
    best = got[0].token_ids
    logp = title_logprobs(llm, prompt, best)
    full = sum(logp[i, tok].item() for i, tok in enumerate(best))
    renormalised = sum(
        (logp[i, tok] - logp[i, trie.allowed(best[:i])].logsumexp(-1)).item()
        for i, tok in enumerate(best)
    )
    assert got[0].score == pytest.approx(full, abs=1e-4)
    assert renormalised - full > 0.5  # the two conventions are far apart here


def test_pruned_search_returns_distinct_complete_paths(llm, trie):
    prompts = make_prompts([4, 9], seed=2)
    results = search(llm, prompts, trie, num_beams=3, num_return=3, length_penalty=1.0)
    assert len(results) == 2
    for prompt, hyps in zip(prompts, results, strict=True):
        assert len(hyps) == 3
        assert len({h.token_ids for h in hyps}) == 3
        assert [h.score for h in hyps] == sorted((h.score for h in hyps), reverse=True)
        for hyp in hyps:
            assert trie.contains(hyp.token_ids)
            assert hyp.score == pytest.approx(
                brute_force_score(llm, prompt, hyp.token_ids, 1.0), abs=1e-4)


def test_num_return_below_num_beams_is_the_head(llm, trie):
    prompt = make_prompts([5], seed=3)
    (full,) = search(llm, prompt, trie, num_beams=8, num_return=8)
    (head,) = search(llm, prompt, trie, num_beams=8, num_return=3)
    assert head == full[:3]


def test_fewer_titles_than_beams(llm):
    small = TitleTrie.from_sequences([(5, EOS), (7, 8, EOS)], eos_token_id=EOS)
    (got,) = search(llm, make_prompts([5], seed=4), small, num_beams=6, num_return=6)
    assert sorted(h.token_ids for h in got) == [(5, EOS), (7, 8, EOS)]


def test_titles_longer_than_max_new_tokens_are_dropped(llm, trie):
    (got,) = search(llm, make_prompts([5], seed=5), trie, num_beams=8, num_return=8,
                    max_new_tokens=2)
    assert sorted(h.token_ids for h in got) == [(5, EOS), (7, EOS), (10, EOS)]


@pytest.mark.parametrize("num_beams", [3, 8])
def test_cap_at_longest_title_changes_nothing(llm, trie, monkeypatch, num_beams):
    # The oracle stops after trie.max_length steps; running on as HF would (here to 40
    # new tokens) only moves filler beams and must return the same hypotheses.
    prompts = make_prompts([5, 8], seed=9)
    capped = search(llm, prompts, trie, num_beams=num_beams, num_return=num_beams)
    monkeypatch.setattr(trie, "max_length", 40)
    uncapped = search(llm, prompts, trie, num_beams=num_beams, num_return=num_beams,
                      max_new_tokens=40)
    assert capped == uncapped


def test_left_padded_ragged_batch_equals_single_rows(llm, trie):
    prompts = make_prompts([3, 7, 5, 7], seed=6)
    batched = search(llm, prompts, trie, num_beams=4, num_return=4, length_penalty=1.0)
    for prompt, row in zip(prompts, batched, strict=True):
        (alone,) = search(llm, [prompt], trie, num_beams=4, num_return=4, length_penalty=1.0)
        assert [h.token_ids for h in row] == [h.token_ids for h in alone]
        assert [h.score for h in row] == pytest.approx([h.score for h in alone], abs=1e-5)
    # The rows really differ, so equality above is not vacuous.
    assert len({tuple(h.token_ids for h in row) for row in batched}) > 1


def test_hf_prefix_fn_sees_generated_tokens_only(llm, trie, monkeypatch):
    seen: list[tuple[int, ...]] = []
    original = trie.allowed

    def spy(prefix):
        seen.append(tuple(prefix))
        return original(prefix)

    monkeypatch.setattr(trie, "allowed", spy)
    search(llm, make_prompts([6, 3], seed=7), trie, num_beams=3, num_return=3)
    assert seen[: 2 * 3] == [()] * 6  # first step: every beam of both rows, empty prefix
    assert max(len(p) for p in seen) <= max(len(t) for t in TITLES)


def test_postprocessing_drops_fillers_and_cut_offs(trie):
    # One row of HF output as generate returns it (lp = 1): sequences padded with EOS,
    # penalised scores, generated lengths. Fillers carry HF's -1e9 raw score.
    sequences = [
        [7, EOS, EOS, EOS],  # filler duplicate of a real title, listed first
        [5, EOS, EOS, EOS],
        [11, 12, 13, 14],  # cut off by max_new_tokens: not a title
        [7, 8, 9, EOS],
        [10, EOS, EOS, EOS],  # filler with a title the real search did not return
        [7, EOS, EOS, EOS],
        [5, 6, 3, EOS],  # leaves the trie
    ]
    raw = [-1e9 - 4.0, -6.0, -9.0, -12.0, -1e9 - 3.0, -8.0, -7.0]
    lengths = [3, 2, 4, 4, 2, 2, 4]
    scores = [r / n for r, n in zip(raw, lengths, strict=True)]
    got = _row_hypotheses(sequences, scores, lengths, trie, num_return=5, length_penalty=1.0)
    assert got == [
        Hypothesis((5, EOS), -3.0),
        Hypothesis((7, 8, 9, EOS), -3.0),
        Hypothesis((7, EOS), -4.0),
    ]
    top = _row_hypotheses(sequences, scores, lengths, trie, num_return=1, length_penalty=1.0)
    assert top == got[:1]


def test_hf_positions_follow_the_attention_mask(llm, trie):
    # RoPE only sees relative positions, so a uniform shift per row would go unnoticed by
    # the batch-vs-single test above; look at the position ids HF feeds the model instead.
    captured: list[torch.Tensor] = []

    def hook(module, args, kwargs):
        captured.append(kwargs["position_ids"].clone())

    embeds, mask = left_pad(make_prompts([2, 5], seed=10), seed=0)
    handle = llm.model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        naive_beam_search(llm, embeds, mask, trie, eos_token_id=EOS, pad_token_id=PAD,
                          num_beams=3, num_return=3)
    finally:
        handle.remove()
    prompt_positions = positions_from_mask(mask).repeat_interleave(3, dim=0)
    assert torch.equal(captured[0], prompt_positions)  # [[0,0,0,0,1], ...] x 3 beams
    for step, positions in enumerate(captured[1:], start=1):  # then one token per step
        assert torch.equal(positions, prompt_positions[:, -1:] + step)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_beams": 2, "num_return": 3}, "num_return <= num_beams"),
        ({"num_beams": 1, "num_return": 1}, "num_beams >= 2"),
        ({"max_new_tokens": 0}, "max_new_tokens >= 1"),
        ({"eos_token_id": 3}, "a trie with eos 3"),
    ],
    ids=["return>beams", "greedy", "no-tokens", "eos-mismatch"],
)
def test_rejects_bad_arguments(llm, trie, kwargs, message):
    embeds, mask = left_pad(make_prompts([4], seed=8), seed=0)
    args = {"eos_token_id": EOS, "pad_token_id": PAD, **kwargs}
    with pytest.raises(ValueError, match=message):
        naive_beam_search(llm, embeds, mask, trie, **args)


def test_rejects_right_padding_training_mode_and_altering_configs(llm, trie, monkeypatch):
    embeds, mask = left_pad(make_prompts([4, 2], seed=8), seed=0)
    with pytest.raises(ValueError, match="left-padded"):
        naive_beam_search(llm, embeds, mask.flip(-1), trie, eos_token_id=EOS, pad_token_id=PAD)
    monkeypatch.setattr(llm.generation_config, "suppress_tokens", [3])
    with pytest.raises(ValueError, match="suppress_tokens"):
        naive_beam_search(llm, embeds, mask, trie, eos_token_id=EOS, pad_token_id=PAD)
    monkeypatch.undo()
    llm.train()
    try:
        with pytest.raises(ValueError, match="eval mode"):
            naive_beam_search(llm, embeds, mask, trie, eos_token_id=EOS, pad_token_id=PAD)
    finally:
        llm.eval()
