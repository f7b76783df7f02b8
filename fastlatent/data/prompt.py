"""Prompt and target construction (LatentR³ "Prompt and target").

A prompt is three pieces, each tokenised on its own (no special tokens, no BOS) and
concatenated: the instruction preamble, the user input (quoted history titles, oldest
first, then a response header) and, with a latent, the thought token. The target is
``'"' + title + '"\\n'`` tokenised alone, followed by the EOS id.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fastlatent.data.batch import EncodedExample
from fastlatent.data.example import Example
from fastlatent.data.tokenizer import THOUGHT_TOKEN, thought_token_id

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class PromptTemplate:
    """``preamble`` may use ``{domain}`` (the dataset's noun) or ``{release_domain}`` (the
    word the release writes into its strings); ``user_input`` uses ``{history}`` and may
    use either."""

    preamble: str
    user_input: str


TEMPLATES = {
    # Our wording: names the dataset's domain.
    "default": PromptTemplate(
        preamble=("### Instruction:\nThe user chose the {domain} below, oldest first. "
                  "Name the next one the user will choose, as its title in double quotes.\n\n"),
        user_input="### History:\n{history}\n\n### Next:\n",
    ),
    # The release's strings byte for byte, typos included, with its domain word ("musics"
    # for CDs, pluralised again in the second string: "musicss") as {release_domain}.
    # For reproduction runs.
    "latentr3": PromptTemplate(
        preamble=("Below is an instruction that describes a task, paired with an input that "
                  "provides further context. Write a response that appropriately completes "
                  "the request. \n\n### Instruction:\nGiven a list of {release_domain} "
                  "the user recetenly enjoy, please write a new {release_domain} that the "
                  "user may bought\n"),
        user_input=("### User Input: \nThe user has palyed the following {release_domain}s "
                    "before: {history}\n\n### Response: \n"),
    ),
}


class PromptBuilder:
    """Turns :class:`Example` records into token ids for one tokenizer and template.

    ``use_thought=False`` is the plain SFT ("w/o reasoning") prompt without the thought
    token. With ``use_thought=True`` the tokenizer must already hold the thought token
    (see :func:`fastlatent.data.tokenizer.add_thought_token`).
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, *, template: str = "default",
                 domain: str = "items", release_domain: str = "musics",
                 use_thought: bool = True) -> None:
        if template not in TEMPLATES:
            raise ValueError(f"expected a template among {sorted(TEMPLATES)}, got {template!r}")
        if tokenizer.eos_token_id is None:
            raise ValueError("expected a tokenizer with an EOS token (it ends every target), "
                             "got none")
        self.tokenizer = tokenizer
        self.template = template
        self.domain = domain
        self.release_domain = release_domain
        self.use_thought = use_thought
        self.eos_id: int = tokenizer.eos_token_id
        self.thought_id = thought_token_id(tokenizer) if use_thought else None
        if use_thought and self.thought_id is None:
            raise ValueError(f"expected the tokenizer to have {THOUGHT_TOKEN} as an added token, "
                             "got none; call add_thought_token(tokenizer) first")
        self._preamble_ids = self._tokenize(self.preamble())

    def preamble(self) -> str:
        """The instruction text every prompt starts with."""
        return TEMPLATES[self.template].preamble.format(domain=self.domain,
                                                        release_domain=self.release_domain)

    def user_input(self, history: Sequence[str]) -> str:
        """The quoted history titles (``"A", "B"``) inside the user-input template."""
        quoted = ", ".join(f'"{title}"' for title in history)
        return TEMPLATES[self.template].user_input.format(
            domain=self.domain, release_domain=self.release_domain, history=quoted)

    def target_text(self, title: str) -> str:
        """``'"' + title + '"\\n'``."""
        return f'"{title}"\n'

    def encode_target(self, title: str) -> tuple[int, ...]:
        """Tokens of :meth:`target_text` alone, then the EOS id."""
        return self._tokenize(self.target_text(title)) + (self.eos_id,)

    def encode(self, example: Example) -> EncodedExample:
        """Preamble ids + user-input ids (+ the thought id), and the encoded target."""
        prompt = self._preamble_ids + self._tokenize(self.user_input(example.history))
        if self.thought_id is not None:
            prompt += (self.thought_id,)
        return EncodedExample(prompt_ids=prompt, target_ids=self.encode_target(example.target))

    def _tokenize(self, text: str) -> tuple[int, ...]:
        return tuple(self.tokenizer.encode(text, add_special_tokens=False))
