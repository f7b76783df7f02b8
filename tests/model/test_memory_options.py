"""--base-quant int8|nf4 (bitsandbytes layers under the engine) and --optim adamw8bit."""

from __future__ import annotations

import copy
import importlib.util
import json

import pytest
import torch

from fastlatent.config import ConfigError, build_config, validate_config
from fastlatent.engine.grpo import sample_noise
from fastlatent.engine.steps import rl_step
from fastlatent.errors import CheckpointError
from fastlatent.model.quantize import quantization_of, quantize_llm
from fastlatent.model.reasoner import LatentReasoner
from fastlatent.rl import freeze_llm
from fastlatent.testing.naive_steps import loss_of_one_pool, naive_rl_step
from fastlatent.train import main

bnb = pytest.importorskip("bitsandbytes")

# Rewards of the quantised tiny model against the full-precision one, relative: measured
# here at most 0.07% (int8) and 0.75% (NF4) on its random 64-wide weights; 4-7x headroom.
REWARD_RTOL = {"int8": 0.005, "nf4": 0.03}


def rewards(reasoner, batch, noise):
    return rl_step(reasoner, batch, noise=noise, sigma=1.0).rewards


@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_quantised_projections_under_the_engine(tiny_reasoner, tiny_batch, mode, tmp_path):
    freeze_llm(tiny_reasoner)
    noise = sample_noise(len(tiny_batch), 3, tiny_reasoner.llm.config.hidden_size,
                         generator=torch.Generator().manual_seed(5))
    full = rewards(tiny_reasoner, tiny_batch, noise)
    quant = copy.deepcopy(tiny_reasoner)
    layers = len(quant.llm.get_decoder().layers)
    assert quantize_llm(quant.llm, mode, source=tmp_path) == 7 * layers  # q k v o gate up down
    kind = bnb.nn.Linear8bitLt if mode == "int8" else bnb.nn.Linear4bit
    attn = quant.llm.get_decoder().layers[0].self_attn
    assert isinstance(attn.q_proj, kind) and isinstance(
        quant.llm.get_decoder().layers[0].mlp.down_proj, kind)
    assert quant.llm.get_output_embeddings().weight.dtype == torch.float32  # head untouched
    assert quantization_of(quant.llm) == {"mode": mode, "source": str(tmp_path)}
    # The engine (shared-prefix Decoder) and the full-sequence path agree over the same
    # quantised layers: the Decoder runs them unchanged.
    out = rl_step(quant, tiny_batch, noise=noise, sigma=1.0)
    ref = naive_rl_step(quant, tiny_batch, noise=noise, sigma=1.0)
    torch.testing.assert_close(out.token_logprobs, ref.token_logprobs, rtol=1e-4, atol=1e-4)
    # ... and their rewards stay near the full-precision model's.
    torch.testing.assert_close(out.rewards, full, rtol=REWARD_RTOL[mode], atol=0)
    assert not torch.equal(out.rewards, full)  # the quantisation did change something
    # LatentRATT still trains over the quantised LLM.
    loss_of_one_pool(out)[0].backward()
    assert all(p.grad is not None for p in quant.ratt.parameters())
    assert all(not p.requires_grad for p in quant.llm.parameters())


def test_a_quantised_model_saves_its_full_precision_source(tiny_reasoner, tmp_path):
    source = tiny_reasoner.save(tmp_path / "sft")
    quant = copy.deepcopy(tiny_reasoner)
    quantize_llm(quant.llm, "nf4", source=source)
    saved = quant.save(tmp_path / "rl")
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        assert (saved / "llm" / name).read_bytes() == (source / "llm" / name).read_bytes()
    loaded = LatentReasoner.load(saved)
    for a, b in zip(loaded.llm.parameters(), tiny_reasoner.llm.parameters(), strict=True):
        assert torch.equal(a, b)
    orphan = copy.deepcopy(tiny_reasoner)
    quantize_llm(orphan.llm, "int8", source=None)
    with pytest.raises(CheckpointError, match="save the model before quantising"):
        orphan.save(tmp_path / "lost")
    assert not (tmp_path / "lost").exists()


def test_adamw8bit_state_is_8_bit_and_survives_a_checkpoint():
    from fastlatent.config import SFTConfig
    from fastlatent.sft import make_optimizer

    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(64, 64))
    cfg = SFTConfig(optim="adamw8bit", sft_lr=1e-2)
    opt = make_optimizer(cfg, [w])
    assert isinstance(opt, bnb.optim.AdamW8bit)
    for _ in range(3):
        (w ** 2).sum().backward()
        opt.step()
        opt.zero_grad()
    assert opt.state[w]["state1"].dtype == torch.uint8
    saved, w_saved = copy.deepcopy(opt.state_dict()), w.detach().clone()
    (w ** 2).sum().backward()
    opt.step()
    want = w.detach().clone()
    w2 = torch.nn.Parameter(w_saved.clone())
    opt2 = make_optimizer(cfg, [w2])
    opt2.load_state_dict(saved)
    (w2 ** 2).sum().backward()
    opt2.step()
    assert torch.equal(w2.detach(), want)


def test_bitsandbytes_options_need_bitsandbytes(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    for flags, named in (({"base_quant": "nf4"}, "--base-quant"),
                         ({"optim": "adamw8bit"}, "--optim")):
        with pytest.raises(ConfigError, match=f"{named} .*pip install bitsandbytes"):
            validate_config(build_config("smoke", flags))


def test_smoke_end_to_end_with_nf4_base_and_8bit_adamw(tmp_path):
    out = tmp_path / "run"
    assert main(["--preset", "smoke", "--output-dir", str(out), "--base-quant", "nf4",
                 "--optim", "adamw8bit", "--report-to", "none"]) == 0
    events = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    (quantized,) = [e for e in events if e["event"] == "quantized"]
    assert quantized["mode"] == "nf4" and quantized["source"] == str(out / "sft")
    assert sum(e["stage"] == "rl" and e["event"] == "step" for e in events) == 2
    # RL trained over the NF4 LLM; rl/ holds the full-precision LLM SFT trained
    assert (out / "rl" / "llm" / "model.safetensors").read_bytes() == \
        (out / "sft" / "llm" / "model.safetensors").read_bytes()
    again = tmp_path / "eval"
    assert main(["--preset", "smoke", "--stage", "eval", "--checkpoint", str(out / "rl"),
                 "--base-quant", "nf4", "--output-dir", str(again), "--report-to", "none"]) == 0
    evaluated = json.loads((again / "metrics.json").read_text())
    assert evaluated["eval"] == json.loads((out / "metrics.json").read_text())["rl"]
