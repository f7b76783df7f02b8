"""Ranking metrics on hand-computed rankings, grounding, bootstrap, popularity split."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from fastlatent.metrics import (
    bootstrap_interval,
    hr_at,
    ndcg_at,
    popular_items,
    rank_of_first_hit,
    ranking_metrics,
    summarize,
)

RANKS = [0, 1, None, 4, 9]


def test_ranking_metrics_by_hand():
    got = ranking_metrics(RANKS)
    assert list(got) == ["hr@5", "hr@10", "ndcg@5", "ndcg@10"]
    assert got["hr@5"] == pytest.approx(3 / 5)  # ranks 0, 1, 4
    assert got["hr@10"] == pytest.approx(4 / 5)  # ... and 9
    ndcg5 = (1.0 + 1.0 / math.log2(3) + 1.0 / math.log2(6)) / 5
    assert got["ndcg@5"] == pytest.approx(ndcg5)
    assert got["ndcg@10"] == pytest.approx(ndcg5 + 1.0 / math.log2(11) / 5)
    assert got["ndcg@5"] == pytest.approx(0.40356, abs=1e-5)  # (1 + 0.63093 + 0.38685) / 5


def test_single_row_functions_at_the_boundary():
    assert hr_at(4, 5) == 1.0 and hr_at(5, 5) == 0.0 and hr_at(None, 5) == 0.0
    assert ndcg_at(0, 1) == 1.0
    assert ndcg_at(2, 5) == pytest.approx(0.5)  # 1 / log2(4)
    assert ndcg_at(5, 5) == 0.0 and ndcg_at(None, 10) == 0.0
    with pytest.raises(ValueError, match="expected k >= 1"):
        hr_at(0, 0)
    with pytest.raises(ValueError, match="expected a rank"):
        ndcg_at(-1, 5)


def test_custom_ks_and_empty_ranks():
    assert ranking_metrics([0, 2], ks=(1,)) == {"hr@1": 0.5, "ndcg@1": 0.5}
    with pytest.raises(ValueError, match="expected at least one rank"):
        ranking_metrics([])


def test_grounding_strips_quotes_and_whitespace():
    predictions = ['"Kind of Blue"\n', ' "Abbey Road" ', "Abbey Road Deluxe", '"Abbey Road"']
    assert rank_of_first_hit(predictions, "Abbey Road") == 1
    assert rank_of_first_hit(predictions, ' "Kind of Blue" ') == 0
    assert rank_of_first_hit(predictions, "abbey road") is None  # case matters
    assert rank_of_first_hit(predictions, "Abbey") is None  # exact match, not a prefix
    assert rank_of_first_hit([], "Abbey Road") is None


def test_duplicate_titles_first_index_counts():
    predictions = ["Greatest Hits", "Other", '"Greatest Hits"', "Greatest Hits"]
    assert rank_of_first_hit(predictions, "Greatest Hits") == 0
    assert rank_of_first_hit(["Other", *predictions], "Greatest Hits") == 1


def test_bootstrap_is_seeded_and_contains_the_mean():
    rng = np.random.default_rng(123)
    values = (rng.random(200) < 0.3).astype(float)
    lo, hi = bootstrap_interval(values, seed=7)
    assert values.mean() == pytest.approx(0.36)
    assert 0.28 < lo < 0.36 < hi < 0.44  # about ±1.96·√(0.36·0.64/200) = ±0.067
    assert bootstrap_interval(values, seed=7) == (lo, hi)
    assert bootstrap_interval(values, seed=8) != (lo, hi)
    narrow = bootstrap_interval(values, seed=7, level=0.5)
    assert lo < narrow[0] < narrow[1] < hi


def test_bootstrap_width_matches_normal_theory():
    # 95% interval of a mean of n Bernoulli(0.5) rows is about ±1.96·0.5/√n.
    values = [0.0, 1.0] * 500
    lo, hi = bootstrap_interval(values, resamples=4000)
    assert (hi - lo) / 2 == pytest.approx(1.96 * 0.5 / math.sqrt(1000), rel=0.1)


def test_bootstrap_constant_values_and_bad_input():
    assert bootstrap_interval([0.25] * 10) == (0.25, 0.25)
    with pytest.raises(ValueError, match="expected a non-empty"):
        bootstrap_interval([])
    with pytest.raises(ValueError, match="expected 0 < level < 1"):
        bootstrap_interval([1.0], level=1.0)


def test_summarize_overall_and_groups():
    flags = [True, False, False, True, False]
    report = summarize(RANKS, flags)
    assert report["n"] == 5
    assert report["hr@5"] == pytest.approx(0.6)
    for name in ("hr@5", "hr@10", "ndcg@5", "ndcg@10"):
        lo, hi = report[f"{name}_ci"]
        assert lo <= report[name] <= hi
    # popular rows: ranks 0 and 4; unpopular rows: 1, None, 9.
    assert report["n_popular"] == 2 and report["n_unpopular"] == 3
    assert report["hr@5_popular"] == 1.0
    assert report["ndcg@5_popular"] == pytest.approx((1.0 + 1.0 / math.log2(6)) / 2)
    assert report["hr@5_unpopular"] == pytest.approx(1 / 3)
    assert report["hr@10_unpopular"] == pytest.approx(2 / 3)
    assert report["ndcg@10_unpopular"] == pytest.approx(
        (1.0 / math.log2(3) + 1.0 / math.log2(11)) / 3
    )
    json.dumps(report)  # flat and serialisable


def test_summarize_without_flags_and_with_an_empty_group():
    plain = summarize(RANKS)
    assert not any("popular" in key for key in plain)
    assert len(plain) == 1 + 4 + 4
    only_popular = summarize(RANKS, [True] * 5)
    assert only_popular["hr@5_popular"] == pytest.approx(0.6)
    assert not any(key.endswith("_unpopular") or key == "n_unpopular" for key in only_popular)
    with pytest.raises(ValueError, match="expected one popular flag per rank"):
        summarize(RANKS, [True])
    with pytest.raises(ValueError, match="expected at least one rank"):
        summarize([])


def test_popular_items_top_fraction_of_the_catalogue_ties_by_first_appearance():
    # 11 catalogue items in first-appearance order; item04 was never a training target.
    counts = {f"item{i:02d}": c for i, c in enumerate([9, 1, 5, 5, 0, 3, 2, 2, 7, 1, 4])}
    # ceil(0.2 * 11) = 3 of the catalogue (not of the 10 seen items: that is 2): the counts
    # 9 and 7, then the tie at 5 goes to item02, which appears first.
    assert popular_items(counts) == {"item00", "item08", "item02"}
    # The tie follows the mapping's order, not the keys' order.
    reordered = {"item03": 5, **{k: v for k, v in counts.items() if k != "item03"}}
    assert popular_items(reordered) == {"item00", "item08", "item03"}
    # A catalogue mostly never seen: the top 20% would reach count 0, and an item never a
    # training target is never popular.
    assert popular_items({"a": 2, "b": 0, "c": 0, "d": 0, "e": 0, "f": 0}, 0.5) == {"a"}


def test_catalogue_frequencies_hold_every_item_in_tie_breaking_order():
    from fastlatent.data.example import Catalogue, Example
    from fastlatent.data.sources import catalogue_frequencies

    catalogue = Catalogue(("t0", "t1", "t2", "t3", "t4"))

    def row(item):
        return Example(user="u", history=("t0",), target=catalogue.titles[item],
                       target_item=item)

    freq = catalogue_frequencies([row(3), row(1), row(3), row(1), row(4)], catalogue)
    assert list(freq.items()) == [(3, 2), (1, 2), (4, 1), (0, 0), (2, 0)]
    assert popular_items(freq) == {3}  # ceil(0.2 * 5) = 1; the tie at 2 goes to item 3


# ---- the popularity baseline and comparisons against it -------------------------------
def test_most_frequent_titles_counts_grounded_titles_and_breaks_ties_by_title():
    from fastlatent.data.example import Example
    from fastlatent.evaluate import most_frequent_titles

    rows = [Example(user=0, history=("a",), target=t) for t in
            ["B", ' "B" ', "C", "A", "C", "D"]]
    assert most_frequent_titles(rows, 3) == ["B", "C", "A"]  # B x2, C x2, then A < D


def test_popularity_baseline_scores_the_same_list_for_every_row():
    from fastlatent.data.example import Example
    from fastlatent.evaluate import popularity_baseline

    train = [Example(user=0, history=("x",), target=t) for t in "AAABBC"]
    rows = [Example(user=i, history=("x",), target=t) for i, t in enumerate("CAZB")]
    result = popularity_baseline(train, rows, n=2, seed=0)
    # list = [A, B]: C miss, A rank 0, Z miss, B rank 1
    assert [p["rank"] for p in result.predictions] == [None, 0, None, 1]
    assert result.metrics["hr@10"] == pytest.approx(0.5)
    assert result.metrics["ndcg@10"] == pytest.approx((1 + 1 / math.log2(3)) / 4)
    assert all(p["predictions"] == ["A", "B"] for p in result.predictions)


def test_interval_relation():
    from fastlatent.metrics import interval_relation

    assert interval_relation((0.2, 0.3), (0.05, 0.15)) == "above"
    assert interval_relation((0.0, 0.04), (0.05, 0.15)) == "below"
    assert interval_relation((0.1, 0.2), (0.05, 0.15)) == "overlaps"


def test_paired_bootstrap_difference_resamples_rows_together():
    from fastlatent.metrics import paired_bootstrap_difference

    a = [1.0, 0.0, 1.0, 1.0, 0.0] * 20
    same = paired_bootstrap_difference(a, a)
    assert same == {"diff": 0.0, "lo": 0.0, "hi": 0.0}  # identical rows: no spread at all
    b = [0.0, 0.0, 1.0, 1.0, 0.0] * 20  # a hits every row b hits, plus 20 more
    d = paired_bootstrap_difference(a, b, seed=1)
    assert d["diff"] == pytest.approx(0.2) and 0.1 < d["lo"] < 0.2 < d["hi"] < 0.3
    with pytest.raises(ValueError, match="paired"):
        paired_bootstrap_difference([1.0], [1.0, 0.0])
