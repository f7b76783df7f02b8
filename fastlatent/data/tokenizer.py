"""Tokenizer helpers: the thought token, and a small byte-level BPE trained in process.

The in-process tokenizer lets tests and tiny random-weight models run without any
download; it encodes any text (byte-level alphabet) and decodes it back exactly.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

THOUGHT_TOKEN = "<|Thought|>"
EOS_TOKEN = "<|endoftext|>"
_BYTE_ALPHABET_SIZE = 256


def train_title_tokenizer(
    texts: Iterable[str], *, vocab_size: int = 512
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``texts`` and wrap it for transformers.

    ``<|endoftext|>`` is both EOS and PAD; nothing (no BOS) is added when encoding, and
    ``decode(encode(s)) == s`` for any string. ``vocab_size`` is an upper bound (the
    256 byte symbols and EOS always belong to it).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < _BYTE_ALPHABET_SIZE + 1:
        raise ValueError(f"expected vocab_size >= {_BYTE_ALPHABET_SIZE + 1} "
                         f"(byte alphabet + EOS), got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS_TOKEN,
                                   pad_token=EOS_TOKEN, clean_up_tokenization_spaces=False)


def add_thought_token(tokenizer: PreTrainedTokenizerBase) -> int:
    """Register :data:`THOUGHT_TOKEN` as an extra special token and return its id.

    Idempotent; earlier extra special tokens are kept. Also sets ``pad_token`` to the EOS
    token when the tokenizer has none. A model using this tokenizer must be resized to
    ``len(tokenizer)``.
    """
    if THOUGHT_TOKEN not in tokenizer.all_special_tokens:
        # The second positional parameter is replace_additional_special_tokens in
        # transformers 4 and replace_extra_special_tokens in 5: False extends the list.
        tokenizer.add_special_tokens({"additional_special_tokens": [THOUGHT_TOKEN]}, False)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError("expected a tokenizer with an EOS token to use as padding, got none")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer.convert_tokens_to_ids(THOUGHT_TOKEN)


def thought_token_id(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The id of :data:`THOUGHT_TOKEN` when the tokenizer has it as an added token."""
    return tokenizer.get_added_vocab().get(THOUGHT_TOKEN)
