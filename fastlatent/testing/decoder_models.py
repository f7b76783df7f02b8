"""Small random models of every family the engine's Decoder covers, and the Hugging Face
reference it is checked against (tests of the Decoder and of the prompt cache tree)."""

from __future__ import annotations

import torch

from fastlatent.model.loading import tiny_llama_config

VOCAB = 64


def small(**kwargs):
    return dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                **kwargs)


def build_config(family):
    from transformers import MistralConfig, Qwen2Config, Qwen3Config

    if family == "llama":
        return tiny_llama_config(VOCAB)  # hidden 64, tied embeddings
    if family == "llama-bias-hd12":
        return tiny_llama_config(VOCAB, hidden_size=48, attention_bias=True, head_dim=12)
    if family == "qwen2":
        return Qwen2Config(**small())  # q/k/v biases, no sliding window by default
    if family == "qwen3":
        return Qwen3Config(**small(head_dim=16))  # q/k norms, head_dim != hidden / heads
    if family == "mistral":
        return MistralConfig(**small(head_dim=8))  # sliding window 4096: enabled, not reached
    raise KeyError(family)


FAMILIES = ["llama", "llama-bias-hd12", "qwen2", "qwen3", "mistral"]


def build_llm(config, seed=0):
    """Random weights large enough that attention is far from uniform; norms and biases
    randomised too, so a skipped q/k norm or bias shows."""
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        llm = AutoModelForCausalLM.from_config(config)
        with torch.no_grad():
            for name, p in llm.named_parameters():
                if p.dim() == 1:
                    p.normal_(1.0 if "norm" in name else 0.0, 0.2)
                else:
                    p.normal_(0.0, 0.15)
    return llm.eval()


def left_padded_prompts(lengths, gen):
    width = max(lengths)
    ids = torch.randint(0, VOCAB, (len(lengths), width), generator=gen)
    mask = (torch.arange(width)[None, :] >= width - torch.tensor(lengths)[:, None]).long()
    return ids, mask


def reference_logits(llm, prompt_embeds, prompt_mask, row_embeds, rows_per_group):
    """Per row: the HF forward on [real prompt tokens, row_embeds[r]] (unpadded). Returns
    the logits at the suffix positions, one tensor [n_r, V] per row."""
    out = []
    for r, suffix in enumerate(row_embeds):
        g = r // rows_per_group
        prompt = prompt_embeds[g][prompt_mask[g].bool()]
        seq = torch.cat((prompt, suffix))[None]
        out.append(llm(inputs_embeds=seq, use_cache=False).logits[0, prompt.shape[0]:])
    return out


def suffix_batch(llm, num_rows, width, gen, lengths=None):
    """Right-padded suffix embeddings [R, T, d]: a random latent vector first (not a token
    embedding), then token embeddings; ragged lengths unless given."""
    if lengths is None:
        lengths = torch.randint(1, width + 1, (num_rows,), generator=gen)
        lengths[0] = width
    d = llm.config.hidden_size
    embeds = llm.get_input_embeddings()(torch.randint(0, VOCAB, (num_rows, width), generator=gen))
    embeds[:, 0] = torch.randn(num_rows, d, generator=gen)
    mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
    return embeds.detach(), mask
