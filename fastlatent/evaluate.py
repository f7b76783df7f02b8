"""Evaluation: beam search constrained to catalogue titles, exact-title grounding,
HR@{5,10} / NDCG@{5,10} with bootstrap intervals, popular / unpopular split."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from tqdm.auto import tqdm

from fastlatent import distributed, shutdown
from fastlatent.config import EvalConfig
from fastlatent.data.batch import collate
from fastlatent.data.example import Catalogue, Example
from fastlatent.data.prompt import PromptBuilder
from fastlatent.data.sampling import chunks
from fastlatent.data.sources import item_key
from fastlatent.data.trie import TitleTrie
from fastlatent.engine.decoder import Decoder
from fastlatent.engine.generic import beam_search_for
from fastlatent.engine.steps import target_logprobs
from fastlatent.errors import EvaluationError
from fastlatent.metrics import normalize_title, rank_of_first_hit, summarize
from fastlatent.model.reasoner import LatentReasoner
from fastlatent.optim import nonfinite_tensors

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class EvalResult:
    metrics: dict[str, Any]
    predictions: list[dict[str, Any]]


def build_title_trie(builder: PromptBuilder, catalogue: Catalogue) -> TitleTrie:
    """Prefix trie over the tokenised targets ("title"\\n + EOS) of every catalogue title,
    each path labelled with its title."""
    eos = builder.tokenizer.eos_token_id
    titles = catalogue.distinct_titles
    return TitleTrie.from_sequences((builder.encode_target(t) for t in titles),
                                    eos_token_id=eos, labels=titles)


def catalogue_record(builder: PromptBuilder, catalogue: Catalogue) -> dict[str, Any]:
    """What a saved model needs to recommend on its own (LatentReasoner.catalogue): the
    titles it may name and the prompt wording it was trained with."""
    return {"titles": list(catalogue.distinct_titles), "template": builder.template,
            "domain": builder.domain, "release_domain": builder.release_domain}


def decode_title(tokenizer, token_ids: Sequence[int]) -> str:
    ids = list(token_ids)
    if ids and ids[-1] == tokenizer.eos_token_id:
        ids = ids[:-1]
    return tokenizer.decode(ids, skip_special_tokens=False).strip().strip('"').strip()


def title_of(trie: TitleTrie, tokenizer, token_ids: Sequence[int]) -> str:
    """A beam's title: the catalogue title whose trie path it wrote, not the decoded text
    (a tokenizer that normalises text on decoding, e.g. NFC or spaces, would turn an exact
    path into a miss); the decoded text for a path cut short of EOS."""
    return trie.label(token_ids) or decode_title(tokenizer, token_ids)


def rank_titles(reasoner: LatentReasoner, search, builder: PromptBuilder, trie: TitleTrie,
                part: Sequence[Example], *, num_beams: int, length_penalty: float,
                max_new_tokens: int) -> list[tuple[list[str], list[float]]]:
    """One batch of users through constrained beam search: per user, the titles best
    first (:func:`title_of`) and their beam scores (rounded to 6 decimals)."""
    tokenizer = reasoner.tokenizer
    batch = collate([builder.encode(ex) for ex in part], tokenizer.pad_token_id)
    batch = batch.to(reasoner.device)
    hyps = search(reasoner, batch.prompt_ids, batch.prompt_mask, trie, num_beams=num_beams,
                  num_return=num_beams, length_penalty=length_penalty,
                  max_new_tokens=max_new_tokens)
    return [([title_of(trie, tokenizer, h.token_ids) for h in row],
             [round(float(h.score), 6) for h in row]) for row in hyps]


def map_dealt(batches: Sequence[Sequence[T]], score: Callable[[Sequence[T]], list[R]],
              where: str) -> list[R]:
    """``score`` over ``batches`` dealt across the processes, every result gathered back
    in batch order (one process: a plain loop). Every process runs as many rounds as the
    busiest one, checking for a stop signal before each (a collective)."""
    mine = distributed.deal(batches)
    done: dict[int, list[R]] = {}
    for round_ in range(distributed.rounds(len(batches))):
        check_stop(where)
        if round_ < len(mine):
            index, part = mine[round_]
            done[index] = score(part)
    gathered = distributed.gather_dealt(done)
    return [row for i in range(len(batches)) for row in gathered[i]]


def evaluate(reasoner: LatentReasoner, examples: Sequence[Example], builder: PromptBuilder,
             trie: TitleTrie, cfg: EvalConfig, *, popular: set | None = None,
             seed: int = 0, desc: str = "eval") -> EvalResult:
    """Rank titles for every example; metrics over all rows (see metrics.summarize).

    The batches of ``--eval-batch-size`` users are dealt over the processes, so each user
    is decoded in the same batch as in one process; the predictions are gathered back in
    the original order and every process computes the same metrics."""
    if not examples:
        raise ValueError("evaluation needs at least one example")
    bad = nonfinite_tensors(reasoner.named_parameters())
    if bad:
        raise EvaluationError(
            f"{desc}: the model holds non-finite weights ({len(bad)} tensor(s), e.g. "
            f"{bad[0]}); it cannot rank titles. Evaluate an earlier checkpoint, or train "
            "again with a lower learning rate")
    was_training = reasoner.training
    reasoner.eval()
    search = beam_search_for(reasoner)
    bar = tqdm(total=len(examples), desc=desc, unit="user", dynamic_ncols=True,
               disable=not distributed.is_main())

    def score(part: Sequence[Example]) -> list[dict[str, Any]]:
        ranked = rank_titles(reasoner, search, builder, trie, part,
                             num_beams=cfg.num_beams, length_penalty=cfg.length_penalty,
                             max_new_tokens=cfg.max_new_tokens)
        bar.update(len(part) * distributed.world_size())
        return [{"user": ex.user, "history": list(ex.history), "target": ex.target,
                 "rank": rank_of_first_hit(titles, ex.target), "predictions": titles,
                 "scores": scores} for ex, (titles, scores) in zip(part, ranked, strict=True)]

    with torch.no_grad():
        predictions = map_dealt(list(chunks(examples, cfg.eval_batch_size)), score,
                                f"during {desc} (an evaluation restarts on --resume)")
    bar.close()
    reasoner.train(was_training)
    empty = [i for i, row in enumerate(predictions) if not row["predictions"]]
    if empty:
        first = predictions[empty[0]]
        raise EvaluationError(
            f"{desc}: {len(empty)} of {len(predictions)} rows got no title at all (first: row "
            f"{empty[0] + 1}, user {first['user']!r}); the beam scores were not finite "
            f"(--length-penalty {cfg.length_penalty!r}, or the model's outputs) or no "
            f"catalogue title fits in --max-new-tokens {cfg.max_new_tokens}")
    ranks = [row["rank"] for row in predictions]
    flags = None if popular is None else [item_key(ex) in popular for ex in examples]
    return EvalResult(summarize(ranks, flags, seed=seed), predictions)


def check_stop(where: str) -> None:
    """Stop between batches when any process received a signal (a collective: every
    process calls it the same number of times)."""
    signum = distributed.agreed_signal(shutdown.requested())
    if signum is not None:
        raise shutdown.Interrupted(signum, where)


def most_frequent_titles(examples: Sequence[Example], n: int = 10) -> list[str]:
    """The ``n`` titles most often the target of ``examples`` (grounding form; ties by
    title, so the list is deterministic)."""
    counts = Counter(normalize_title(ex.target) for ex in examples)
    return sorted(counts, key=lambda title: (-counts[title], title))[:n]


def popularity_baseline(train: Sequence[Example], examples: Sequence[Example], *,
                        n: int = 10, popular: set | None = None, seed: int = 0) -> EvalResult:
    """The baseline every report carries: recommend the ``n`` most frequent training
    targets to every row of ``examples``, scored by the same metric code."""
    if not examples:
        raise ValueError("evaluation needs at least one example")
    titles = most_frequent_titles(train, n)
    ranks = [rank_of_first_hit(titles, ex.target) for ex in examples]
    predictions = [{"user": ex.user, "history": list(ex.history), "target": ex.target,
                    "rank": rank, "predictions": titles}
                   for ex, rank in zip(examples, ranks, strict=True)]
    flags = None if popular is None else [item_key(ex) in popular for ex in examples]
    return EvalResult(summarize(ranks, flags, seed=seed), predictions)


def target_nll(reasoner: LatentReasoner, examples: Sequence[Example], builder: PromptBuilder,
               batch_size: int = 8) -> list[float]:
    """Per row, the mean NLL per target token (target + EOS) under the noiseless latent
    r^0: log PPL, the quantity latent GRPO's reward -PPL optimises. Far more sensitive to
    a small change of the model than HR/NDCG. Batches dealt over the processes as in
    :func:`evaluate`; every process returns all rows."""
    decoder = Decoder(reasoner.llm)
    was_training = reasoner.training
    reasoner.eval()

    def score(part: Sequence[Example]) -> list[float]:
        batch = collate([builder.encode(ex) for ex in part],
                        reasoner.tokenizer.pad_token_id).to(reasoner.device)
        logp = target_logprobs(reasoner, batch, decoder=decoder)
        mask = batch.target_mask.to(logp.dtype)
        return (-(logp * mask).sum(1) / mask.sum(1)).tolist()

    with torch.no_grad():
        out = map_dealt(list(chunks(examples, batch_size)), score,
                        "while scoring the evaluation targets")
    reasoner.train(was_training)
    return out
