"""The naive SFT and RL steps against independent per-row computations."""

from __future__ import annotations

import pytest
import torch

from fastlatent.data.batch import collate
from fastlatent.engine.grpo import latent_grpo_loss, negative_perplexity, sample_noise
from fastlatent.ops.positions import positions_from_mask
from fastlatent.rl import freeze_llm
from fastlatent.testing.naive_steps import (
    naive_rl_step,
    naive_sft_step,
    target_logprobs_from_logits,
)


def row_logprobs(reasoner, batch, i: int, r: torch.Tensor | None) -> torch.Tensor:
    """log p(target tokens) of row i computed alone, unpadded, from the model's own forward."""
    prompt = batch.prompt_ids[i][batch.prompt_mask[i].bool()]
    target = batch.target_ids[i][batch.target_mask[i].bool()]
    emb = reasoner.embed(torch.cat((prompt, target)))[None]
    if r is not None:  # the thought token's row is replaced by r
        emb = torch.cat((emb[:, :len(prompt) - 1], r.reshape(1, 1, -1).to(emb.dtype),
                         emb[:, len(prompt):]), dim=1)
    logits = reasoner.llm(inputs_embeds=emb).logits[0]
    return target_logprobs_from_logits(logits[len(prompt) - 1:-1], target)


def test_sft_loss_masks_padding_and_matches_rows_alone(tiny_reasoner, tiny_batch):
    with torch.no_grad():
        out = naive_sft_step(tiny_reasoner, tiny_batch)
    assert out.num_tokens == int(tiny_batch.target_mask.sum())
    expected = 0.0
    for i in range(len(tiny_batch)):
        single = tiny_batch.select(slice(i, i + 1))
        prompt_mask = single.prompt_mask
        keep = prompt_mask[0].bool()
        with torch.no_grad():
            r = tiny_reasoner.latent(single.prompt_ids[:, keep], prompt_mask[:, keep])
            expected -= float(row_logprobs(tiny_reasoner, tiny_batch, i, r[0]).sum())
    torch.testing.assert_close(float(out.nll_sum), expected, rtol=1e-5, atol=1e-4)


def test_sft_gradients_reach_llm_and_ratt_without_nan(tiny_reasoner, tiny_batch):
    tiny_reasoner.train()
    out = naive_sft_step(tiny_reasoner, tiny_batch)
    (out.nll_sum / out.num_tokens).backward()
    for name, p in tiny_reasoner.named_parameters():
        assert p.grad is not None, name
        assert bool(torch.isfinite(p.grad).all()), name
    assert float(tiny_reasoner.ratt.q_proj.weight.grad.abs().sum()) > 0


def test_sft_without_latent_has_no_thought_token(synthetic_dataset):
    from fastlatent.data.prompt import PromptBuilder
    from fastlatent.model.loading import load_llm
    from fastlatent.model.reasoner import LatentReasoner, ReasonerConfig

    llm, tok = load_llm("tiny-random", tokenizer_texts=synthetic_dataset.catalogue.titles)
    reasoner = LatentReasoner.build(llm, tok, ReasonerConfig(latent="none"))
    assert reasoner.ratt is None and reasoner.config.thought_token_id == -1
    builder = PromptBuilder(tok, use_thought=False)
    batch = collate([builder.encode(ex) for ex in synthetic_dataset.split("train")[:3]],
                    tok.pad_token_id)
    with torch.no_grad():
        out = naive_sft_step(reasoner, batch)
        expected = -sum(float(row_logprobs(reasoner, batch, i, None).sum()) for i in range(3))
    torch.testing.assert_close(float(out.nll_sum), expected, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="latent"):
        naive_rl_step(reasoner, batch, noise=torch.zeros(3, 2, llm.config.hidden_size), sigma=1.0)


@pytest.mark.parametrize("k", [1, 3])
def test_rl_step_matches_rows_alone(tiny_reasoner, tiny_batch, k):
    freeze_llm(tiny_reasoner)
    b, d = len(tiny_batch), tiny_reasoner.llm.config.hidden_size
    noise = sample_noise(b, k, d, generator=torch.Generator().manual_seed(3))
    out = naive_rl_step(tiny_reasoner, tiny_batch, noise=noise, sigma=1.5)
    r = tiny_reasoner.latent(tiny_batch.prompt_ids, tiny_batch.prompt_mask)
    t = tiny_batch.target_ids.shape[1]
    expected = torch.zeros(b, k, t)
    for i in range(b):
        for j in range(k):
            logp = row_logprobs(tiny_reasoner, tiny_batch, i, r[i] + 1.5 * noise[i, j])
            expected[i, j, :len(logp)] = logp
    torch.testing.assert_close(out.token_logprobs, expected, rtol=1e-5, atol=1e-5)
    exp_rewards = negative_perplexity(expected, tiny_batch.target_mask[:, None, :])
    torch.testing.assert_close(out.rewards, exp_rewards, rtol=1e-5, atol=1e-5)
    if k == 1:  # r^0 is r itself: the noise row 0 is zero
        assert bool((noise[:, 0] == 0).all())


def test_rl_gradient_reaches_only_latent_ratt_and_matches_reference(tiny_reasoner, tiny_batch):
    params = freeze_llm(tiny_reasoner)
    k, sigma = 4, 0.7
    noise = sample_noise(len(tiny_batch), k, tiny_reasoner.llm.config.hidden_size,
                         generator=torch.Generator().manual_seed(5))
    out = naive_rl_step(tiny_reasoner, tiny_batch, noise=noise, sigma=sigma)
    grads = torch.autograd.grad(out.loss, params, retain_graph=True)
    out.loss.backward()
    for name, p in tiny_reasoner.llm.named_parameters():
        assert not p.requires_grad and p.grad is None, name
    assert all(float(g.abs().sum()) > 0 for g in grads)
    # Reference: the same loss assembled from the SFT path's padded batched forward
    # (a differently shaped computation), with r + sigma*eps in the thought column.
    r = tiny_reasoner.latent(tiny_batch.prompt_ids, tiny_batch.prompt_mask)
    rows = []
    for j in range(k):
        embeds = tiny_reasoner.prompt_embeds(tiny_batch.prompt_ids, tiny_batch.prompt_mask,
                                             r=r + sigma * noise[:, j])
        full = torch.cat((embeds, tiny_reasoner.embed(tiny_batch.target_ids)), dim=1)
        mask = torch.cat((tiny_batch.prompt_mask, tiny_batch.target_mask), dim=1)
        logits = tiny_reasoner.llm(inputs_embeds=full, attention_mask=mask,
                                   position_ids=positions_from_mask(mask)).logits
        length, t = tiny_batch.prompt_ids.shape[1], tiny_batch.target_ids.shape[1]
        logp = target_logprobs_from_logits(logits[:, length - 1:length - 1 + t],
                                           tiny_batch.target_ids)
        rows.append(logp * tiny_batch.target_mask)
    ref_logp = torch.stack(rows, dim=1)
    ref_loss, ref_adv = latent_grpo_loss(
        ref_logp, tiny_batch.target_mask,
        negative_perplexity(ref_logp.detach(), tiny_batch.target_mask[:, None]))
    torch.testing.assert_close(out.loss, ref_loss, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out.advantages, ref_adv, rtol=1e-4, atol=1e-5)
    ref_grads = torch.autograd.grad(ref_loss, params)
    for g, ref in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, ref, rtol=1e-3, atol=1e-6)


def test_rl_step_rejects_bad_input(tiny_reasoner, tiny_batch):
    b, d = len(tiny_batch), tiny_reasoner.llm.config.hidden_size
    with pytest.raises(ValueError, match="K >= 1"):
        naive_rl_step(tiny_reasoner, tiny_batch, noise=torch.zeros(b, 0, d), sigma=1.0)
    with pytest.raises(ValueError, match="noise"):
        naive_rl_step(tiny_reasoner, tiny_batch, noise=torch.zeros(1, 2, 3), sigma=1.0)
    bad = tiny_batch.select(slice(0, 2))
    bad.prompt_ids = bad.prompt_ids[:, :-1]
    bad.prompt_mask = bad.prompt_mask[:, :-1]
    with pytest.raises(ValueError, match="thought token"):
        naive_rl_step(tiny_reasoner, bad, noise=torch.zeros(2, 2, d), sigma=1.0)
