"""Learning-rate schedules and the choice of training / early-stopping / evaluation rows."""

from __future__ import annotations

import math

import pytest
import torch

from fastlatent.config import build_config
from fastlatent.optim import fitted_warmup, make_scheduler
from fastlatent.pipeline import choose_splits


def lr_factors(stage: str, warmup: int, total: int) -> list[float]:
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1.0)
    scheduler = make_scheduler(optimizer, stage, warmup, total)
    factors = []
    for _ in range(total + 1):
        factors.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return factors


def test_sft_schedule_is_hf_linear_warmup_then_linear_decay():
    # transformers' get_linear_schedule_with_warmup: step/warmup, then (total-s)/(total-w)
    assert lr_factors("sft", 2, 6) == pytest.approx([0.0, 0.5, 1.0, 0.75, 0.5, 0.25, 0.0])


def test_rl_schedule_is_hf_linear_warmup_then_cosine():
    f = lr_factors("rl", 2, 6)
    assert f[:3] == pytest.approx([0.0, 0.5, 1.0])
    assert f[4] == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f[6] == pytest.approx(0.0, abs=1e-12)


def test_warmup_longer_than_the_run_is_scaled_to_the_release_share():
    # amazon-cds trained on valid: ~183 RL steps against the release's 200 warm-up steps
    warmup, note = fitted_warmup(200, 183, "rl")
    assert warmup == round(200 / 1539 * 183) == 24
    assert "200" in note and "183" in note and "24" in note
    assert fitted_warmup(200, 1539, "rl") == (200, None)
    assert fitted_warmup(20, 8, "sft") == (1, fitted_warmup(20, 8, "sft")[1])
    assert fitted_warmup(20, 8, "sft")[1] is not None
    assert fitted_warmup(1, 8, "sft") == (1, None)
    with pytest.raises(ValueError, match="stage"):
        fitted_warmup(1, 8, "eval")



def test_a_warmup_as_given_is_kept():
    """--rl-warmup-fit as-given keeps a warm-up longer than the run instead of fitting it
    to the release's share (the stage's use of it: test_training_trains)."""
    from fastlatent.train import parse_config

    warmup, note = fitted_warmup(200, 40, "rl", "as-given")
    assert warmup == 200 and "never reaches" in note
    assert fitted_warmup(5, 40, "rl", "as-given") == (5, None)
    with pytest.raises(ValueError, match="fit"):
        fitted_warmup(5, 40, "rl", "literal")
    cfg = parse_config(["--preset", "smoke", "--rl-warmup-steps", "50",
                        "--rl-warmup-fit", "as-given"]).rl
    assert (cfg.rl_warmup_steps, cfg.rl_warmup_fit) == (50, "as-given")


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
