"""benchmarks/reasoning_latency.py: the report has every variant, and what it times is
right — the KV-cached chain of thought is the HF model's own greedy generation, the beam
search after it equals one over prompt + CoT encoded from scratch, and the latent and
no-latent variants return what ``engine_beam_search`` returns on the same users."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from fastlatent.data.batch import collate
from fastlatent.data.prompt import PromptBuilder
from fastlatent.engine.beam_search import engine_beam_search
from fastlatent.engine.decoder import Decoder
from fastlatent.evaluate import build_title_trie

ROOT = Path(__file__).resolve().parents[2]
USERS = 5


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location(
        "reasoning_latency", ROOT / "benchmarks" / "reasoning_latency.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def reasoners(script, synthetic_dataset):
    """none / latent1 / latent2 over one tiny Llama whose weights are large enough that
    next-token distributions are far from uniform (greedy and beam choices are not
    decided by float noise)."""
    from fastlatent.model.loading import load_llm

    llm, tok = load_llm("tiny-random", tokenizer_texts=synthetic_dataset.catalogue.titles,
                        seed=0)
    built = script.build_reasoners(llm, tok, 2)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in built["latent1"].parameters():  # the LLM's and LatentRATT's
            if p.dim() == 2:
                p.copy_(0.15 * torch.randn(p.shape, generator=gen))
    return built


@pytest.fixture(scope="module")
def users(synthetic_dataset):
    rows = synthetic_dataset.split("test")
    picked = sorted(rows, key=lambda ex: len(ex.history))
    chosen = [picked[i * (len(picked) - 1) // (USERS - 1)] for i in range(USERS)]
    if len({len(ex.history) for ex in chosen}) < 2:
        raise RuntimeError("expected users with ragged histories")
    return chosen


def builders(reasoners, dataset):
    tok = reasoners["none"].tokenizer
    return (PromptBuilder(tok, domain=dataset.domain, use_thought=False),
            PromptBuilder(tok, domain=dataset.domain))


def test_json_report_has_every_variant_and_the_token_counts(script, capsys):
    argv = ["--model", "tiny-random", "--data", "synthetic", "--users", "3", "--batch", "2",
            "--repeats", "1", "--cot-tokens", "4,8", "--num-latents", "2", "--json"]
    with torch.random.fork_rng():  # main seeds torch's generator
        assert script.main(argv) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["users"] == 3 and report["batch"] == 2 and report["model"] == "tiny-random"
    variants = report["variants"]
    assert {name: v["extra_tokens"] for name, v in variants.items()} == {
        "none": 0, "latent1": 1, "latent2": 2, "cot4": 4, "cot8": 8}
    for v in variants.values():
        assert len(v["times_s_per_user"]) == 1
        assert 0 < v["min_s_per_user"] <= v["median_s_per_user"] <= v["max_s_per_user"]
        assert v["p25_s_per_user"] <= v["p75_s_per_user"]
    assert variants["none"]["ratio_to_none"] == 1.0
    none, cot8 = variants["none"]["median_s_per_user"], variants["cot8"]["median_s_per_user"]
    assert report["per_token_from"] == "cot8"
    assert report["per_token_s"] == pytest.approx((cot8 - none) / 8, rel=1e-3, abs=1e-6)
    assert set(report["per_token_s_by_cot"]) == {"cot4", "cot8"}
    assert "latent1_in_tokens" in report and "latent2_in_tokens" in report
    if report["per_token_s"] > 0:
        latent1 = variants["latent1"]["median_s_per_user"]
        assert report["latent1_in_tokens"] == pytest.approx(
            (latent1 - none) / report["per_token_s"], rel=1e-2, abs=1e-3)


def test_cached_cot_is_the_hf_models_greedy_generation(script, reasoners, users,
                                                       synthetic_dataset):
    none = reasoners["none"]
    plain, _ = builders(reasoners, synthetic_dataset)
    batch = collate([plain.encode(ex) for ex in users], none.tokenizer.pad_token_id)
    with torch.no_grad():
        cot, prefix = script.generate_cot(none, Decoder(none.llm), batch.prompt_ids,
                                          batch.prompt_mask, 6)
        for i, ex in enumerate(users):  # one unpadded row at a time, full forwards, no cache
            seq = torch.tensor(plain.encode(ex).prompt_ids)[None]
            for _ in range(6):
                token = none.llm(input_ids=seq, use_cache=False).logits[:, -1].argmax(-1)
                seq = torch.cat((seq, token[:, None]), dim=1)
            assert cot[i].tolist() == seq[0, -6:].tolist(), f"user {i}"
        ids = torch.cat((batch.prompt_ids, cot), dim=1)
        mask = torch.cat((batch.prompt_mask, torch.ones_like(cot)), dim=1)
        fresh = Decoder(none.llm).prefix(ids, mask)
    torch.testing.assert_close(prefix.last_hidden, fresh.last_hidden, rtol=1e-4, atol=1e-4)
    assert torch.equal(prefix.lengths, fresh.lengths)


def test_search_after_the_cot_equals_one_over_prompt_and_cot_encoded_again(
        script, reasoners, users, synthetic_dataset):
    none = reasoners["none"]
    plain, _ = builders(reasoners, synthetic_dataset)
    trie = build_title_trie(plain, synthetic_dataset.catalogue)
    batches = script.user_batches(plain, users, 2, none.tokenizer.pad_token_id, "cpu")
    runs = script.variant_runs(reasoners, batches, [], trie, [5])
    extra, run = runs["cot5"]
    assert extra == 5
    got = run()
    want = []
    with torch.no_grad():
        for ids, mask in batches:
            cot, _ = script.generate_cot(none, Decoder(none.llm), ids, mask, 5)
            want += engine_beam_search(none, torch.cat((ids, cot), 1),
                                       torch.cat((mask, torch.ones_like(cot)), 1), trie,
                                       num_beams=10, num_return=10)
    assert_same_hypotheses(got, want)


@pytest.mark.parametrize("name", ["none", "latent1", "latent2"])
def test_variants_return_what_engine_beam_search_returns(script, reasoners, users,
                                                         synthetic_dataset, name):
    plain, thought = builders(reasoners, synthetic_dataset)
    pad = reasoners["none"].tokenizer.pad_token_id
    trie = build_title_trie(plain, synthetic_dataset.catalogue)
    runs = script.variant_runs(reasoners, script.user_batches(plain, users, 2, pad, "cpu"),
                               script.user_batches(thought, users, 2, pad, "cpu"), trie, [])
    assert set(runs) == {"none", "latent1", "latent2"}
    extra, run = runs[name]
    reasoner = reasoners[name]
    assert extra == (0 if name == "none" else reasoner.config.num_latents)
    # every user in one batch, encoded here: the script's batching and prompts change nothing
    builder = thought if reasoner.uses_latent else plain
    batch = collate([builder.encode(ex) for ex in users], pad)
    want = engine_beam_search(reasoner, batch.prompt_ids, batch.prompt_mask, trie,
                              num_beams=10, num_return=10, length_penalty=1.0)
    assert_same_hypotheses(run(), want)


def test_caller_prefix_must_hold_the_prompts(reasoners, users, synthetic_dataset):
    none = reasoners["none"]
    plain, _ = builders(reasoners, synthetic_dataset)
    batch = collate([plain.encode(ex) for ex in users], none.tokenizer.pad_token_id)
    trie = build_title_trie(plain, synthetic_dataset.catalogue)
    decoder = Decoder(none.llm)
    with torch.no_grad():
        short = decoder.prefix(batch.prompt_ids[:, 1:], batch.prompt_mask[:, 1:])
        with pytest.raises(ValueError, match="prefix cache of the"):
            engine_beam_search(none, batch.prompt_ids, batch.prompt_mask, trie, prefix=short)
        prefix = decoder.prefix(batch.prompt_ids, batch.prompt_mask)
        inputs = none.embed(batch.prompt_ids[:, -2:]).repeat_interleave(2, dim=0)
        hidden, cache = decoder.suffix(inputs, torch.ones_like(inputs[..., 0]), prefix, 2)
        with pytest.raises(ValueError, match="one all-real row per prompt"):
            prefix.extend(hidden, cache)


def assert_same_hypotheses(got, want):
    assert len(got) == len(want) == USERS
    for g, w in zip(got, want, strict=True):
        assert [h.token_ids for h in g] == [h.token_ids for h in w]
        assert [h.score for h in g] == pytest.approx([h.score for h in w], rel=1e-4)
    assert any(len(g) == 10 for g in got)
