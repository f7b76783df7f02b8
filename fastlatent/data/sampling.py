"""Seeded sampling and batching of example lists."""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from typing import TypeVar

T = TypeVar("T")


def seeded_sample(items: Sequence[T], n: int, seed: int) -> list[T]:
    """``n`` items drawn without replacement by a seeded RNG, kept in their original order
    (n <= 0 or n >= len(items) returns all of them)."""
    if n <= 0 or n >= len(items):
        return list(items)
    keep = sorted(random.Random(seed).sample(range(len(items)), n))
    return [items[i] for i in keep]


def shuffled_batches(items: Sequence[T], batch_size: int, seed: int) -> Iterator[list[T]]:
    """Seeded shuffle, then consecutive batches (the last may be smaller)."""
    if batch_size < 1:
        raise ValueError(f"expected batch_size >= 1, got {batch_size}")
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    for start in range(0, len(order), batch_size):
        yield [items[i] for i in order[start:start + batch_size]]


def chunks(items: Sequence[T], size: int) -> Iterator[list[T]]:
    if size < 1:
        raise ValueError(f"expected chunk size >= 1, got {size}")
    for start in range(0, len(items), size):
        yield list(items[start:start + size])
