"""LatentReasoner: thought token, fp32 LatentRATT, save/load round trip, bad checkpoints."""

from __future__ import annotations

import json

import pytest
import torch

from fastlatent.errors import CheckpointError
from fastlatent.model.reasoner import CONFIG_FILE, LatentReasoner


def test_build_adds_thought_token_and_resizes(tiny_reasoner):
    tok = tiny_reasoner.tokenizer
    tid = tiny_reasoner.config.thought_token_id
    assert tok.convert_ids_to_tokens(tid) == "<|Thought|>"
    assert tiny_reasoner.llm.get_input_embeddings().num_embeddings >= len(tok)


def test_latent_ratt_keeps_fp32_master_weights(tiny_reasoner):
    tiny_reasoner.to(torch.bfloat16)
    assert tiny_reasoner.llm.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in tiny_reasoner.ratt.parameters())


def test_save_load_round_trip(tiny_reasoner, tiny_batch, tmp_path):
    with torch.no_grad():
        r = tiny_reasoner.latent(tiny_batch.prompt_ids, tiny_batch.prompt_mask)
        emb = tiny_reasoner.prompt_embeds(tiny_batch.prompt_ids, tiny_batch.prompt_mask)
        logits = tiny_reasoner.llm(inputs_embeds=emb, attention_mask=tiny_batch.prompt_mask).logits
    path = tiny_reasoner.save(tmp_path / "ckpt")
    tiny_reasoner.save(tmp_path / "ckpt")  # overwriting an existing checkpoint works
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary leftovers
    loaded = LatentReasoner.load(path).eval()
    assert loaded.config == tiny_reasoner.config
    assert loaded.tokenizer.convert_tokens_to_ids("<|Thought|>") == loaded.config.thought_token_id
    with torch.no_grad():
        r2 = loaded.latent(tiny_batch.prompt_ids, tiny_batch.prompt_mask)
        emb2 = loaded.prompt_embeds(tiny_batch.prompt_ids, tiny_batch.prompt_mask)
        logits2 = loaded.llm(inputs_embeds=emb2, attention_mask=tiny_batch.prompt_mask).logits
    torch.testing.assert_close(r2, r, rtol=0, atol=0)
    torch.testing.assert_close(logits2, logits, rtol=0, atol=0)
    for name, p in tiny_reasoner.ratt.state_dict().items():
        torch.testing.assert_close(loaded.ratt.state_dict()[name], p, rtol=0, atol=0)


def test_load_rejects_bad_checkpoints(tmp_path, tiny_reasoner):
    with pytest.raises(CheckpointError, match="not a fastlatent checkpoint"):
        LatentReasoner.load(tmp_path)
    path = tiny_reasoner.save(tmp_path / "ckpt")
    meta = json.loads((path / CONFIG_FILE).read_text())
    meta["format_version"] = 99
    (path / CONFIG_FILE).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="format 99"):
        LatentReasoner.load(path)


def test_last_hidden_variant_uses_the_final_state(synthetic_dataset, tiny_batch):
    from fastlatent.model.loading import load_llm
    from fastlatent.model.reasoner import ReasonerConfig

    llm, tok = load_llm("tiny-random", tokenizer_texts=synthetic_dataset.catalogue.titles)
    reasoner = LatentReasoner.build(llm, tok, ReasonerConfig(latent="last-hidden")).eval()
    assert reasoner.ratt is None
    with torch.no_grad():
        r = reasoner.latent(tiny_batch.prompt_ids, tiny_batch.prompt_mask)
        row = 0
        keep = tiny_batch.prompt_mask[row].bool()
        ids = tiny_batch.prompt_ids[row][keep][:-1]  # without the thought token
        expected = reasoner.llm.base_model(input_ids=ids[None]).last_hidden_state[0, -1]
    torch.testing.assert_close(r[row], expected, rtol=1e-5, atol=1e-5)
