"""Trie-constrained beam search through Hugging Face ``generate`` as it stands.

The evaluation path for model families the Decoder does not cover, and the reference
that fastlatent's own beam search (shared prompt KV, fused log-prob head) is tested
against (the oracle ``naive_beam_search`` of the test helpers). It re-runs the prompt
through ``llm.generate`` with a ``prefix_allowed_tokens_fn`` over a
:class:`~fastlatent.data.trie.TitleTrie`.

What the installed transformers (5.x) does, checked by ``tests/engine/test_naive_beam_search.py``:

- With ``inputs_embeds`` and no ``input_ids``, ``generate`` starts from an empty
  ``[B, 0]`` id tensor, so ``prefix_allowed_tokens_fn`` sees the generated tokens only.
- Position ids come from the attention mask (``cumsum - 1``, padding 0) for the prompt
  and count on from there, so a left-padded row decodes as the same row alone (to float
  tolerance).
- Beam scores are ``log_softmax`` over the full vocabulary, then the constraint adds
  -inf to disallowed tokens: allowed tokens keep their full-vocabulary log-probs, nothing
  is renormalised over the allowed set.
- A finished hypothesis scores ``Σ log p / L ** length_penalty`` with ``L`` the number of
  generated tokens including EOS (the prompt does not count: the id prompt is empty).

Search semantics (HF's, kept as is; the fast engine must reproduce them): each step
takes the best ``2 · num_beams`` continuations of the live beams by cumulative
log-prob; those ending in EOS enter the finished pool only if they rank in the first
``num_beams``, and the pool keeps the ``num_beams`` best by length-penalised score; the
next live beams are the best ``num_beams`` continuations not ending in EOS. The search
stops after ``max_new_tokens`` steps or once the pool is full and the best live beam's
``cumulative log-prob / (tokens so far) ** length_penalty`` no longer beats the pool's
worst (HF's ``early_stopping=False`` heuristic, the default the LatentR³ release uses).

HF's beam search also carries filler beams: beams 1..n-1 start at a score of -1e9 so
that step 1 expands beam 0 only, and a finished candidate picked as a live beam is
charged -1e9. When the trie has fewer live paths than beams, fillers reach the output.
They are recognised by their raw score (below -1e8) and dropped (a filler's title is
usually a duplicate of a real one), as is any output that is not a complete trie path
(cut off by ``max_new_tokens``). This is also why ``early_stopping=True`` is not used:
fillers can fill the finished pool and end the search before every title has finished.
Conversely, with fillers live the ``early_stopping=False`` heuristic rarely fires, so
the search is capped at the trie's longest title: by then every real beam has finished
and later steps only move fillers, so the result is the same as running on to
``max_new_tokens``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fastlatent.data.trie import TitleTrie
from fastlatent.engine.beam_rules import Hypothesis

# HF's filler beams carry at least one -1e9 penalty; real paths have finite full-vocab
# log-prob sums, many orders of magnitude above this floor.
_FILLER_RAW_SCORE_FLOOR = -1e8

# generation_config fields whose processors would change the scores and that cannot be
# switched off from a ``generate`` call (a None argument is replaced by the model's value).
_SCORE_ALTERING_FIELDS = (
    "sequence_bias",
    "bad_words_ids",
    "suppress_tokens",
    "begin_suppress_tokens",
    "forced_bos_token_id",
    "forced_eos_token_id",
    "exponential_decay_length_penalty",
)


def generate_beam_search(
    llm: torch.nn.Module,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    trie: TitleTrie,
    *,
    eos_token_id: int,
    pad_token_id: int,
    num_beams: int = 10,
    num_return: int = 10,
    length_penalty: float = 1.0,
    max_new_tokens: int = 128,
) -> list[list[Hypothesis]]:
    """Beam search constrained to the titles of ``trie``, by ``llm.generate``.

    Args:
        llm: a Hugging Face causal LM in eval mode.
        inputs_embeds: ``[B, L, d]`` prompt input embeddings, left-padded (with a latent,
            already in the last column).
        attention_mask: ``[B, L]``, 1 = real token; every row is ``0…0 1…1``.
        trie: the catalogue; its EOS must be ``eos_token_id``.
        num_beams: at least 2 (HF runs greedy search, without beam scores, for 1).
    Returns:
        per row, up to ``num_return`` hypotheses, best first: distinct complete trie
        paths (generated tokens only, ending in EOS). Fewer when fewer titles finished
        within ``max_new_tokens``, e.g. a trie with fewer titles than ``num_return``.
    """
    _check_inputs(inputs_embeds, attention_mask, trie, eos_token_id, num_beams, num_return,
                  max_new_tokens)
    if llm.training:
        raise ValueError("expected llm in eval mode (llm.eval()), got training mode")
    _check_generation_defaults(llm)

    def allowed(batch_id: int, generated: torch.Tensor) -> list[int]:
        # Filler and finished beams have no continuation; HF rejects an empty list, and EOS
        # lets them finish at once (they are dropped afterwards).
        return trie.allowed(generated.tolist()) or [eos_token_id]

    out = llm.generate(
        inputs_embeds=inputs_embeds,
        attention_mask=attention_mask.long(),
        prefix_allowed_tokens_fn=allowed,
        num_beams=num_beams,
        num_return_sequences=num_beams,  # everything, so that dropping fillers leaves enough
        do_sample=False,
        early_stopping=False,
        length_penalty=length_penalty,
        max_new_tokens=min(max_new_tokens, trie.max_length),
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        renormalize_logits=False,
        min_new_tokens=0,
        output_scores=True,
        return_dict_in_generate=True,
        use_cache=True,
    )
    batch = inputs_embeds.shape[0]
    sequences = out.sequences.view(batch, num_beams, -1).tolist()
    scores = out.sequences_scores.view(batch, num_beams).tolist()
    lengths = (out.beam_indices >= 0).sum(-1).view(batch, num_beams).tolist()
    return [
        _row_hypotheses(sequences[b], scores[b], lengths[b], trie, num_return, length_penalty)
        for b in range(batch)
    ]


def _row_hypotheses(
    sequences: Sequence[Sequence[int]],
    scores: Sequence[float],
    lengths: Sequence[int],
    trie: TitleTrie,
    num_return: int,
    length_penalty: float,
) -> list[Hypothesis]:
    """One row's HF beams -> complete titles, best first, fillers dropped. ``lengths``
    are HF's generated lengths, to undo its length penalty. Real beams are distinct paths
    (every one extends a different beam or token), so no title appears twice."""
    kept = []
    for tokens, score, length in zip(sequences, scores, lengths, strict=True):
        title = _through_first_eos(tokens, trie.eos_token_id)
        if score * length**length_penalty > _FILLER_RAW_SCORE_FLOOR and trie.contains(title):
            kept.append(Hypothesis(token_ids=title, score=score))
    kept.sort(key=lambda hyp: hyp.score, reverse=True)
    return kept[:num_return]


def _through_first_eos(tokens: Sequence[int], eos_token_id: int) -> tuple[int, ...]:
    """``tokens`` up to and including the first EOS (all of them when there is none)."""
    for i, token in enumerate(tokens):
        if token == eos_token_id:
            return tuple(tokens[: i + 1])
    return tuple(tokens)


def _check_inputs(
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    trie: TitleTrie,
    eos_token_id: int,
    num_beams: int,
    num_return: int,
    max_new_tokens: int,
) -> None:
    if inputs_embeds.ndim != 3:
        raise ValueError(
            f"expected inputs_embeds [B, L, d], got shape {tuple(inputs_embeds.shape)}"
        )
    if attention_mask.shape != inputs_embeds.shape[:2]:
        raise ValueError(
            f"expected attention_mask of shape {tuple(inputs_embeds.shape[:2])}, "
            f"got {tuple(attention_mask.shape)}"
        )
    mask = attention_mask.long()
    if not ((mask == 0) | (mask == 1)).all() or (mask.diff(dim=-1) < 0).any() or (
        mask[:, -1] != 1
    ).any():
        raise ValueError("expected a left-padded 0/1 attention_mask (rows 0…0 1…1), got another")
    if trie.eos_token_id != eos_token_id:
        raise ValueError(f"expected a trie with eos {eos_token_id}, got {trie.eos_token_id}")
    if num_beams < 2:
        raise ValueError(f"expected num_beams >= 2, got {num_beams}")
    if not 1 <= num_return <= num_beams:
        raise ValueError(f"expected 1 <= num_return <= num_beams ({num_beams}), got {num_return}")
    if max_new_tokens < 1:
        raise ValueError(f"expected max_new_tokens >= 1, got {max_new_tokens}")


def _check_generation_defaults(llm: torch.nn.Module) -> None:
    config = llm.generation_config
    present = [name for name in _SCORE_ALTERING_FIELDS if getattr(config, name, None) is not None]
    if present:
        raise ValueError(
            "expected llm.generation_config without score-altering processors, "
            f"got {present} set; the oracle's scores would not be plain log-probs"
        )
