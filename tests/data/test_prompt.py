"""PromptBuilder: the release's exact strings, our template, and the token layout."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from fastlatent.data.batch import EncodedExample
from fastlatent.data.example import Example
from fastlatent.data.prompt import TEMPLATES, PromptBuilder
from fastlatent.data.tokenizer import add_thought_token, train_title_tokenizer

# Copied from LATENTR3.md, "Prompt and target" (typos are the release's).
RELEASE_PREAMBLE = "Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request. \n\n### Instruction:\nGiven a list of musics the user recetenly enjoy, please write a new musics that the user may bought\n"  # noqa: E501
RELEASE_USER_INPUT = "### User Input: \nThe user has palyed the following musicss before: {HISTORY}\n\n### Response: \n"  # noqa: E501
SPEC = Path(__file__).resolve().parents[3] / "shared" / "reference" / "LATENTR3.md"

EXAMPLE = Example(user="u1", history=("Kansas", "Point of Know Return", 'The "Black" Album'),
                  target="Monolith", target_item=3, target_time=100)


@pytest.fixture
def tokenizer():
    tok = train_title_tokenizer(
        [RELEASE_PREAMBLE, RELEASE_USER_INPUT, TEMPLATES["default"].preamble,
         "Kansas", "Point of Know Return", "Monolith"], vocab_size=400)
    add_thought_token(tok)
    return tok


def tokens(tok, text: str) -> tuple[int, ...]:
    return tuple(tok.encode(text, add_special_tokens=False))


def test_latentr3_strings_are_the_release_strings(tokenizer):
    builder = PromptBuilder(tokenizer, template="latentr3", domain="movies")
    assert builder.preamble() == RELEASE_PREAMBLE
    expected = RELEASE_USER_INPUT.replace(
        "{HISTORY}", '"Kansas", "Point of Know Return", "The "Black" Album"')
    assert builder.user_input(EXAMPLE.history) == expected
    assert builder.target_text("Monolith") == '"Monolith"\n'


def test_latentr3_domain_word_is_a_field(tokenizer):
    builder = PromptBuilder(tokenizer, template="latentr3", release_domain="toys")
    assert builder.preamble() == RELEASE_PREAMBLE.replace("musics", "toys")
    assert "the following toyss before" in builder.user_input(["A"])  # as the release does
    assert "musics" not in builder.preamble() + builder.user_input(["A"])


@pytest.mark.skipif(not SPEC.is_file(), reason="LATENTR3.md is not beside the repository")
def test_latentr3_strings_match_the_spec_file(tokenizer):
    literals = re.findall(r'^\((\d)\) (".*")$', SPEC.read_text(encoding="utf-8"), re.MULTILINE)
    spec = {number: ast.literal_eval(text) for number, text in literals}
    builder = PromptBuilder(tokenizer, template="latentr3")
    assert builder.preamble() == spec["1"]
    assert builder.user_input(["A", "B"]) == spec["2"].replace("{HISTORY}", '"A", "B"')


@pytest.mark.parametrize("domain", ["movies", "music", "products"])
def test_default_template_names_domain_and_quotes_history(tokenizer, domain):
    builder = PromptBuilder(tokenizer, domain=domain)
    assert domain in builder.preamble()
    text = builder.user_input(["Kansas", "Monolith"])
    assert '"Kansas", "Monolith"' in text
    assert "{" not in builder.preamble() + text


def test_history_with_braces_is_not_formatted(tokenizer):
    builder = PromptBuilder(tokenizer)
    assert '"{domain} {0}"' in builder.user_input(["{domain} {0}"])


@pytest.mark.parametrize("template", ["default", "latentr3"])
def test_encode_concatenates_separately_tokenised_pieces(tokenizer, template):
    builder = PromptBuilder(tokenizer, template=template, domain="music")
    encoded = builder.encode(EXAMPLE)
    thought = tokenizer.convert_tokens_to_ids("<|Thought|>")
    expected_prompt = (tokens(tokenizer, builder.preamble())
                       + tokens(tokenizer, builder.user_input(EXAMPLE.history)) + (thought,))
    expected_target = tokens(tokenizer, '"Monolith"\n') + (tokenizer.eos_token_id,)
    assert encoded == EncodedExample(prompt_ids=expected_prompt, target_ids=expected_target)
    assert encoded.prompt_ids.count(thought) == 1
    assert tokenizer.decode(encoded.prompt_ids[:-1]) == (
        builder.preamble() + builder.user_input(EXAMPLE.history))


def test_target_is_title_tokens_then_eos(tokenizer):
    builder = PromptBuilder(tokenizer)
    target = builder.encode_target("Greatest Hits")
    assert target[-1] == tokenizer.eos_token_id
    assert tokenizer.eos_token_id not in target[:-1]
    assert tokenizer.decode(target[:-1]) == '"Greatest Hits"\n'


def test_no_bos_and_no_thought_without_latent(tokenizer):
    builder = PromptBuilder(tokenizer, template="latentr3", use_thought=False)
    encoded = builder.encode(EXAMPLE)
    assert encoded.prompt_ids == (tokens(tokenizer, RELEASE_PREAMBLE)
                                  + tokens(tokenizer, builder.user_input(EXAMPLE.history)))
    assert encoded.prompt_ids[0] == tokens(tokenizer, RELEASE_PREAMBLE)[0]
    assert tokenizer.convert_tokens_to_ids("<|Thought|>") not in encoded.prompt_ids


def test_use_thought_false_works_without_the_token():
    tok = train_title_tokenizer(["Kansas"], vocab_size=300)
    encoded = PromptBuilder(tok, use_thought=False).encode(EXAMPLE)
    assert encoded.target_ids[-1] == tok.eos_token_id


def test_missing_thought_token_is_a_clear_error():
    tok = train_title_tokenizer(["Kansas"], vocab_size=300)
    with pytest.raises(ValueError, match="call add_thought_token"):
        PromptBuilder(tok)


def test_unknown_template_lists_choices(tokenizer):
    with pytest.raises(ValueError, match=r"\['default', 'latentr3'\], got 'bigrec'"):
        PromptBuilder(tokenizer, template="bigrec")
