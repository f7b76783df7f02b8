"""--sft-lora-r: PEFT adapters on the projections for SFT, merged into plain weights."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch

from fastlatent.engine.steps import sft_step
from fastlatent.model.lora import LoraSettings, add_lora, lora_layers, merge_lora
from fastlatent.model.reasoner import LatentReasoner
from fastlatent.testing.cli_faults import cli_with_fault, signal_self
from fastlatent.testing.naive_steps import naive_sft_step
from fastlatent.train import main

pytest.importorskip("peft")


def logits(reasoner, batch):
    with torch.no_grad():
        embeds, mask = reasoner.prompt_inputs(batch.prompt_ids, batch.prompt_mask)
        return reasoner.llm(inputs_embeds=embeds, attention_mask=mask).logits


def trained_lora(reasoner, batch, steps=3):
    """``reasoner`` with adapters moved away from zero by a few SGD steps."""
    add_lora(reasoner.llm, LoraSettings(r=4, alpha=8.0, dropout=0.0))
    params = [p for p in reasoner.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.5)
    for _ in range(steps):
        out = sft_step(reasoner, batch)
        (out.nll_sum / out.num_tokens).backward()
        opt.step()
        opt.zero_grad()
    return reasoner


def test_adapters_start_as_the_identity_and_only_they_and_latentratt_train(tiny_reasoner,
                                                                         tiny_batch):
    before = logits(tiny_reasoner, tiny_batch)
    layers = len(tiny_reasoner.llm.get_decoder().layers)
    assert add_lora(tiny_reasoner.llm, LoraSettings(4, 8.0, 0.0)) == 7 * layers
    torch.testing.assert_close(logits(tiny_reasoner, tiny_batch), before, rtol=0, atol=0)
    trainable = {n for n, p in tiny_reasoner.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n or n.startswith("ratt.") for n in trainable)
    assert any(n.startswith("ratt.") for n in trainable)


def test_engine_sft_step_matches_the_full_sequence_step_with_adapters(tiny_reasoner,
                                                                      tiny_batch):
    reasoner = trained_lora(tiny_reasoner, tiny_batch)
    out = sft_step(reasoner, tiny_batch)
    ref = naive_sft_step(reasoner, tiny_batch)
    torch.testing.assert_close(out.nll_sum, ref.nll_sum, rtol=1e-5, atol=1e-4)
    params = [p for p in reasoner.parameters() if p.requires_grad]
    got = torch.autograd.grad(out.nll_sum, params, allow_unused=True)
    want = torch.autograd.grad(ref.nll_sum, params, allow_unused=True)
    for g, w in zip(got, want, strict=True):
        if w is None:
            assert g is None or not g.any()
            continue
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


def test_saved_and_merged_models_compute_what_the_adapted_model_computes(
        tiny_reasoner, tiny_batch, tmp_path):
    reasoner = trained_lora(tiny_reasoner, tiny_batch)
    want = logits(reasoner, tiny_batch)
    saved = reasoner.save(tmp_path / "sft")
    assert (saved / "lora_adapter.safetensors").is_file()
    assert json.loads((saved / "lora.json").read_text()) == {"r": 4, "alpha": 8.0,
                                                              "dropout": 0.0}
    loaded = LatentReasoner.load(saved)  # plain weights: no PEFT needed to use it
    assert not lora_layers(loaded.llm)
    torch.testing.assert_close(logits(loaded, tiny_batch), want, rtol=1e-5, atol=1e-5)
    merged = copy.deepcopy(reasoner)
    assert merge_lora(merged.llm) == 7 * len(merged.llm.get_decoder().layers)
    assert not lora_layers(merged.llm)
    got = logits(merged, tiny_batch)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for a, b in zip(merged.llm.state_dict().values(), loaded.llm.state_dict().values(),
                    strict=True):
        assert torch.equal(a, b)  # merging and saving compute the same sum


def test_smoke_end_to_end_with_lora(tmp_path):
    out = tmp_path / "run"
    assert main(["--preset", "smoke", "--output-dir", str(out), "--sft-lora-r", "4",
                 "--report-to", "none"]) == 0
    events = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [e["layers"] for e in events if e["event"] == "lora"] == [14]
    assert (out / "sft" / "lora_adapter.safetensors").is_file()
    assert not (out / "rl" / "lora_adapter.safetensors").exists()  # merged before RL
    again = tmp_path / "eval"
    assert main(["--preset", "smoke", "--stage", "eval", "--checkpoint", str(out / "rl"),
                 "--output-dir", str(again), "--report-to", "none"]) == 0
    assert json.loads((again / "metrics.json").read_text())["eval"] == \
        json.loads((out / "metrics.json").read_text())["rl"]


@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_qlora_adapters_over_a_quantised_base(tiny_reasoner, tiny_batch, mode, tmp_path):
    """LoRA over an 8-bit/NF4 base: the engine matches the full-sequence step, and the
    saved (merged) plain model computes what the adapted quantised model computes."""
    pytest.importorskip("bitsandbytes")
    from fastlatent.model.quantize import quantization_of, quantize_llm

    quantize_llm(tiny_reasoner.llm, mode, source=None)
    reasoner = trained_lora(tiny_reasoner, tiny_batch)
    out, ref = sft_step(reasoner, tiny_batch), naive_sft_step(reasoner, tiny_batch)
    torch.testing.assert_close(out.nll_sum, ref.nll_sum, rtol=1e-4, atol=1e-3)
    want = logits(reasoner, tiny_batch)
    loaded = LatentReasoner.load(reasoner.save(tmp_path / "sft"))
    assert quantization_of(loaded.llm) is None and not lora_layers(loaded.llm)
    torch.testing.assert_close(logits(loaded, tiny_batch), want, rtol=1e-4, atol=1e-4)
    merge_lora(reasoner.llm)
    assert quantization_of(reasoner.llm) is None
    assert all(type(m) is torch.nn.Linear for m in reasoner.llm.modules()
               if "Linear" in type(m).__name__ and m is not reasoner.llm.lm_head)
    torch.testing.assert_close(logits(reasoner, tiny_batch), want, rtol=1e-4, atol=1e-4)


def test_smoke_end_to_end_with_qlora(tmp_path):
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "run"
    assert main(["--preset", "smoke", "--output-dir", str(out), "--sft-lora-r", "4",
                 "--base-quant", "nf4", "--report-to", "none"]) == 0
    events = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [e["base_quant"] for e in events if e["event"] == "lora"] == ["nf4"]
    assert [e["source"] for e in events if e["event"] == "quantized"] == [str(out / "sft")]
    assert (out / "rl" / "llm" / "model.safetensors").read_bytes() == \
        (out / "sft" / "llm" / "model.safetensors").read_bytes()


@pytest.mark.slow
def test_a_killed_lora_sft_resumes_to_the_same_bytes(tmp_path):
    flags = ["--preset", "smoke", "--sft-lora-r", "4", "--sft-limit", "96",
             "--sft-batch-size", "32", "--sft-micro-batch", "16", "--rl-max-steps", "2",
             "--eval-limit", "4", "--save-every", "2", "--report-to", "none"]
    env = {**os.environ, "PYTHONHASHSEED": "0"}

    def run(out, *cmd):
        return subprocess.run([sys.executable, *cmd, *flags, "--output-dir", str(out)],
                              env=env, capture_output=True, text=True, timeout=600)

    reference, killed = tmp_path / "reference", tmp_path / "killed"
    assert run(reference, "-m", "fastlatent.train").returncode == 0
    assert run(killed, "-c", cli_with_fault("sft", "clipped_update", 5,
                                             signal_self("SIGKILL"))).returncode == -9
    resumed = subprocess.run([sys.executable, "-m", "fastlatent.train", "--resume",
                              "--output-dir", str(killed)], env=env, capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for name in ("rl/latent_ratt.safetensors", "sft/lora_adapter.safetensors",
                 "sft/llm/model.safetensors"):
        assert (killed / name).read_bytes() == (reference / name).read_bytes(), name
    assert json.loads((killed / "metrics.json").read_text()) == \
        json.loads((reference / "metrics.json").read_text())
