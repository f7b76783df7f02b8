"""Public reward API against a per-sample full forward of the HF model (naive)."""

from __future__ import annotations

import pytest
import torch

import fastlatent
from fastlatent.model.loading import tiny_llama_config
from fastlatent.testing.naive_steps import target_logprobs_from_logits


@pytest.fixture(scope="module")
def llm():
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config(97)).eval()


def make_case(b=3, k=4, n=2, d=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths, t_lengths = [5, 9, 2][:b], [3, 1, 4][:b]
    prompts = [torch.randint(0, 97, (n_,), generator=g) for n_ in lengths]
    targets = [torch.randint(0, 97, (n_,), generator=g) for n_ in t_lengths]
    latents = torch.randn(b, k, n, d, generator=g)
    return prompts, targets, latents


def pad(rows, side):
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(width - len(r), width) if side == "left" else slice(0, len(r))
        ids[i, sl], mask[i, sl] = r, 1
    return ids, mask


def naive_rewards(llm, prompts, targets, latents):
    emb = llm.get_input_embeddings()
    out = torch.zeros(latents.shape[:2])
    logps = []
    for i, (p, t) in enumerate(zip(prompts, targets, strict=True)):
        row = []
        for j in range(latents.shape[1]):
            x = torch.cat((emb(p), latents[i, j], emb(t)))[None]
            logits = llm(inputs_embeds=x).logits[0]
            start = len(p) + latents.shape[2] - 1
            lp = target_logprobs_from_logits(logits[start:start + len(t)], t)
            out[i, j] = -torch.exp(-lp.mean())
            row.append(lp)
        logps.append(row)
    return out, logps


@pytest.mark.parametrize("side", ["left", "right"])
def test_rewards_and_logprobs_match_full_forward(llm, side):
    prompts, targets, latents = make_case()
    prompt_ids, prompt_mask = pad(prompts, side)
    target_ids, target_mask = pad(targets, "right")
    rewards, logp = fastlatent.ppl_reward(llm, prompt_ids, prompt_mask, latents, target_ids,
                                          target_mask, return_logprobs=True)
    assert rewards.dtype == torch.float32 and rewards.shape == (3, 4)
    with torch.no_grad():
        ref, ref_logps = naive_rewards(llm, prompts, targets, latents)
    torch.testing.assert_close(rewards, ref, rtol=1e-5, atol=1e-5)
    for i, row in enumerate(ref_logps):
        for j, lp in enumerate(row):
            torch.testing.assert_close(logp[i, j, :len(lp)], lp, rtol=1e-5, atol=1e-5)
            assert bool((logp[i, j, len(lp):] == 0).all())


def test_gradient_flows_to_latents(llm):
    prompts, targets, latents = make_case(b=2, k=2, n=1, seed=3)
    prompt_ids, prompt_mask = pad(prompts, "left")
    target_ids, target_mask = pad(targets, "right")
    tri = latents.clone().requires_grad_()
    ref = latents.clone().requires_grad_()
    upstream = torch.randn(2, 2)
    rewards = fastlatent.ppl_reward(llm, prompt_ids, prompt_mask, tri, target_ids, target_mask)
    (tri_grad,) = torch.autograd.grad(rewards, tri, upstream)
    ref_rewards, _ = naive_rewards(llm, prompts, targets, ref)
    (ref_grad,) = torch.autograd.grad(ref_rewards, ref, upstream)
    torch.testing.assert_close(tri_grad, ref_grad, rtol=1e-4, atol=1e-5)


def test_grpo_loss_is_exported():
    logp = torch.randn(2, 3, 4)
    loss, adv = fastlatent.latent_grpo_loss(logp, torch.ones(2, 4), torch.randn(2, 3))
    assert loss.shape == () and adv.shape == (2, 3)


def test_bad_inputs_are_clear_errors(llm):
    prompts, targets, latents = make_case()
    pid, pmask = pad(prompts, "left")
    tid, tmask = pad(targets, "right")
    with pytest.raises(ValueError, match="latents"):
        fastlatent.ppl_reward(llm, pid, pmask, latents[..., :5], tid, tmask)
    with pytest.raises(ValueError, match="right-padded"):
        fastlatent.ppl_reward(llm, pid, pmask, latents, *pad(targets, "left"))
    with pytest.raises(ValueError, match="integer"):
        fastlatent.ppl_reward(llm, pid.float(), pmask, latents, tid, tmask)
    with pytest.raises(ValueError, match="all-zero"):
        fastlatent.ppl_reward(llm, pid, pmask * 0, latents, tid, tmask)
    with pytest.raises(ValueError, match="target rows"):
        fastlatent.ppl_reward(llm, pid, pmask, latents, tid[:2], tmask[:2])
    vocab = llm.get_input_embeddings().weight.shape[0]
    for name, ids, mask in (("prompt", pid, pmask), ("target", tid, tmask)):
        bad = ids.clone()
        row, col = mask.nonzero()[1].tolist()  # a real position
        bad[row, col] = vocab
        args = (bad, pmask, latents, tid, tmask) if name == "prompt" else \
            (pid, pmask, latents, bad, tmask)
        with pytest.raises(ValueError, match=rf"{name}_ids hold an id outside the model's "
                                             rf"vocabulary of {vocab}: {vocab} at \[row, "
                                             rf"position\] = \[{row}, {col}\]"):
            fastlatent.ppl_reward(llm, *args)
    twos = tmask.clone()
    twos[0, 0] = 2
    with pytest.raises(ValueError, match=r"target_mask to hold only 0 and 1, got 2 at "
                                         r"\[row, position\] = \[0, 0\]"):
        fastlatent.ppl_reward(llm, pid, pmask, latents, tid, twos)
    with pytest.raises(ValueError, match="bool or integer prompt_mask"):
        fastlatent.ppl_reward(llm, pid, pmask.float(), latents, tid, tmask)
    bool_masks = fastlatent.ppl_reward(llm, pid, pmask.bool(), latents, tid, tmask.bool())
    torch.testing.assert_close(bool_masks, fastlatent.ppl_reward(llm, pid, pmask, latents,
                                                                 tid, tmask))


def test_other_families_go_through_their_own_forward(capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=1, n_head=2, vocab_size=97)).eval()
    prompts, targets, latents = make_case(seed=4)
    pid, pmask = pad(prompts, "right")
    tid, tmask = pad(targets, "right")
    rewards = fastlatent.ppl_reward(gpt2, pid, pmask, latents, tid, tmask)
    notice = capsys.readouterr().err
    assert "GPT2LMHeadModel (gpt2) is not a family the shared-prefix engine covers" in notice
    assert "the same rewards" in notice and "error" not in notice
    with torch.no_grad():
        ref, _ = naive_rewards(gpt2, prompts, targets, latents)
    torch.testing.assert_close(rewards, ref, rtol=1e-5, atol=1e-5)


def test_ignore_index_in_padded_targets_is_accepted(llm):
    """Hugging Face pads labels with -100; those positions are not scored."""
    prompts, targets, latents = make_case()
    pid, pmask = pad(prompts, "left")
    tid, tmask = pad(targets, "right")
    hf_labels = tid.masked_fill(tmask == 0, -100)
    assert bool((hf_labels == -100).any())
    expected = fastlatent.ppl_reward(llm, pid, pmask, latents, tid, tmask)
    got = fastlatent.ppl_reward(llm, pid, pmask, latents, hf_labels, tmask)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    real_minus_100 = tid.clone()
    real_minus_100[0, 0] = -100
    with pytest.raises(ValueError, match="-100"):
        fastlatent.ppl_reward(llm, pid, pmask, latents, real_minus_100, tmask)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_latents_are_a_clear_error_unless_unchecked(llm, bad):
    prompts, targets, latents = make_case()
    pid, pmask = pad(prompts, "left")
    tid, tmask = pad(targets, "right")
    latents[1, 2, 0, 7] = bad
    with pytest.raises(ValueError, match=r"NaN or Inf .*first at \[b, k, n\] = \[1, 2, 0\]"):
        fastlatent.ppl_reward(llm, pid, pmask, latents, tid, tmask)
    rewards = fastlatent.ppl_reward(llm, pid, pmask, latents, tid, tmask, check_finite=False)
    assert not bool(torch.isfinite(rewards[1, 2]))  # what the check exists to prevent
    assert bool(torch.isfinite(rewards[0]).all())


def test_other_families_are_scored_in_float32_from_a_bf16_model(capsys):
    """The spec's log-probs are float32: a bf16 model's body gives bf16 hidden states,
    and the head is applied to them in float32 (the model's own logits are bf16, ~1e-2
    off). One prompt, so that the batched rows hold no padding and the bf16 body sees
    exactly the oracle's rows."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=1, n_head=2, vocab_size=97))
    with torch.no_grad():  # logits of O(10), so that bf16 rounding shows
        gpt2.get_output_embeddings().weight.mul_(30)
    gpt2 = gpt2.to(torch.bfloat16).eval()
    prompts, targets, latents = make_case(b=1, seed=4)
    pid, pmask = pad(prompts, "right")
    tid, tmask = pad(targets, "right")
    _, logp = fastlatent.ppl_reward(gpt2, pid, pmask, latents, tid, tmask,
                                    return_logprobs=True)
    emb = gpt2.get_input_embeddings()
    head = gpt2.get_output_embeddings().weight.float()
    gap = 0.0
    with torch.no_grad():
        for i, (p, t) in enumerate(zip(prompts, targets, strict=True)):
            for j in range(latents.shape[1]):
                x = torch.cat((emb(p), latents[i, j].to(torch.bfloat16), emb(t)))[None]
                hidden = gpt2.transformer(inputs_embeds=x).last_hidden_state[0]
                start = len(p) + latents.shape[2] - 1
                rows = slice(start, start + len(t))
                want = torch.log_softmax(hidden[rows].float() @ head.T, -1)
                want = want.gather(1, t[:, None])[:, 0]
                own = target_logprobs_from_logits(
                    gpt2(inputs_embeds=x).logits[0, rows], t)  # the bf16 logits' way
                gap = max(gap, float((own - want).abs().max()))
                torch.testing.assert_close(logp[i, j, :len(t)], want, rtol=0, atol=2e-5)
    assert gap > 1e-3  # the bf16 logits' way is far outside the tolerance
