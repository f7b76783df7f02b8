"""One entry point for every data source, plus helpers over lists of examples."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence

from fastlatent.data.csv_layout import load_csv_dir
from fastlatent.data.example import Catalogue, Dataset, Example
from fastlatent.data.movielens import load_movielens_100k
from fastlatent.data.synthetic import make_synthetic

DATASET_SPECS = ("movielens-100k", "synthetic", "csv:DIR")


def load_dataset(spec: str, *, seed: int = 0) -> Dataset:
    """Load ``spec``: "movielens-100k", "synthetic" or "csv:DIR" (DIR may be relative).

    ``seed`` only affects "synthetic"; the other sources are fixed files.
    """
    if spec == "movielens-100k":
        return load_movielens_100k()
    if spec == "synthetic":
        return make_synthetic(seed=seed)
    if spec.startswith("csv:") and len(spec) > len("csv:"):
        return load_csv_dir(spec[len("csv:"):])
    raise ValueError(f"expected a dataset spec among {list(DATASET_SPECS)}, got {spec!r}")


def holdout_slice(
    examples: Sequence[Example], fraction: float = 0.05, seed: int = 0
) -> tuple[list[Example], list[Example]]:
    """Split off a seeded random ``fraction`` of ``examples`` (at least one row).

    Returns ``(kept, held_out)``; both keep the input order, together they are the input.
    Used for early stopping when the validation split itself is trained on.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"expected 0 < fraction < 1, got {fraction}")
    if len(examples) < 2:
        raise ValueError(f"expected at least 2 examples to hold one out, got {len(examples)}")
    count = min(len(examples) - 1, max(1, round(fraction * len(examples))))
    chosen = set(random.Random(seed).sample(range(len(examples)), count))
    kept = [ex for i, ex in enumerate(examples) if i not in chosen]
    held_out = [ex for i, ex in enumerate(examples) if i in chosen]
    return kept, held_out


def item_key(example: Example) -> int | str:
    """The target's identity for popularity: its item id, or its title when the id is unknown."""
    return example.target if example.target_item is None else example.target_item


def item_frequencies(examples: Sequence[Example]) -> Counter[int | str]:
    """How often each item is a target (keyed by :func:`item_key`), in the order of each
    item's first appearance in ``examples``."""
    return Counter(item_key(ex) for ex in examples)


def catalogue_frequencies(examples: Sequence[Example], catalogue: Catalogue
                          ) -> dict[int | str, int]:
    """How often each catalogue item is a target in ``examples`` (the training rows),
    every item included (0 for one never a target), in the order that breaks ties of
    popularity: the items that were targets in the order of their first appearance, then
    the others in catalogue order. Keyed by item id, or by title when the rows carry no
    ids (:func:`item_key`)."""
    counts = dict(item_frequencies(examples))
    by_id = any(ex.target_item is not None for ex in examples) or not examples
    keys = range(len(catalogue.titles)) if by_id else catalogue.distinct_titles
    return {**counts, **{key: 0 for key in keys if key not in counts}}
