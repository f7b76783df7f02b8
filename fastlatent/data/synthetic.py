"""A small seeded dataset with learnable sequential structure, for tests and smoke runs.

Items lie on a few disjoint cycles (in a shuffled order); each user starts at a random
item and, at every step, moves to its item's successor on the cycle with probability 0.8,
else to a uniformly random item. A model that learns "next on the cycle" beats
popularity by a wide margin. Samples go through the same pipeline as MovieLens.
"""

from __future__ import annotations

import random

from fastlatent.data.example import Dataset
from fastlatent.data.movielens import Interaction, build_sequential_splits

FOLLOW_PROB = 0.8
ITEMS_PER_CYCLE = 10
_ADJECTIVES = ("Silver", "Quiet", "Golden", "Crimson", "Hidden", "Northern",
               "Electric", "Velvet", "Broken", "Wild", "Paper", "Lonely")
_NOUNS = ("Harbor", "River", "Garden", "Lantern", "Mountain", "Echo",
          "Compass", "Meadow", "Engine", "Orchard", "Signal", "Tide")


def make_synthetic(
    *, num_users: int = 64, num_items: int = 40, seed: int = 0, min_len: int = 4,
    max_len: int = 12,
) -> Dataset:
    """A deterministic (per ``seed``) dataset named "synthetic", domain "products".

    Each user has ``min_len..max_len`` interactions at increasing times; user start times
    are spread out so that users interleave in time. Titles are distinct except that the
    last item repeats the first item's title (like Amazon's duplicate titles).
    """
    if num_users < 1:
        raise ValueError(f"expected num_users >= 1, got {num_users}")
    if num_items < 2:
        raise ValueError(f"expected num_items >= 2, got {num_items}")
    if not 2 <= min_len <= max_len:
        raise ValueError(f"expected 2 <= min_len <= max_len, got {min_len} and {max_len}")
    rng = random.Random(seed)
    titles = synthetic_titles(num_items, rng)
    successor = cycle_successors(num_items, rng)
    interactions = []
    for u in range(num_users):
        item, time = rng.randrange(num_items), rng.randrange(1000)
        for _ in range(rng.randint(min_len, max_len)):
            interactions.append(Interaction(user=f"user{u}", item=item, time=time))
            time += rng.randint(1, 50)
            follow = rng.random() < FOLLOW_PROB
            item = successor[item] if follow else rng.randrange(num_items)
    return build_sequential_splits(interactions, titles, name="synthetic", domain="products")


def synthetic_titles(num_items: int, rng: random.Random) -> list[str]:
    """Made-up two-word titles ("Quiet River"), numbered ("Quiet River (2)") once the word
    pairs run out; the last title is set equal to the first."""
    pairs = [f"{adjective} {noun}" for adjective in _ADJECTIVES for noun in _NOUNS]
    rng.shuffle(pairs)
    titles = [pairs[i % len(pairs)] + (f" ({i // len(pairs) + 1})" if i >= len(pairs) else "")
              for i in range(num_items)]
    titles[-1] = titles[0]
    return titles


def cycle_successors(num_items: int, rng: random.Random) -> list[int]:
    """``successor[item]`` on ``max(1, num_items // 10)`` disjoint cycles of shuffled items."""
    order = list(range(num_items))
    rng.shuffle(order)
    num_cycles = max(1, num_items // ITEMS_PER_CYCLE)
    successor = [0] * num_items
    for c in range(num_cycles):
        cycle = order[c * num_items // num_cycles:(c + 1) * num_items // num_cycles]
        for i, item in enumerate(cycle):
            successor[item] = cycle[(i + 1) % len(cycle)]
    return successor
