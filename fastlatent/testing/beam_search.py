"""The naive beam-search oracle: Hugging Face ``generate`` with a trie constraint (see
:mod:`fastlatent.engine.generate_search`), under its oracle name."""

from fastlatent.engine.generate_search import generate_beam_search as naive_beam_search

__all__ = ["naive_beam_search"]
