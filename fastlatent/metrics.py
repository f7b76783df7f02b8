"""Top-K ranking metrics for title generation (HR@K, NDCG@K), bootstrap intervals and the
popular / unpopular split of LatentR³'s appendix D.

A test row is reduced to one number, the 0-based rank of the first generated title that
grounds to the target (or ``None`` for a miss); every metric is a mean over rows of a
function of that rank, with a miss counting as 0.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from typing import TypeVar

import numpy as np

DEFAULT_KS = (5, 10)
BASELINE = "popular"  # the report key of the popularity baseline (top-10 training targets)
Key = TypeVar("Key", bound=Hashable)


def normalize_title(title: str) -> str:
    """Grounding form of a title: surrounding whitespace, then double quotes, then
    whitespace again removed (``' "Abbey Road"\\n'`` → ``'Abbey Road'``)."""
    return title.strip().strip('"').strip()


def rank_of_first_hit(predicted_titles: Sequence[str], target: str) -> int | None:
    """0-based index of the first prediction equal to ``target`` after
    :func:`normalize_title` on both sides; ``None`` when no prediction matches."""
    wanted = normalize_title(target)
    for rank, title in enumerate(predicted_titles):
        if normalize_title(title) == wanted:
            return rank
    return None


def _check_rank_and_k(rank: int | None, k: int) -> None:
    if k < 1:
        raise ValueError(f"expected k >= 1, got {k}")
    if rank is not None and rank < 0:
        raise ValueError(f"expected a rank >= 0 or None, got {rank}")


def hr_at(rank: int | None, k: int) -> float:
    """Hit ratio of one row: 1 when the hit is in the top ``k`` (``rank < k``), else 0."""
    _check_rank_and_k(rank, k)
    return 1.0 if rank is not None and rank < k else 0.0


def ndcg_at(rank: int | None, k: int) -> float:
    """NDCG of one row with one relevant item: ``1 / log2(rank + 2)`` when ``rank < k``."""
    _check_rank_and_k(rank, k)
    return 1.0 / math.log2(rank + 2) if rank is not None and rank < k else 0.0


def ranking_metrics(
    ranks: Sequence[int | None], ks: Sequence[int] = DEFAULT_KS
) -> dict[str, float]:
    """Means over all rows of HR@K and NDCG@K: keys ``hr@{k}`` for every k, then
    ``ndcg@{k}`` for every k (``hr@5, hr@10, ndcg@5, ndcg@10`` by default)."""
    if len(ranks) == 0:
        raise ValueError("expected at least one rank, got none")
    per_row = _per_row_metrics(ranks, ks)
    return {name: float(np.mean(values)) for name, values in per_row.items()}


def _per_row_metrics(
    ranks: Sequence[int | None], ks: Sequence[int]
) -> dict[str, list[float]]:
    out = {f"hr@{k}": [hr_at(r, k) for r in ranks] for k in ks}
    out.update({f"ndcg@{k}": [ndcg_at(r, k) for r in ranks] for k in ks})
    return out


def bootstrap_interval(
    values: Sequence[float], *, resamples: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values``.

    Draws ``resamples`` resamples of size n with replacement (numpy ``default_rng(seed)``,
    so the same inputs give the same interval) and returns the ``(1 - level) / 2`` and
    ``(1 + level) / 2`` quantiles of their means.
    """
    data = np.asarray(values, dtype=np.float64)
    if data.ndim != 1 or data.size == 0:
        raise ValueError(f"expected a non-empty 1-D sequence of values, got shape {data.shape}")
    if resamples < 1:
        raise ValueError(f"expected resamples >= 1, got {resamples}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"expected 0 < level < 1, got {level}")
    rng = np.random.default_rng(seed)
    indices = rng.integers(0, data.size, size=(resamples, data.size))
    means = data[indices].mean(axis=1)
    lo, hi = np.quantile(means, [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
    return float(lo), float(hi)


def paired_bootstrap_difference(
    values: Sequence[float], baseline: Sequence[float], *, resamples: int = 1000,
    seed: int = 0, level: float = 0.95
) -> dict[str, float]:
    """Mean of ``values - baseline`` (one pair per row, e.g. two models' HR@10 on the same
    test rows) and its percentile-bootstrap interval, resampling rows (pairs) together.

    Returns ``{"diff", "lo", "hi"}``; far tighter than comparing two unpaired intervals
    when both models get the same rows right or wrong.
    """
    a = np.asarray(values, dtype=np.float64)
    b = np.asarray(baseline, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"expected paired values of one shape, got {a.shape} and {b.shape}")
    lo, hi = bootstrap_interval(a - b, resamples=resamples, seed=seed, level=level)
    return {"diff": float(np.mean(a - b)), "lo": lo, "hi": hi}


def interval_relation(interval: Sequence[float], reference: Sequence[float]) -> str:
    """"above", "below" or "overlaps": where ``[lo, hi]`` lies against ``reference``."""
    lo, hi = interval
    ref_lo, ref_hi = reference
    if lo > ref_hi:
        return "above"
    if hi < ref_lo:
        return "below"
    return "overlaps"


def summarize(
    ranks: Sequence[int | None],
    popular_flags: Sequence[bool] | None = None,
    *,
    seed: int = 0,
) -> dict[str, float | int | list[float]]:
    """Flat, JSON-ready report of a test run.

    Keys: ``n`` (rows); ``hr@5, hr@10, ndcg@5, ndcg@10``; ``{metric}_ci`` = ``[lo, hi]``,
    the 95% percentile-bootstrap interval (1000 resamples, ``seed``). With
    ``popular_flags`` (one per row: is the row's target a popular item), also
    ``{metric}_popular`` / ``{metric}_unpopular`` and ``n_popular`` / ``n_unpopular``;
    a group with no rows contributes no keys.
    """
    if len(ranks) == 0:
        raise ValueError("expected at least one rank, got none")
    per_row = _per_row_metrics(ranks, DEFAULT_KS)
    report: dict[str, float | int | list[float]] = {"n": len(ranks)}
    for name, values in per_row.items():
        report[name] = float(np.mean(values))
    for name, values in per_row.items():
        report[f"{name}_ci"] = list(bootstrap_interval(values, seed=seed))
    if popular_flags is None:
        return report
    if len(popular_flags) != len(ranks):
        raise ValueError(
            f"expected one popular flag per rank ({len(ranks)}), got {len(popular_flags)}"
        )
    for group, wanted in (("popular", True), ("unpopular", False)):
        rows = [r for r, flag in zip(ranks, popular_flags, strict=True) if bool(flag) == wanted]
        if not rows:
            continue
        report[f"n_{group}"] = len(rows)
        for name, value in ranking_metrics(rows, DEFAULT_KS).items():
            report[f"{name}_{group}"] = value
    return report


def popular_items(frequencies: Mapping[Key, int], fraction: float = 0.2) -> set[Key]:
    """The most frequent ``fraction`` of the catalogue (LatentR³ App. D: "based on the
    frequency of items in the training set, we consider the top 20% of items as popular").

    ``frequencies`` holds every catalogue item, n in all, with its count as a training
    target (0 if never one): :func:`fastlatent.data.sources.catalogue_frequencies`. The
    items are ranked by count, descending; items of equal count keep their order in
    ``frequencies`` (catalogue_frequencies: first appearance as a training target, so a
    tie at the cut goes to the item that reached the count first). The first
    ``ceil(fraction * n)`` are popular, except that an item never seen in training is
    never popular. ``fraction * n`` is rounded to 9 decimals before the ceiling so that
    float error (0.2 * 15 = 3.0000000000000004) does not add an item.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"expected 0 < fraction <= 1, got {fraction}")
    negative = {key: count for key, count in frequencies.items() if count < 0}
    if negative:
        raise ValueError(f"expected non-negative frequencies, got {negative}")
    ranked = sorted(frequencies, key=lambda key: -frequencies[key])  # stable: ties keep order
    keep = math.ceil(round(fraction * len(ranked), 9))
    return {key for key in ranked[:keep] if frequencies[key] > 0}
