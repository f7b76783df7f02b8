"""Shared fixtures. Sets TRITON_INTERPRET=1 on machines without CUDA before anything can
import fastlatent.kernels (setting it inside a test body would be too late)."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seeded_torch():
    """Every test starts from the same global torch seed, so a draw that is not seeded
    in the test itself is the same in every run and a failure reproduces."""
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def synthetic_dataset():
    from fastlatent.data.synthetic import make_synthetic

    return make_synthetic(seed=0)


@pytest.fixture
def tiny_reasoner(synthetic_dataset):
    """A 2-layer random Llama + LatentRATT with an in-process BPE tokenizer (fp32, eval)."""
    from fastlatent.model.loading import load_llm
    from fastlatent.model.reasoner import LatentReasoner, ReasonerConfig

    llm, tokenizer = load_llm("tiny-random", tokenizer_texts=synthetic_dataset.catalogue.titles,
                              seed=0)
    reasoner = LatentReasoner.build(llm, tokenizer, ReasonerConfig(latent="ratt"))
    # larger LatentRATT weights than the 0.02 init, so r varies; seeded, so every run of a
    # test sees the same model (unseeded, a tolerance met by most draws failed now and then)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in reasoner.ratt.parameters():
            p.normal_(0.0, 0.3, generator=g)
    return reasoner.eval()


@pytest.fixture
def tiny_batch(tiny_reasoner, synthetic_dataset):
    """Four encoded training rows with ragged prompt and target lengths."""
    from fastlatent.data.batch import collate
    from fastlatent.data.prompt import PromptBuilder

    builder = PromptBuilder(tiny_reasoner.tokenizer, domain=synthetic_dataset.domain)
    rows = synthetic_dataset.split("train")
    picked = sorted(rows, key=lambda ex: (len(ex.history), len(ex.target)))
    chosen = [picked[0], picked[len(picked) // 3], picked[2 * len(picked) // 3], picked[-1]]
    encoded = [builder.encode(ex) for ex in chosen]
    lengths = {len(e.prompt_ids) for e in encoded}
    if len(lengths) < 2:
        raise RuntimeError("fixture expected ragged prompt lengths")
    return collate(encoded, tiny_reasoner.tokenizer.pad_token_id)
