"""Training changes the model, micro-batching does not change the gradient, and the defaults
that define the method are pinned. Each test here was written to fail on a one-line
mutation of the method's core (a removed optimiser step, a dropped micro-batch weight or
token normalisation, a changed default)."""

from __future__ import annotations

import dataclasses
import inspect
import json

import pytest
import torch

from fastlatent.config import PRESETS, RLConfig, SFTConfig, build_config
from fastlatent.data.batch import collate
from fastlatent.data.prompt import PromptBuilder
from fastlatent.engine import grpo
from fastlatent.engine.generic import step_for
from fastlatent.engine.grpo import grpo_advantages, sample_noise
from fastlatent.model.latent_ratt import LatentRATT
from fastlatent.model.reasoner import ReasonerConfig
from fastlatent.rl import accumulate_rl_gradients, freeze_llm, run_rl
from fastlatent.runlog import StepLog
from fastlatent.sft import accumulate_sft_gradients, run_sft, validation_loss
from fastlatent.testing.naive_steps import naive_rl_step, naive_sft_step


@pytest.fixture
def encoded(tiny_reasoner, synthetic_dataset):
    """Sixteen encoded training rows (ragged prompts and targets)."""
    builder = PromptBuilder(tiny_reasoner.tokenizer, domain=synthetic_dataset.domain)
    rows = synthetic_dataset.split("train")
    return [builder.encode(ex) for ex in rows[::max(1, len(rows) // 16)][:16]]


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def changed(before: dict[str, torch.Tensor], module: torch.nn.Module) -> set[str]:
    return {name for name, p in module.named_parameters() if not torch.equal(before[name], p)}


def grads(params) -> list[torch.Tensor]:
    out = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
           for p in params]
    for p in params:
        p.grad = None
    return out


def assert_same_gradients(got, ref, rtol=1e-4, atol=1e-5):
    """Per tensor, compared after scaling by the reference's largest entry."""
    assert len(got) == len(ref)
    nonzero = 0
    for g, r in zip(got, ref, strict=True):
        scale = float(r.abs().max()) + 1e-12
        torch.testing.assert_close(g / scale, r / scale, rtol=rtol, atol=atol)
        nonzero += int(float(r.abs().max()) > 0)
    assert nonzero > 0, "the reference gradient is zero everywhere: the test checks nothing"


# ---- training changes the model ------------------------------------------------------
def test_sft_updates_the_llm_and_latent_ratt_and_lowers_the_training_loss(
        tiny_reasoner, encoded, tmp_path):
    cfg = SFTConfig(sft_lr=3e-3, sft_batch_size=8, sft_micro_batch=4, sft_epochs=3,
                    sft_warmup_steps=1, patience=3)
    before_llm, before_ratt = snapshot(tiny_reasoner.llm), snapshot(tiny_reasoner.ratt)
    loss_before = validation_loss(tiny_reasoner, encoded, 8)
    log = StepLog(tmp_path / "log.jsonl")
    result = run_sft(tiny_reasoner, encoded, encoded[:4], cfg, grad_clip=1.0,
                     output_dir=tmp_path, log=log, seed=0)
    log.close()
    assert result.steps == 6
    moved = changed(before_llm, tiny_reasoner.llm)
    assert len(moved) == len(before_llm), f"LLM tensors SFT left unchanged: " \
        f"{sorted(set(before_llm) - moved)[:5]}"
    assert changed(before_ratt, tiny_reasoner.ratt) == set(before_ratt)
    assert validation_loss(tiny_reasoner, encoded, 8) < loss_before - 0.05


def test_rl_updates_latent_ratt_only(tiny_reasoner, encoded, tmp_path):
    cfg = RLConfig(rl_lr=1e-2, rl_batch_size=4, rl_max_steps=3, rl_warmup_steps=1,
                   num_samples=4, sigma=0.5)
    before_llm, before_ratt = snapshot(tiny_reasoner.llm), snapshot(tiny_reasoner.ratt)
    log = StepLog(tmp_path / "log.jsonl")
    result = run_rl(tiny_reasoner, encoded, cfg, grad_clip=1.0, output_dir=tmp_path, log=log,
                    seed=0)
    log.close()
    assert result.steps == 3
    assert changed(before_llm, tiny_reasoner.llm) == set()
    assert changed(before_ratt, tiny_reasoner.ratt) == set(before_ratt)


@pytest.mark.parametrize("fit,warmup", [("as-given", 50), ("fitted", 1)])
def test_rl_uses_a_long_warmup_as_given_or_fits_it(tiny_reasoner, encoded, tmp_path, fit,
                                                   warmup):
    cfg = RLConfig(rl_lr=1e-3, rl_batch_size=4, rl_max_steps=2, rl_warmup_steps=50,
                   num_samples=2, rl_warmup_fit=fit)
    log = StepLog(tmp_path / "log.jsonl")
    result = run_rl(tiny_reasoner, encoded, cfg, grad_clip=1.0, output_dir=tmp_path, log=log,
                    seed=0)
    log.close()
    assert result.warmup_steps == warmup
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in records if r["event"] == "step"]
    if fit == "as-given":  # still climbing at the end: 0/50 and 1/50 of the peak
        assert lrs == pytest.approx([0.0, 1e-3 / 50])
    else:  # the release's share of 2 steps rounds to 1 warm-up step: the peak at step 2
        assert lrs == pytest.approx([0.0, 1e-3])


# ---- micro-batches accumulate to exactly one full batch -------------------------------
@pytest.mark.parametrize("micro", [1, 3, 16], ids=["micro1", "micro3", "full"])
def test_sft_micro_batches_accumulate_to_the_full_batch_gradient(tiny_reasoner, encoded,
                                                                 micro):
    tiny_reasoner.train()
    params = [p for p in tiny_reasoner.parameters() if p.requires_grad]
    pad = tiny_reasoner.tokenizer.pad_token_id
    ref = naive_sft_step(tiny_reasoner, collate(encoded, pad))
    (ref.nll_sum / ref.num_tokens).backward()  # the token-weighted mean over the batch
    ref_grads = grads(params)
    loss, n_tokens = accumulate_sft_gradients(tiny_reasoner, encoded, micro,
                                              step_for(tiny_reasoner, "sft"))
    assert n_tokens == ref.num_tokens
    assert loss == pytest.approx(float(ref.nll_sum.detach()) / ref.num_tokens, rel=1e-5)
    assert_same_gradients(grads(params), ref_grads)


@pytest.mark.parametrize("pool", ["batch", "group"])
@pytest.mark.parametrize("micro", [1, 3], ids=["micro1", "micro3"])
def test_rl_micro_batches_accumulate_to_the_full_batch_gradient(tiny_reasoner, encoded,
                                                                micro, pool):
    """Micro-batched == one full engine pass (tight), and both == the naive oracle over
    the whole batch (at the engine-vs-naive tolerance of test_engine_steps)."""
    batch = encoded[:7]
    params = freeze_llm(tiny_reasoner)
    train_step = step_for(tiny_reasoner, "rl")

    def accumulate(micro_batch):
        cfg = RLConfig(rl_batch_size=len(batch), rl_micro_batch=micro_batch, num_samples=4,
                       sigma=0.7, advantage=pool)
        out = accumulate_rl_gradients(tiny_reasoner, batch, cfg, train_step,
                                      torch.Generator().manual_seed(3))
        return out, grads(params)

    full, full_grads = accumulate(0)
    out, out_grads = accumulate(micro)
    torch.testing.assert_close(out.rewards, full.rewards, rtol=1e-5, atol=1e-5)
    # Rewards are -PPL ~ -300 on this random model: fp32 sums over differently padded
    # batches differ by ~1e-5 relative, which centring and normalising make ~1e-4 absolute
    # on O(1) advantages. A dropped micro-batch weight is off by a factor of 2-7.
    torch.testing.assert_close(out.advantages, full.advantages, rtol=0, atol=1e-3)
    assert out.loss == pytest.approx(full.loss, rel=0, abs=1e-4)  # a cancelling sum
    # The same ~1e-4 advantage differences reach the gradients (2.4e-4 of the largest entry
    # seen); the dropped weight is off by 50-600%.
    assert_same_gradients(out_grads, full_grads, rtol=0, atol=5e-4)

    d = tiny_reasoner.llm.config.hidden_size
    noise = sample_noise(len(batch), 4, d, generator=torch.Generator().manual_seed(3))
    ref = naive_rl_step(tiny_reasoner, collate(batch, tiny_reasoner.tokenizer.pad_token_id),
                        noise=noise, sigma=0.7, pool=pool)
    ref.loss.backward()
    torch.testing.assert_close(out.advantages, ref.advantages, rtol=0, atol=3e-3)
    assert_same_gradients(out_grads, grads(params), rtol=0, atol=1e-3)


# ---- the defaults that define the method -----------------------------------------------
def default_of(fn, name):
    return inspect.signature(fn).parameters[name].default


def test_method_defaults_are_pinned():
    cfg = build_config("", {})
    # LatentRATT: one head, its own RoPE with base 1000 (the release)
    assert cfg.model.ratt_rope_base == 1000.0 and cfg.model.ratt_heads == 1
    assert ReasonerConfig().ratt_rope_base == 1000.0 and ReasonerConfig().ratt_heads == 1
    assert default_of(LatentRATT.__init__, "rope_base") == 1000.0
    assert LatentRATT(8).rope_base == 1000.0
    # latent GRPO: K = 8 rows incl. r^0, sigma = 1.5 absolute, batch advantage, eps 1e-6
    assert (cfg.rl.num_samples, cfg.rl.sigma, cfg.rl.advantage) == (8, 1.5, "batch")
    assert (grpo.BATCH_EPS, grpo.GROUP_EPS) == (1e-6, 1e-4)
    assert default_of(grpo.grpo_advantages, "pool") == "batch"
    # the release's optimiser settings the paper preset reproduces
    paper = build_config("paper", {})
    assert (paper.rl.num_samples, paper.rl.sigma, paper.rl.rl_batch_size) == (8, 1.5, 32)
    assert (paper.sft.sft_lr, paper.sft.sft_batch_size, paper.sft.sft_epochs) == (3e-4, 128, 3)
    assert paper.data.template == "latentr3" and paper.data.release_domain == "musics"
    assert cfg.train.grad_clip == 1.0 and paper.eval.num_beams == 10
    assert set(PRESETS["paper"]) <= {f.name for s in dataclasses.fields(cfg)
                                     for f in dataclasses.fields(getattr(cfg, s.name))}


def test_batch_advantage_uses_eps_1e6_by_default():
    # a pool whose spread is comparable to eps: the default eps changes the value
    s = torch.tensor([[0.0, 1e-6], [0.0, -1e-6]])
    norm = (2 * 1e-12) ** 0.5
    expected = torch.tensor([[0.0, 1e-6], [0.0, -1e-6]]) / (norm + 1e-6)
    torch.testing.assert_close(grpo_advantages(s), expected, rtol=1e-6, atol=0)


def test_group_advantage_uses_eps_1e4_by_default():
    s = torch.tensor([[0.0, 2e-4, 4e-4]])  # std 2e-4: eps 1e-4 is a third of the denominator
    expected = torch.tensor([[-2e-4, 0.0, 2e-4]]) / (2e-4 + 1e-4)
    torch.testing.assert_close(grpo_advantages(s, pool="group"), expected, rtol=1e-5, atol=0)
