"""Engine SFT / RL steps against the naive oracles: loss, rewards, advantages, gradients."""

from __future__ import annotations

import pytest
import torch

from fastlatent.data.batch import collate
from fastlatent.engine.generic import generic_rl_step
from fastlatent.engine.grpo import sample_noise
from fastlatent.engine.steps import rl_step, sft_step
from fastlatent.rl import freeze_llm
from fastlatent.testing.naive_steps import loss_of_one_pool, naive_rl_step, naive_sft_step
from fastlatent.testing.op_checks import assert_grads_close, grads_of


def test_sft_step_matches_two_pass_reference(tiny_reasoner, tiny_batch):
    tiny_reasoner.train()
    params = [p for p in tiny_reasoner.parameters() if p.requires_grad]
    ref = naive_sft_step(tiny_reasoner, tiny_batch)
    ref_grads = grads_of(ref.nll_sum, params)
    out = sft_step(tiny_reasoner, tiny_batch)
    assert out.num_tokens == ref.num_tokens
    torch.testing.assert_close(out.nll_sum, ref.nll_sum, rtol=1e-5, atol=1e-4)
    assert_grads_close(grads_of(out.nll_sum, params), ref_grads)


def test_sft_step_without_latent_matches_reference(synthetic_dataset):
    from fastlatent.data.prompt import PromptBuilder
    from fastlatent.model.loading import load_llm
    from fastlatent.model.reasoner import LatentReasoner, ReasonerConfig

    llm, tok = load_llm("tiny-random", tokenizer_texts=synthetic_dataset.catalogue.titles)
    reasoner = LatentReasoner.build(llm, tok, ReasonerConfig(latent="none"))
    builder = PromptBuilder(tok, use_thought=False)
    batch = collate([builder.encode(ex) for ex in synthetic_dataset.split("train")[5:10]],
                    tok.pad_token_id)
    params = list(reasoner.parameters())
    ref = naive_sft_step(reasoner, batch)
    out = sft_step(reasoner, batch)
    torch.testing.assert_close(out.nll_sum, ref.nll_sum, rtol=1e-5, atol=1e-4)
    assert_grads_close(grads_of(out.nll_sum, params), grads_of(ref.nll_sum, params))


@pytest.mark.parametrize("k,pool", [(1, "batch"), (4, "batch"), (3, "group")],
                         ids=["K1-batch", "K4-batch", "K3-group"])
def test_rl_step_matches_naive(tiny_reasoner, tiny_batch, k, pool):
    params = freeze_llm(tiny_reasoner)
    noise = sample_noise(len(tiny_batch), k, tiny_reasoner.llm.config.hidden_size,
                         generator=torch.Generator().manual_seed(11))
    ref = naive_rl_step(tiny_reasoner, tiny_batch, noise=noise, sigma=1.5, pool=pool)
    out = rl_step(tiny_reasoner, tiny_batch, noise=noise, sigma=1.5)
    loss, advantages = loss_of_one_pool(out, pool)
    torch.testing.assert_close(out.token_logprobs, ref.token_logprobs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.rewards, ref.rewards, rtol=1e-5, atol=1e-5)
    # The tiny random model's perplexities are ~300, so fp32 rewards carry ~3e-3 absolute
    # error; centring and L2-normalising turns that into ~1e-4 on the unit-norm advantages.
    torch.testing.assert_close(advantages, ref.advantages, rtol=0, atol=3e-4)
    # The loss is a cancelling sum of advantage x log-prob (|loss| ~ 1e-2 here): the
    # advantages' ~1e-4 differences times |log p| ~ 6 reach it undamped (3.7e-5 seen for
    # the group pool, whose std divisor amplifies reward error).
    torch.testing.assert_close(loss, ref.loss, rtol=0, atol=2e-4)
    assert_grads_close(grads_of(loss, params), grads_of(ref.loss, params), rtol=0,
                       atol=1e-3)


@pytest.mark.parametrize("step", [rl_step, generic_rl_step], ids=["engine", "generic"])
def test_rl_steps_report_the_norm_of_the_noiseless_latent(tiny_reasoner, tiny_batch, step):
    freeze_llm(tiny_reasoner)
    noise = sample_noise(len(tiny_batch), 4, tiny_reasoner.llm.config.hidden_size,
                         generator=torch.Generator().manual_seed(3))
    out = step(tiny_reasoner, tiny_batch, noise=noise, sigma=5.0)
    with torch.no_grad():
        r0 = tiny_reasoner.latent(tiny_batch.prompt_ids, tiny_batch.prompt_mask).float()
    assert out.latent_norm.shape == (len(tiny_batch),) and not out.latent_norm.requires_grad
    torch.testing.assert_close(out.latent_norm, r0.norm(dim=-1), rtol=1e-5, atol=1e-5)


def test_rl_step_sampled_noise_is_seeded_and_r0_is_noise_free(tiny_reasoner, tiny_batch):
    freeze_llm(tiny_reasoner)
    d = tiny_reasoner.llm.config.hidden_size

    def noise(seed):
        return sample_noise(len(tiny_batch), 3, d, generator=torch.Generator().manual_seed(seed))

    a = rl_step(tiny_reasoner, tiny_batch, noise=noise(1), sigma=1.0)
    b = rl_step(tiny_reasoner, tiny_batch, noise=noise(1), sigma=1.0)
    c = rl_step(tiny_reasoner, tiny_batch, noise=noise(2), sigma=0.0)
    torch.testing.assert_close(a.rewards, b.rewards)
    torch.testing.assert_close(a.rewards[:, 0], c.rewards[:, 0])  # r^0 = r whatever sigma
    assert not torch.allclose(a.rewards[:, 1], c.rewards[:, 1])


def test_unsupported_family_falls_back_to_the_straightforward_steps(capsys):
    from types import SimpleNamespace

    from transformers import GPT2Config, GPT2LMHeadModel

    from fastlatent.engine.generic import step_for

    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50))
    assert step_for(SimpleNamespace(llm=gpt2), "sft") is naive_sft_step
    assert step_for(SimpleNamespace(llm=gpt2), "rl") is generic_rl_step
    assert "straightforward" in capsys.readouterr().err
    with pytest.raises(ValueError, match="stage"):
        step_for(SimpleNamespace(llm=gpt2), "eval")
