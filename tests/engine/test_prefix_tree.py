"""The cache tree: the tokens every prompt of a batch starts with are encoded once, each
prompt's own tokens against them, each suffix row against both. Checked against the Hugging
Face forward on every full, unpadded row (values and gradients, every supported family)
and against the naive SFT / RL steps, beam search and ``ppl_reward``, for batches whose
common start is 0 tokens, 1 token, all but one token of the shortest prompt, and all of
it."""

from __future__ import annotations

import pytest
import torch

from fastlatent.data.batch import Batch
from fastlatent.engine.decoder import Decoder, common_prefix_length
from fastlatent.testing.decoder_models import (
    FAMILIES,
    VOCAB,
    build_config,
    build_llm,
    reference_logits,
    suffix_batch,
)
from fastlatent.testing.op_checks import FP32_TOL as TOL

LENGTHS = (7, 4, 6)  # the shortest prompt has 4 tokens
COMMON = {"none": 0, "one": 1, "all-but-one": 3, "all": 4}


def prompts_with_common_start(common: int, gen: torch.Generator, lengths=LENGTHS,
                              vocab: int = VOCAB, low: int = 0):
    """Left-padded ids [G, L] whose first ``common`` real tokens agree and whose next token
    differs between prompts 0 and 1 (so the common start is exactly ``common``)."""
    width = max(lengths)
    start = torch.randint(low, vocab, (common,), generator=gen)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for i, n in enumerate(lengths):
        own = torch.randint(low, vocab, (n - common,), generator=gen)
        if i == 1 and n > common:  # break the tie after the common start
            first = ids[0, width - lengths[0] + common]
            own[0] = low + (first - low + 1) % (vocab - low)
        ids[i, width - n:] = torch.cat((start, own))
        mask[i, width - n:] = 1
    return ids, mask


@pytest.mark.parametrize("case", list(COMMON))
def test_common_prefix_length(case):
    ids, mask = prompts_with_common_start(COMMON[case], torch.Generator().manual_seed(0))
    assert common_prefix_length(ids, mask) == COMMON[case]


def test_common_prefix_length_edge_cases():
    ids = torch.tensor([[0, 5, 6, 7], [5, 6, 7, 8]])
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    assert common_prefix_length(ids, mask) == 3  # all of the shorter prompt
    assert common_prefix_length(ids[:1], mask[:1]) == 0  # one prompt: nothing to share
    same = torch.tensor([[5, 6, 7], [5, 6, 7]])
    assert common_prefix_length(same, torch.ones_like(same)) == 2  # one column stays own
    assert common_prefix_length(ids, torch.tensor([[1, 1, 0, 1], [1, 1, 1, 1]])) == 0
    assert common_prefix_length(ids, torch.zeros_like(mask)) == 0


ROWS_PER_GROUP = 2


def family_case(family: str, case: str, seed: int):
    """A tiny model of the family, prompts with the case's common start, and 3-token
    ragged suffix rows (ROWS_PER_GROUP per prompt)."""
    llm = build_llm(build_config(family))
    gen = torch.Generator().manual_seed(seed)
    ids, mask = prompts_with_common_start(COMMON[case], gen)
    embeds, smask = suffix_batch(llm, len(LENGTHS) * ROWS_PER_GROUP, 3, gen)
    return llm, Decoder(llm), ids, mask, embeds, smask, gen


@pytest.mark.parametrize("case", list(COMMON))
@pytest.mark.parametrize("family", FAMILIES)
def test_tree_matches_full_forward(family, case):
    """Whole-prompt hidden states and suffix logits equal HF's forward per row."""
    llm, decoder, ids, mask, embeds, smask, _ = family_case(family, case, seed=1)
    r, rows_per_group = embeds.shape[0], ROWS_PER_GROUP
    with torch.no_grad():
        prefix = decoder.prefix(ids, mask)
        assert prefix.common_length == COMMON[case]
        assert torch.equal(prefix.lengths, torch.tensor(LENGTHS))
        hidden, _ = decoder.suffix(embeds, smask, prefix, rows_per_group)
        prompt_embeds = llm.get_input_embeddings()(ids)
        rows = [embeds[i][smask[i].bool()] for i in range(r)]
        expected = reference_logits(llm, prompt_embeds, mask, rows, rows_per_group)
        for g, n in enumerate(LENGTHS):
            full = llm(input_ids=ids[g, -n:][None], use_cache=False).logits[0]
            own = decoder.logits(prefix.hidden[g][prefix.hidden_mask[g].bool()])
            torch.testing.assert_close(own, full, **TOL)
            torch.testing.assert_close(decoder.logits(prefix.last_hidden[g]), full[-1], **TOL)
    for i in range(r):
        torch.testing.assert_close(decoder.logits(hidden[i][smask[i].bool()]), expected[i],
                                   **TOL)


@pytest.mark.parametrize("case", ["one", "all-but-one", "all"])
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_tree_gradients_match_full_forward(family, case):
    """SFT: gradients of every weight (the input embedding included: the prompts come as
    ids) and of the suffix embeddings; the common tokens' activations are used by every
    prompt and receive the sum of their gradients."""
    llm, decoder, ids, mask, embeds, smask, gen = family_case(family, case, seed=3)
    r, rows_per_group = embeds.shape[0], ROWS_PER_GROUP
    weight = torch.randn(r, 3, VOCAB, generator=gen) * smask[..., None]
    names, params = zip(*llm.named_parameters(), strict=True)

    ref_s = embeds.clone().requires_grad_()
    rows = [ref_s[i][smask[i].bool()] for i in range(r)]
    expected = reference_logits(llm, llm.get_input_embeddings()(ids), mask, rows,
                                rows_per_group)
    ref_loss = sum((e * weight[i][smask[i].bool()]).sum() for i, e in enumerate(expected))
    ref_grads = torch.autograd.grad(ref_loss, [ref_s, *params])

    tri_s = embeds.clone().requires_grad_()
    prefix = decoder.prefix(ids, mask)
    assert prefix.common_length == COMMON[case]
    hidden, _ = decoder.suffix(tri_s, smask, prefix, rows_per_group)
    tri_loss = (decoder.logits(hidden) * weight).sum()
    tri_grads = torch.autograd.grad(tri_loss, [tri_s, *params])

    torch.testing.assert_close(tri_loss, ref_loss, rtol=1e-5, atol=1e-4)
    for name, ref_g, tri_g in zip(("suffix_embeds", *names), ref_grads, tri_grads, strict=True):
        scale = float(ref_g.abs().max())
        torch.testing.assert_close(tri_g, ref_g, rtol=1e-5, atol=1e-5 * scale,
                                   msg=lambda m, n=name: f"{n}: {m}")


# ---- through the steps, beam search and ppl_reward on the tiny reasoner --------------------

def batch_with_common_start(reasoner, common: int, seed: int = 0) -> Batch:
    """Random prompts (ending in the thought token) with the given common start, targets
    of 2-4 tokens ending in EOS."""
    gen = torch.Generator().manual_seed(seed)
    tok = reasoner.tokenizer
    ids, mask = prompts_with_common_start(common, gen, vocab=reasoner.config.thought_token_id,
                                          low=3)
    thought = torch.full((len(LENGTHS), 1), reasoner.config.thought_token_id)
    ids = torch.cat((ids.masked_fill(mask == 0, tok.pad_token_id), thought), dim=1)
    mask = torch.cat((mask, torch.ones_like(thought)), dim=1)
    lengths = torch.tensor([2, 4, 3])
    targets = torch.randint(3, reasoner.config.thought_token_id, (len(LENGTHS), 4),
                            generator=gen)
    target_mask = (torch.arange(4)[None] < lengths[:, None]).long()
    targets[torch.arange(len(LENGTHS)), lengths - 1] = tok.eos_token_id
    targets = targets.masked_fill(target_mask == 0, tok.pad_token_id)
    return Batch(ids, mask, targets, target_mask)


@pytest.mark.parametrize("case", list(COMMON))
def test_sft_and_rl_steps_match_naive(tiny_reasoner, case):
    from fastlatent.engine.grpo import sample_noise
    from fastlatent.engine.steps import rl_step, sft_step
    from fastlatent.rl import freeze_llm
    from fastlatent.testing.naive_steps import loss_of_one_pool, naive_rl_step, naive_sft_step
    from fastlatent.testing.op_checks import assert_grads_close, grads_of

    batch = batch_with_common_start(tiny_reasoner, COMMON[case])
    decoder = Decoder(tiny_reasoner.llm)
    prefix = decoder.prefix(batch.prompt_ids[:, :-1], batch.prompt_mask[:, :-1])
    assert prefix.common_length == COMMON[case]

    tiny_reasoner.train()
    params = [p for p in tiny_reasoner.parameters() if p.requires_grad]
    ref = naive_sft_step(tiny_reasoner, batch)
    out = sft_step(tiny_reasoner, batch)
    torch.testing.assert_close(out.nll_sum, ref.nll_sum, rtol=1e-5, atol=1e-4)
    assert_grads_close(grads_of(out.nll_sum, params), grads_of(ref.nll_sum, params))

    tiny_reasoner.eval()
    params = freeze_llm(tiny_reasoner)
    noise = sample_noise(len(batch), 4, tiny_reasoner.llm.config.hidden_size,
                         generator=torch.Generator().manual_seed(11))
    ref = naive_rl_step(tiny_reasoner, batch, noise=noise, sigma=1.5)
    out = rl_step(tiny_reasoner, batch, noise=noise, sigma=1.5)
    loss, _ = loss_of_one_pool(out)
    torch.testing.assert_close(out.token_logprobs, ref.token_logprobs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.rewards, ref.rewards, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, ref.loss, rtol=0, atol=2e-4)  # see test_engine_steps
    assert_grads_close(grads_of(loss, params), grads_of(ref.loss, params), rtol=0,
                       atol=1e-3)


@pytest.mark.parametrize("case", ["none", "all-but-one", "all"])
def test_beam_search_matches_the_oracle(tiny_reasoner, case):
    """Same titles, order and scores as the HF-generate oracle."""
    from fastlatent.testing.beam_search import check_against_naive, random_trie

    batch = batch_with_common_start(tiny_reasoner, COMMON[case], seed=1)
    trie = random_trie(tiny_reasoner.tokenizer.eos_token_id, seed=3)
    expected = check_against_naive(tiny_reasoner, batch.prompt_ids, batch.prompt_mask, trie,
                                   num_beams=4, num_return=4)
    assert all(expected)  # every user got titles: the comparison is not vacuous


def test_ppl_reward_with_a_long_shared_system_prompt(tiny_reasoner):
    """A caller's chat template: 40 system-prompt tokens shared by every row, then each
    user's own tokens. The engine encodes them once (common length 40) and its rewards
    equal the generic full-sequence path's."""
    import fastlatent
    from fastlatent.reward import _generic_logprobs

    gen = torch.Generator().manual_seed(4)
    llm, d = tiny_reasoner.llm, tiny_reasoner.llm.config.hidden_size
    ids, mask = prompts_with_common_start(40, gen, lengths=(52, 45, 49, 41),
                                          vocab=tiny_reasoner.config.thought_token_id, low=3)
    targets = torch.randint(3, 200, (4, 3), generator=gen)
    target_mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]])
    latents = torch.randn(4, 5, 1, d, generator=gen)
    seen = []
    original = Decoder.prefix

    def recording(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        seen.append(out.common_length)
        return out

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Decoder, "prefix", recording)
        rewards, logp = fastlatent.ppl_reward(llm, ids, mask, latents, targets, target_mask,
                                              return_logprobs=True)
    assert seen == [40]
    with torch.no_grad():
        ref = _generic_logprobs(llm, ids, mask, latents.reshape(20, 1, d),
                                targets.repeat_interleave(5, 0),
                                target_mask.repeat_interleave(5, 0), 5)
    torch.testing.assert_close(logp, ref.view(4, 5, 3), rtol=1e-5, atol=1e-5)
    assert rewards.shape == (4, 5)
