"""The naive beam-search oracle: Hugging Face ``generate`` with a trie constraint (see
:mod:`fastlatent.engine.generate_search`), under its oracle name; and the checks that
compare the engine's search against it."""

from __future__ import annotations

import random

import pytest
import torch

from fastlatent.data.trie import TitleTrie
from fastlatent.engine.beam_search import engine_beam_search
from fastlatent.engine.generate_search import generate_beam_search as naive_beam_search
from fastlatent.model.reasoner import LatentReasoner

__all__ = ["assert_same_hypotheses", "check_against_naive", "naive", "naive_beam_search",
           "random_trie"]


def naive(reasoner: LatentReasoner, ids: torch.Tensor, mask: torch.Tensor, trie: TitleTrie,
          **kwargs) -> list:
    """The oracle on the prompts' input embeddings (one latent at most)."""
    with torch.no_grad():
        embeds = reasoner.prompt_embeds(ids, mask)
        return naive_beam_search(reasoner.llm, embeds, mask, trie,
                                 eos_token_id=reasoner.tokenizer.eos_token_id,
                                 pad_token_id=reasoner.tokenizer.pad_token_id, **kwargs)


def assert_same_hypotheses(got: list, expected: list) -> None:
    """Same titles in the same order, scores within 1e-4."""
    assert len(got) == len(expected)
    for got_row, expected_row in zip(got, expected, strict=True):
        assert [h.token_ids for h in got_row] == [h.token_ids for h in expected_row]
        assert [h.score for h in got_row] == pytest.approx(
            [h.score for h in expected_row], abs=1e-4)


def check_against_naive(reasoner: LatentReasoner, ids: torch.Tensor, mask: torch.Tensor,
                        trie: TitleTrie, **kwargs) -> list:
    """Engine == oracle; returns the oracle's result (for non-vacuity checks)."""
    expected = naive(reasoner, ids, mask, trie, **kwargs)
    assert_same_hypotheses(engine_beam_search(reasoner, ids, mask, trie, **kwargs), expected)
    return expected


def random_trie(eos: int, seed: int, num_titles: int = 40) -> TitleTrie:
    """Titles of 1..5 tokens (plus EOS) over a few shared first tokens; some titles are
    prefixes of others."""
    rng = random.Random(seed)
    heads = [rng.randrange(3, 300) for _ in range(4)]
    titles: set[tuple[int, ...]] = set()
    while len(titles) < num_titles:
        body = [rng.choice(heads)] + [rng.randrange(3, 300) for _ in range(rng.randint(0, 4))]
        titles.add((*body, eos))
        if len(body) > 1 and rng.random() < 0.3:
            titles.add((*body[:-1], eos))
    return TitleTrie.from_sequences(sorted(titles), eos_token_id=eos)
