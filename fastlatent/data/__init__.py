"""Data sources, examples, prompts and tokenisation.

The names from ``batch`` and ``prompt`` need torch, so they load on first access
(PEP 562); importing this package stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from fastlatent.data.csv_layout import DataError, load_csv_dir
from fastlatent.data.example import Catalogue, Dataset, Example
from fastlatent.data.movielens import (
    Interaction,
    build_sequential_splits,
    load_movielens_100k,
    temporal_split,
)
from fastlatent.data.sources import holdout_slice, item_frequencies, load_dataset
from fastlatent.data.synthetic import make_synthetic
from fastlatent.data.tokenizer import THOUGHT_TOKEN, add_thought_token, train_title_tokenizer

if TYPE_CHECKING:
    from fastlatent.data.batch import Batch, EncodedExample, collate
    from fastlatent.data.prompt import TEMPLATES, PromptBuilder

_LAZY = {
    "Batch": "fastlatent.data.batch",
    "EncodedExample": "fastlatent.data.batch",
    "collate": "fastlatent.data.batch",
    "PromptBuilder": "fastlatent.data.prompt",
    "TEMPLATES": "fastlatent.data.prompt",
}

__all__ = [
    "THOUGHT_TOKEN", "TEMPLATES", "Batch", "Catalogue", "DataError", "Dataset",
    "EncodedExample", "Example", "Interaction", "PromptBuilder", "add_thought_token",
    "build_sequential_splits", "collate", "holdout_slice", "item_frequencies",
    "load_csv_dir", "load_dataset", "load_movielens_100k", "make_synthetic",
    "temporal_split", "train_title_tokenizer",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
