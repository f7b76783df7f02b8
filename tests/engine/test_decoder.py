"""Decoder (prefix once, suffix rows against its cache) against the Hugging Face model's own
forward on each row's full, unpadded sequence, for every supported family."""

from __future__ import annotations

import pytest
import torch

from fastlatent.engine.decoder import Decoder, SuffixCache, UnsupportedModelError
from fastlatent.testing.decoder_models import (
    FAMILIES,
    VOCAB,
    build_config,
    build_llm,
    left_padded_prompts,
    reference_logits,
    small,
    suffix_batch,
)
from fastlatent.testing.op_checks import FP32_TOL as TOL

PROMPT_LENGTHS = (6, 3, 5)  # per prompt; prompts are left-padded to the longest


@pytest.mark.parametrize("rows_per_group", [1, 3], ids=["P1", "P3"])
@pytest.mark.parametrize("family", FAMILIES)
def test_prefix_and_suffix_match_full_forward(family, rows_per_group):
    llm = build_llm(build_config(family))
    decoder = Decoder(llm)
    gen = torch.Generator().manual_seed(1)
    ids, mask = left_padded_prompts(PROMPT_LENGTHS, gen)
    r = len(PROMPT_LENGTHS) * rows_per_group
    embeds, smask = suffix_batch(llm, r, 4, gen)
    with torch.no_grad():
        prefix = decoder.prefix(ids, mask)
        hidden, cache = decoder.suffix(embeds, smask, prefix, rows_per_group)
        logits = decoder.logits(hidden)
        prompt_embeds = llm.get_input_embeddings()(ids)
        rows = [embeds[i][smask[i].bool()] for i in range(r)]
        expected = reference_logits(llm, prompt_embeds, mask, rows, rows_per_group)
        for g, n in enumerate(PROMPT_LENGTHS):  # the prompt's own states, too
            full = llm(input_ids=ids[g, -n:][None], use_cache=False).logits[0]
            torch.testing.assert_close(decoder.logits(prefix.hidden[g, -n:]), full, **TOL)
    assert cache.valid.shape == (r, 4) and len(cache.keys) == llm.config.num_hidden_layers
    assert torch.equal(prefix.lengths, torch.tensor(PROMPT_LENGTHS))
    for i in range(r):
        torch.testing.assert_close(logits[i][smask[i].bool()], expected[i], **TOL)
    assert bool(torch.isfinite(logits).all())  # padded suffix slots too


@pytest.mark.parametrize("family", FAMILIES)
def test_incremental_decoding_with_beam_reorder(family):
    """A ragged first chunk [latent, token], then single tokens; rows are reordered inside
    their group between steps and one row pauses (mask 0) for a step, leaving a hole."""
    llm = build_llm(build_config(family))
    decoder, rows_per_group = Decoder(llm), 3
    gen = torch.Generator().manual_seed(2)
    ids, mask = left_padded_prompts(PROMPT_LENGTHS, gen)
    r = len(PROMPT_LENGTHS) * rows_per_group
    embed = llm.get_input_embeddings()
    with torch.no_grad():
        prompt_embeds = embed(ids)
        prefix = decoder.prefix(ids, mask)
        embeds, smask = suffix_batch(llm, r, 2, gen)
        _, cache = decoder.suffix(embeds, smask, prefix, rows_per_group)
        history = [embeds[i][smask[i].bool()] for i in range(r)]
        for step in range(3):
            order = torch.tensor([g * rows_per_group + int(j) for g in range(len(PROMPT_LENGTHS))
                                  for j in torch.randint(0, rows_per_group, (rows_per_group,),
                                                         generator=gen)])
            cache = cache.reorder(order)
            history = [history[int(j)] for j in order]
            token = embed(torch.randint(0, VOCAB, (r, 1), generator=gen))
            step_mask = torch.ones(r, 1, dtype=torch.long)
            step_mask[step + 1, 0] = 0
            hidden, cache = decoder.suffix(token, step_mask, prefix, rows_per_group, cache)
            history = [torch.cat((h, token[i])) if step_mask[i, 0] else h
                       for i, h in enumerate(history)]
            expected = reference_logits(llm, prompt_embeds, mask, history, rows_per_group)
            logits = decoder.logits(hidden[:, 0])
            for i in range(r):
                if step_mask[i, 0]:
                    torch.testing.assert_close(logits[i], expected[i][-1], **TOL)
    assert cache.valid.shape == (r, 5)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_gradients_match_full_forward(family):
    """d(sum of suffix logits * w) w.r.t. the suffix embeddings, the prompt embeddings and
    every weight the pass uses (not an untied input embedding: inputs come as embeddings),
    with the prefix computed under grad (as in SFT)."""
    llm = build_llm(build_config(family))
    decoder, rows_per_group = Decoder(llm), 2
    gen = torch.Generator().manual_seed(3)
    ids, mask = left_padded_prompts(PROMPT_LENGTHS[:2], gen)
    r = 2 * rows_per_group
    embeds, smask = suffix_batch(llm, r, 3, gen)
    prompt_embeds = llm.get_input_embeddings()(ids).detach()
    weight = torch.randn(r, 3, VOCAB, generator=gen) * smask[..., None]
    names, params = zip(*((n, p) for n, p in llm.named_parameters()
                          if n != "model.embed_tokens.weight" or llm.config.tie_word_embeddings),
                        strict=True)

    ref_s, ref_p = embeds.clone().requires_grad_(), prompt_embeds.clone().requires_grad_()
    rows = [ref_s[i][smask[i].bool()] for i in range(r)]
    expected = reference_logits(llm, ref_p, mask, rows, rows_per_group)
    ref_loss = sum((e * weight[i][smask[i].bool()]).sum() for i, e in enumerate(expected))
    ref_grads = torch.autograd.grad(ref_loss, [ref_s, ref_p, *params])

    tri_s, tri_p = embeds.clone().requires_grad_(), prompt_embeds.clone().requires_grad_()
    prefix = decoder.prefix(attention_mask=mask, inputs_embeds=tri_p)
    hidden, _ = decoder.suffix(tri_s, smask, prefix, rows_per_group)
    tri_loss = (decoder.logits(hidden) * weight).sum()
    tri_grads = torch.autograd.grad(tri_loss, [tri_s, tri_p, *params])

    torch.testing.assert_close(tri_loss, ref_loss, **TOL)
    names = ("suffix_embeds", "prompt_embeds", *names)
    for name, ref_g, tri_g in zip(names, ref_grads, tri_grads, strict=True):
        if name == "prompt_embeds":  # padding slots get no gradient in the reference
            ref_g, tri_g = ref_g * mask[..., None], tri_g * mask[..., None]
        scale = float(ref_g.abs().max())  # errors relative to the gradient's magnitude
        torch.testing.assert_close(tri_g, ref_g, rtol=1e-5, atol=1e-5 * scale,
                                   msg=lambda m, n=name: f"{n}: {m}")


def test_sliding_window_overflow_raises():
    from transformers import MistralConfig, Qwen2Config

    gen = torch.Generator().manual_seed(4)
    ids, mask = left_padded_prompts((6, 3), gen)
    qwen = Qwen2Config(**small(use_sliding_window=True, sliding_window=8, max_window_layers=1))
    for config in (MistralConfig(**small(sliding_window=8)), qwen):
        llm = build_llm(config)
        decoder = Decoder(llm)
        assert decoder.window == 8
        prefix = decoder.prefix(ids, mask)
        embeds, smask = suffix_batch(llm, 2, 2, gen, lengths=torch.tensor([2, 2]))
        decoder.suffix(embeds, smask, prefix, 1)  # 6 + 2 = 8 tokens: fits
        embeds, smask = suffix_batch(llm, 2, 3, gen, lengths=torch.tensor([3, 3]))
        with pytest.raises(ValueError, match="sliding window of 8"):
            decoder.suffix(embeds, smask, prefix, 1)  # 6 + 3 = 9 tokens
        with pytest.raises(ValueError, match="got 9"):
            decoder.prefix(*left_padded_prompts((9, 2), gen))
    assert Decoder(build_llm(build_config("qwen2"))).window is None


def test_unsupported_model_raises():
    from transformers import GPT2Config, GPT2LMHeadModel

    llm = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=2))
    with pytest.raises(UnsupportedModelError, match="gpt2"):
        Decoder(llm)
    assert issubclass(UnsupportedModelError, ValueError)


@pytest.fixture(scope="module")
def llama_setup():
    llm = build_llm(build_config("llama"))
    decoder = Decoder(llm)
    gen = torch.Generator().manual_seed(5)
    ids, mask = left_padded_prompts((4, 2), gen)
    with torch.no_grad():
        prefix = decoder.prefix(ids, mask)
    return llm, decoder, prefix, gen


def test_bad_suffix_inputs_raise(llama_setup):
    llm, decoder, prefix, gen = llama_setup
    embeds, smask = suffix_batch(llm, 4, 2, gen)
    with pytest.raises(ValueError, match="rows_per_group=3"):
        decoder.suffix(embeds, smask, prefix, 3)
    with pytest.raises(ValueError, match="suffix_mask"):
        decoder.suffix(embeds, smask[:, :1], prefix, 2)
    with pytest.raises(ValueError, match="dtype"):
        decoder.suffix(embeds.double(), smask, prefix, 2)
    with torch.no_grad():
        _, cache = decoder.suffix(embeds, smask, prefix, 2)
    with pytest.raises(ValueError, match="cache of 2 rows"):
        decoder.suffix(embeds[:2], smask[:2], prefix, 1, cache)
    with pytest.raises(ValueError, match="exactly one"):
        decoder.prefix()


def test_reorder_keeps_rows_in_their_group(llama_setup):
    llm, decoder, prefix, gen = llama_setup
    embeds, smask = suffix_batch(llm, 4, 2, gen)
    with torch.no_grad():
        _, cache = decoder.suffix(embeds, smask, prefix, 2)
    moved = cache.reorder(torch.tensor([1, 1, 3, 2]))
    assert isinstance(moved, SuffixCache)
    assert torch.equal(moved.keys[0][0], cache.keys[0][1])
    assert torch.equal(moved.valid[3], cache.valid[2])
    with pytest.raises(ValueError, match="own group"):
        cache.reorder(torch.tensor([2, 1, 3, 2]))
    with pytest.raises(ValueError, match="row_index"):
        cache.reorder(torch.tensor([0, 1, 2]))
