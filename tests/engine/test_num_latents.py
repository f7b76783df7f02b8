"""N > 1 latent tokens (the paper's reasoning-length study, App. E): the engine's chain
against the prompt cache equals the straightforward full-forward chain, which equals a
row-by-row computation without padding; SFT, RL and beam search through them."""

from __future__ import annotations

import pytest
import torch

from fastlatent.engine.beam_search import engine_beam_search
from fastlatent.engine.decoder import Decoder
from fastlatent.engine.grpo import sample_noise
from fastlatent.engine.latents import chain_latents
from fastlatent.engine.steps import rl_step, sft_step
from fastlatent.evaluate import build_title_trie
from fastlatent.ops.positions import positions_from_mask
from fastlatent.rl import freeze_llm
from fastlatent.testing.beam_search import naive_beam_search
from fastlatent.testing.naive_steps import loss_of_one_pool, naive_rl_step, naive_sft_step
from fastlatent.testing.op_checks import assert_grads_close, grads_of


def with_latents(reasoner, n: int, latent: str = "ratt"):
    reasoner.config.num_latents = n
    reasoner.config.latent = latent
    return reasoner


def chain_row_alone(reasoner, prompt_ids, first, n):
    """Latents of one unpadded prompt, one full forward of the HF model per latent."""
    emb = reasoner.embed(prompt_ids)[None]
    latents = [first.reshape(1, -1).float()]
    for _ in range(1, n):
        seq = torch.cat((emb, torch.stack(latents, 1)), 1)
        hidden = reasoner.llm(inputs_embeds=seq, output_hidden_states=True).hidden_states[-1]
        mask = torch.ones(1, seq.shape[1], dtype=torch.long)
        latents.append(reasoner.thought(hidden, mask))
    return torch.cat(latents)


@pytest.mark.parametrize("latent", ["ratt", "last-hidden"])
def test_engine_chain_equals_the_full_forward_chain_and_rows_alone(tiny_reasoner, tiny_batch,
                                                                   latent):
    reasoner = with_latents(tiny_reasoner, 3, latent)
    ids, mask = tiny_batch.prompt_ids[:, :-1], tiny_batch.prompt_mask[:, :-1]
    decoder = Decoder(reasoner.llm)
    with torch.no_grad():
        prefix = decoder.prefix(ids, mask)
        first = reasoner.thought(prefix.hidden, mask)
        engine = chain_latents(reasoner, decoder, prefix, first, 1)
        full = reasoner.full_sequence_latents(reasoner.embed(ids), mask, first)
        assert engine.shape == (len(tiny_batch), 3, reasoner.llm.config.hidden_size)
        torch.testing.assert_close(engine, full, rtol=1e-4, atol=1e-4)
        for i in range(len(tiny_batch)):
            alone = chain_row_alone(reasoner, ids[i][mask[i].bool()], first[i], 3)
            torch.testing.assert_close(full[i], alone, rtol=1e-4, atol=1e-4)
    # the later latents really depend on the earlier ones (not a copy of latent 1)
    assert not torch.allclose(engine[:, 1], engine[:, 0], atol=1e-3)
    assert not torch.allclose(engine[:, 2], engine[:, 1], atol=1e-3)


def test_sft_step_with_three_latents_matches_the_naive_step(tiny_reasoner, tiny_batch):
    reasoner = with_latents(tiny_reasoner, 3).train()
    params = [p for p in reasoner.parameters() if p.requires_grad]
    ref = naive_sft_step(reasoner, tiny_batch)
    ref_grads = grads_of(ref.nll_sum, params)
    out = sft_step(reasoner, tiny_batch)
    torch.testing.assert_close(out.nll_sum, ref.nll_sum, rtol=1e-5, atol=1e-4)
    assert_grads_close(grads_of(out.nll_sum, params), ref_grads, rtol=1e-4, atol=1e-5)
    one = sft_step(with_latents(tiny_reasoner, 1), tiny_batch)
    assert abs(float(one.nll_sum.detach() - out.nll_sum.detach())) > 1e-3  # N matters


def test_rl_step_with_two_latents_matches_the_naive_step(tiny_reasoner, tiny_batch):
    reasoner = with_latents(tiny_reasoner, 2)
    params = freeze_llm(reasoner)
    noise = sample_noise(len(tiny_batch), 3, reasoner.llm.config.hidden_size,
                         generator=torch.Generator().manual_seed(5))
    ref = naive_rl_step(reasoner, tiny_batch, noise=noise, sigma=1.0)
    out = rl_step(reasoner, tiny_batch, noise=noise, sigma=1.0)
    loss, advantages = loss_of_one_pool(out)
    torch.testing.assert_close(out.token_logprobs, ref.token_logprobs, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(advantages, ref.advantages, rtol=0, atol=3e-4)
    got = torch.autograd.grad(loss, params)
    expected = torch.autograd.grad(ref.loss, params)
    for g, r in zip(got, expected, strict=True):
        scale = float(r.abs().max()) + 1e-12
        torch.testing.assert_close(g / scale, r / scale, rtol=0, atol=1e-3)


def test_beam_search_with_two_latents_matches_hf_generate(tiny_reasoner, tiny_batch,
                                                         synthetic_dataset):
    from fastlatent.data.prompt import PromptBuilder

    reasoner = with_latents(tiny_reasoner, 2)
    builder = PromptBuilder(reasoner.tokenizer, domain=synthetic_dataset.domain)
    trie = build_title_trie(builder, synthetic_dataset.catalogue)
    ids, mask = tiny_batch.prompt_ids, tiny_batch.prompt_mask
    kwargs = dict(num_beams=4, num_return=4, length_penalty=1.0, max_new_tokens=12)
    with torch.no_grad():
        embeds, full_mask = reasoner.prompt_inputs(ids, mask)
        assert embeds.shape[1] == ids.shape[1] + 1 and full_mask.shape == embeds.shape[:2]
        expected = naive_beam_search(reasoner.llm, embeds, full_mask, trie,
                                     eos_token_id=reasoner.tokenizer.eos_token_id,
                                     pad_token_id=reasoner.tokenizer.pad_token_id, **kwargs)
        got = engine_beam_search(reasoner, ids, mask, trie, **kwargs)
    assert any(row for row in expected)
    for got_row, expected_row in zip(got, expected, strict=True):
        assert [h.token_ids for h in got_row] == [h.token_ids for h in expected_row]
        assert [h.score for h in got_row] == pytest.approx([h.score for h in expected_row],
                                                           abs=1e-4)


def test_prompt_embeds_refuses_more_than_one_latent(tiny_reasoner, tiny_batch):
    reasoner = with_latents(tiny_reasoner, 2)
    with pytest.raises(ValueError, match="prompt_inputs"):
        reasoner.prompt_embeds(tiny_batch.prompt_ids, tiny_batch.prompt_mask)


def test_num_latents_survives_a_checkpoint(tiny_reasoner, tmp_path):
    from fastlatent.model.reasoner import LatentReasoner

    with_latents(tiny_reasoner, 4).save(tmp_path / "ckpt")
    assert LatentReasoner.load(tmp_path / "ckpt").config.num_latents == 4


def test_positions_of_the_chain_follow_the_prompt(tiny_batch):
    # the chain's appended latents take the positions right after each prompt's last token
    mask = torch.cat((tiny_batch.prompt_mask[:, :-1], torch.ones(len(tiny_batch), 2,
                                                                  dtype=torch.long)), 1)
    pos = positions_from_mask(mask)
    lengths = tiny_batch.prompt_mask[:, :-1].sum(1)
    torch.testing.assert_close(pos[:, -2:], torch.stack((lengths, lengths + 1), 1))
