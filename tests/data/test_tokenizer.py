"""The in-process byte-level BPE and the thought token."""

from __future__ import annotations

import pytest

from fastlatent.data.tokenizer import (
    THOUGHT_TOKEN,
    add_thought_token,
    thought_token_id,
    train_title_tokenizer,
)

CORPUS = ["Toy Story (1995)", "Greatest Hits, Vol. 2", "Let's Get It On Remastered",
          "Misérables, Les (1995)", '"Quiet River"\n'] * 3

TRICKY = [
    'He said "hi" , then left .',
    "Misérables, Les — 日本語 🎵",
    "line one\nline two\r\n\ttabbed  ",
    "  leading and trailing spaces  ",
    "<span class=\"a-size-medium\">",
    "",
]


@pytest.fixture
def tokenizer():
    return train_title_tokenizer(CORPUS, vocab_size=300)


@pytest.mark.parametrize("text", TRICKY)
def test_round_trip(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text


def test_no_special_tokens_added_when_encoding(tokenizer):
    assert tokenizer.bos_token_id is None
    plain = tokenizer.encode("Toy Story", add_special_tokens=False)
    assert tokenizer("Toy Story")["input_ids"] == plain
    assert tokenizer.eos_token_id not in plain


def test_eos_is_pad_and_vocab_is_bounded(tokenizer):
    assert tokenizer.eos_token == "<|endoftext|>"
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == 0
    assert 257 <= len(tokenizer) <= 300


def test_merges_learned_from_the_corpus(tokenizer):
    # 43 merges on this corpus already halve the 13 bytes of a frequent title.
    assert len(tokenizer.encode("Greatest Hits", add_special_tokens=False)) <= 6
    assert len(tokenizer.encode("Qzx Wvk", add_special_tokens=False)) == 7  # unseen: bytes


def test_vocab_too_small_is_rejected():
    with pytest.raises(ValueError, match="vocab_size >= 257"):
        train_title_tokenizer(CORPUS, vocab_size=100)


def test_add_thought_token_is_idempotent_and_keeps_extras(tokenizer):
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|other|>"]})
    before = len(tokenizer)
    first = add_thought_token(tokenizer)
    assert first == before and len(tokenizer) == before + 1
    assert add_thought_token(tokenizer) == first
    assert len(tokenizer) == before + 1
    assert {"<|other|>", THOUGHT_TOKEN} <= set(tokenizer.all_special_tokens)
    assert thought_token_id(tokenizer) == first
    ids = tokenizer.encode(f'x{THOUGHT_TOKEN}"y"', add_special_tokens=False)
    assert first in ids and ids.count(first) == 1


def test_thought_token_id_is_none_before_adding(tokenizer):
    assert thought_token_id(tokenizer) is None


def test_add_thought_token_sets_missing_pad(tokenizer):
    tokenizer.pad_token = None
    assert tokenizer.pad_token is None
    add_thought_token(tokenizer)
    assert tokenizer.pad_token == tokenizer.eos_token == "<|endoftext|>"
