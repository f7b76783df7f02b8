"""The exact-match reward (the original GRPO of the paper's App. F) on the engine against
its naive oracle: the titles each latent row writes, the 0/1 rewards, the group
advantage, the loss over the written tokens and its gradients (LatentRATT; the LLM with
--rl-trainable all); and the trainer flags around it."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from fastlatent.data.prompt import PromptBuilder
from fastlatent.data.trie import TitleTrie
from fastlatent.engine.beam_search import TrieTensors
from fastlatent.engine.decoder import Decoder
from fastlatent.engine.exact_match import Answers, exact_match_rewards, exact_match_rl_step
from fastlatent.engine.grpo import sample_noise
from fastlatent.rl import freeze_llm
from fastlatent.testing.exact_match import naive_exact_match_rl_step
from fastlatent.testing.naive_steps import loss_of_one_pool
from fastlatent.testing.op_checks import assert_grads_close as assert_scaled_grads_close


def assert_grads_close(got, ref, atol):
    assert_scaled_grads_close(got, ref, rtol=0, atol=atol)


@pytest.fixture
def trie(tiny_reasoner, synthetic_dataset):
    """The catalogue's trie without the opening quote every target starts with: the tiny
    random model's next-token distribution is near uniform and, after a forced quote,
    hardly depends on the latent (every row of a prompt writes the same title, every
    advantage is 0, and a gradient test would compare zeros). Without it the first
    decision is read at the latent's own position, and noisy rows write different
    titles. Two fixed tokens after each title's first word make the trie force runs of
    three tokens before the next branch (fed to the model in one pass)."""
    builder = PromptBuilder(tiny_reasoner.tokenizer, domain=synthetic_dataset.domain)
    titles = (builder.encode_target(t)[1:] for t in synthetic_dataset.catalogue.distinct_titles)
    return TitleTrie.from_sequences(([s[0], 5, 6, *s[1:]] for s in titles),
                                    eos_token_id=tiny_reasoner.tokenizer.eos_token_id)


SIGMA = 2.0


def with_hits(reasoner, batch, trie, noise, k):
    """The batch with each prompt's target replaced by what its row 1 writes, so that
    row 1 earns 1 and the rows that write something else 0."""
    ref = naive_exact_match_rl_step(reasoner, batch, k=k, sigma=SIGMA, noise=noise, trie=trie)
    width = max(len(ref.answers[i][1]) for i in range(len(batch)))
    ids = torch.zeros(len(batch), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i in range(len(batch)):
        answer = torch.tensor(ref.answers[i][1])
        ids[i, :len(answer)], mask[i, :len(answer)] = answer, 1
    out = replace(batch, target_ids=ids, target_mask=mask)
    rewards = naive_exact_match_rl_step(reasoner, out, k=k, sigma=SIGMA, noise=noise,
                                        trie=trie).rewards
    if not bool((rewards != rewards[:, :1]).any()):
        raise RuntimeError("fixture expected a group whose rows write different titles")
    return out


@pytest.mark.parametrize("num_latents", [1, 2], ids=["N1", "N2"])
def test_engine_step_matches_the_generate_oracle(tiny_reasoner, tiny_batch, trie,
                                                 num_latents):
    tiny_reasoner.config = replace(tiny_reasoner.config, num_latents=num_latents)
    params = freeze_llm(tiny_reasoner)
    k, sigma = 4, SIGMA
    noise = sample_noise(len(tiny_batch), k, tiny_reasoner.llm.config.hidden_size,
                         generator=torch.Generator().manual_seed(3))
    batch = with_hits(tiny_reasoner, tiny_batch, trie, noise, k)
    ref = naive_exact_match_rl_step(tiny_reasoner, batch, k=k, sigma=sigma, noise=noise,
                                    trie=trie)
    vocab = tiny_reasoner.llm.get_output_embeddings().weight.shape[0]
    trie_t = TrieTensors.from_trie(trie, vocab, torch.device("cpu"))
    out = exact_match_rl_step(tiny_reasoner, batch, noise=noise, sigma=sigma, trie=trie_t)
    loss, advantages = loss_of_one_pool(out, "group")
    torch.testing.assert_close(out.rewards, ref.rewards)
    assert bool((advantages != 0).any())
    torch.testing.assert_close(advantages, ref.advantages, rtol=0, atol=1e-5)
    answers = _answers_of(tiny_reasoner, batch, noise, k, sigma, trie_t)
    written = [[tuple(t for t, m in zip(ids, keep, strict=True) if m)
                for ids, keep in zip(answers.token_ids[i * k:(i + 1) * k].tolist(),
                                     answers.mask[i * k:(i + 1) * k].tolist(), strict=True)]
               for i in range(len(batch))]
    assert written == ref.answers
    torch.testing.assert_close(loss, ref.loss, rtol=0, atol=1e-5)
    assert_grads_close(torch.autograd.grad(loss, params),
                       torch.autograd.grad(ref.loss, params), atol=1e-4)


def _answers_of(reasoner, batch, noise, k, sigma, trie_t) -> Answers:
    from fastlatent.engine.exact_match import greedy_titles
    from fastlatent.engine.latents import chain_latents

    decoder = Decoder(reasoner.llm)
    with torch.no_grad():
        prefix = decoder.prefix(batch.prompt_ids[:, :-1], batch.prompt_mask[:, :-1])
        first = reasoner.thought(prefix.hidden, prefix.hidden_mask, noise=noise, sigma=sigma)
        latents = chain_latents(reasoner, decoder, prefix, first.flatten(0, 1), k)
        return greedy_titles(decoder, prefix, latents, trie_t, k, trie_t.max_length)


def test_training_the_llm_too_matches_the_oracle(tiny_reasoner, tiny_batch, trie):
    k, sigma = 3, SIGMA
    noise = sample_noise(len(tiny_batch), k, tiny_reasoner.llm.config.hidden_size,
                         generator=torch.Generator().manual_seed(5))
    batch = with_hits(tiny_reasoner, tiny_batch, trie, noise, k)
    tiny_reasoner.requires_grad_(True)
    params = list(tiny_reasoner.parameters())
    ref = naive_exact_match_rl_step(tiny_reasoner, batch, k=k, sigma=sigma, noise=noise,
                                    trie=trie, train_llm=True)
    vocab = tiny_reasoner.llm.get_output_embeddings().weight.shape[0]
    out = exact_match_rl_step(tiny_reasoner, batch, noise=noise, sigma=sigma,
                              trie=TrieTensors.from_trie(trie, vocab, torch.device("cpu")),
                              train_llm=True)
    loss, _ = loss_of_one_pool(out, "group")
    torch.testing.assert_close(loss, ref.loss, rtol=0, atol=1e-5)
    got = torch.autograd.grad(loss, params, allow_unused=True)
    want = torch.autograd.grad(ref.loss, params, allow_unused=True)
    llm_grads = [g for g, p in zip(got, params, strict=True)
                 if g is not None and any(p is q for q in tiny_reasoner.llm.parameters())]
    assert llm_grads and any(float(g.abs().max()) > 0 for g in llm_grads)
    assert_grads_close([g if g is not None else torch.zeros(()) for g in got],
                       [w if w is not None else torch.zeros(()) for w in want], atol=1e-4)


def test_equal_rewards_give_zero_advantages_not_nan(tiny_reasoner, tiny_batch, trie):
    freeze_llm(tiny_reasoner)
    vocab = tiny_reasoner.llm.get_output_embeddings().weight.shape[0]
    noise = torch.zeros(len(tiny_batch), 3, tiny_reasoner.llm.config.hidden_size)
    out = exact_match_rl_step(tiny_reasoner, tiny_batch, noise=noise, sigma=1.0,
                              trie=TrieTensors.from_trie(trie, vocab, torch.device("cpu")))
    loss, advantages = loss_of_one_pool(out, "group")
    # no noise: the K rows write the same title, so every group's rewards are equal
    assert bool((out.rewards == out.rewards[:, :1]).all())
    assert torch.equal(advantages, torch.zeros_like(advantages))
    assert torch.isfinite(loss) and float(loss) == 0.0
    with torch.no_grad():
        r0 = tiny_reasoner.latent(tiny_batch.prompt_ids, tiny_batch.prompt_mask).float()
    torch.testing.assert_close(out.latent_norm, r0.norm(dim=-1), rtol=1e-5, atol=1e-5)


def test_rewards_compare_the_whole_written_path():
    eos = 9
    answers = Answers(torch.tensor([[1, 2, eos, eos], [1, 2, 3, eos], [1, eos, eos, eos]]),
                      torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]]))
    target = torch.tensor([[1, 2, eos], [1, 2, eos], [1, 2, eos]])
    mask = torch.ones_like(target)
    # row 1 wrote a longer title sharing the target's start; row 2 a shorter one
    assert exact_match_rewards(answers, target, mask).tolist() == [1.0, 0.0, 0.0]


def test_k_below_two_is_refused(tiny_reasoner, tiny_batch, trie):
    vocab = tiny_reasoner.llm.get_output_embeddings().weight.shape[0]
    with pytest.raises(ValueError, match="k >= 2"):
        exact_match_rl_step(tiny_reasoner, tiny_batch, sigma=1.0,
                            noise=torch.zeros(len(tiny_batch), 1,
                                              tiny_reasoner.llm.config.hidden_size),
                            trie=TrieTensors.from_trie(trie, vocab, torch.device("cpu")))


@pytest.mark.parametrize("flags,name", [
    (["--reward", "exact-match", "--num-samples", "1"], "--num-samples"),
    (["--reward", "exact-match", "--latent", "none"], "--latent"),
    (["--rl-trainable", "all", "--base-quant", "int8"], "--rl-trainable"),
    (["--rl-llm-lr", "0"], "--rl-llm-lr"),
], ids=["K1", "no-latent", "all-with-quant", "llm-lr-0"])
def test_bad_flags_are_one_line_before_loading(tmp_path, capsys, flags, name):
    from fastlatent.train import main

    assert main(["--preset", "smoke", "--output-dir", str(tmp_path / "run"), *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and name in err[0]
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_exact_match_run_logs_equal_groups_and_checkpoints_the_whole_model(tmp_path):
    """The smoke preset with the original GRPO on the whole model: every RL step logs its
    wall time and the share of groups whose K rewards were all equal (no signal), and the
    RL checkpoints hold the whole model."""
    from fastlatent.train import main

    out = tmp_path / "run"
    assert main(["--preset", "smoke", "--reward", "exact-match", "--advantage", "group",
                 "--rl-trainable", "all", "--rl-max-steps", "2", "--save-every", "1",
                 "--report-to", "none", "--output-dir", str(out)]) == 0
    steps = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    rl = [s for s in steps if s["stage"] == "rl" and s["event"] == "step"]
    assert len(rl) == 2 and all(0.0 <= s["equal_reward_groups"] <= 1.0 and s["seconds"] > 0
                                for s in rl)
    assert all(0.0 <= s["reward_all"] <= 1.0 for s in rl)
    checkpoints = sorted((out / "checkpoints").glob("rl-*"))
    assert checkpoints and all((c / "model" / "fastlatent.json").is_file() for c in checkpoints)


def _llm_and_ratt_bytes(run):
    files = (run / "rl").rglob("*.safetensors")  # llm/model.safetensors, latent_ratt
    return sorted((str(p.relative_to(run)), p.read_bytes()) for p in files)


@pytest.mark.slow
def test_rl_trainable_all_moves_the_llm_and_resumes_bitwise(tmp_path):
    """--rl-trainable all (PPL reward: it always has signal): the LLM after RL differs
    from the SFT model, and a run killed after RL step 3 (its checkpoint is step 2's)
    resumes to the uninterrupted run's bytes."""
    import os
    import subprocess
    import sys

    from fastlatent.model.reasoner import LatentReasoner
    from fastlatent.testing.cli_faults import cli_with_fault, signal_self

    flags = ["--preset", "smoke", "--sft-limit", "96", "--sft-batch-size", "32",
             "--rl-trainable", "all", "--rl-llm-lr", "1e-3", "--rl-max-steps", "3",
             "--eval-limit", "4", "--save-every", "2", "--report-to", "none"]
    env = {**os.environ, "PYTHONHASHSEED": "0"}

    def train(out, *prefix):
        cmd = [sys.executable, *(prefix or ["-m", "fastlatent.train"]), *flags,
               "--output-dir", str(out)]
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)

    full = tmp_path / "full"
    done = train(full)
    assert done.returncode == 0, done.stderr[-3000:]
    sft, rl = LatentReasoner.load(full / "sft"), LatentReasoner.load(full / "rl")
    assert any(not torch.equal(a, b) for a, b in zip(sft.llm.state_dict().values(),
                                                     rl.llm.state_dict().values(), strict=True))
    killed = tmp_path / "killed"
    code = cli_with_fault("rl", "clipped_update", 3, signal_self("SIGKILL"))
    assert train(killed, "-c", code).returncode != 0
    done = subprocess.run([sys.executable, "-m", "fastlatent.train", "--resume",
                           "--output-dir", str(killed)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(_llm_and_ratt_bytes(full)) == 2
    assert _llm_and_ratt_bytes(killed) == _llm_and_ratt_bytes(full)


def test_forced_runs_beside_a_row_at_the_last_numbered_title():
    # The last node numbered is a title's end, whose CSR slice starts past the last edge:
    # a row that wrote that EOS sits beside a row still on its forced run.
    from fastlatent.engine.exact_match import _forced_runs

    eos = 2
    trie = TitleTrie.from_sequences([(5, 6, 7, eos), (9, eos)], eos_token_id=eos)
    trie_t = TrieTensors.from_trie(trie, 16, torch.device("cpu"))
    leaf = trie.node_of((9, eos))
    assert leaf == trie.num_nodes - 1
    runs, nodes = _forced_runs(trie_t, torch.tensor([eos, 5]),
                               torch.tensor([leaf, trie.node_of((5,))]), 4)
    assert runs.tolist() == [[eos, -1, -1, -1], [5, 6, 7, eos]]
    assert nodes.tolist() == [-1, -1]
