"""Learning-rate schedules and the choice of training / early-stopping / evaluation rows."""

from __future__ import annotations

import math

import pytest

from fastlatent.config import build_config
from fastlatent.optim import warmup_cosine, warmup_linear_decay
from fastlatent.pipeline import choose_splits


def test_warmup_then_linear_decay():
    f = warmup_linear_decay(warmup=2, total=6)
    assert [f(s) for s in range(7)] == pytest.approx([0.5, 1.0, 1.0, 0.75, 0.5, 0.25, 0.0])


def test_warmup_then_cosine():
    f = warmup_cosine(warmup=2, total=6)
    assert f(0) == 0.5 and f(1) == 1.0 and f(2) == 1.0
    assert f(4) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(6) == pytest.approx(0.0) and f(10) == pytest.approx(0.0)


def test_training_on_valid_holds_out_a_slice_of_it_never_test(synthetic_dataset):
    cfg = build_config("smoke", {"train_split": "valid", "eval_split": "test"})
    splits = choose_splits(synthetic_dataset, cfg)
    valid = synthetic_dataset.split("valid")
    assert len(splits.train) + len(splits.valid) == len(valid)
    assert 1 <= len(splits.valid) <= math.ceil(0.05 * len(valid)) + 1
    assert {id(e) for e in splits.train + splits.valid} == {id(e) for e in valid}
    assert len(splits.eval) == 12
    test_ids = {id(e) for e in synthetic_dataset.split("test")}
    assert not test_ids & {id(e) for e in splits.valid}


def test_default_uses_the_valid_split_for_early_stopping(synthetic_dataset):
    cfg = build_config("smoke", {})
    splits = choose_splits(synthetic_dataset, cfg)
    assert splits.train == synthetic_dataset.split("train")
    assert splits.valid == synthetic_dataset.split("valid")


def test_eval_limit_is_a_seeded_sample_not_the_first_rows(synthetic_dataset):
    cfg = build_config("smoke", {"eval_limit": 10})
    a = choose_splits(synthetic_dataset, cfg).eval
    b = choose_splits(synthetic_dataset, cfg).eval
    assert a == b and len(a) == 10
    assert a != synthetic_dataset.split("test")[:10]
