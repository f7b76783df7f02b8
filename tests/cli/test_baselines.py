"""`python -m fastlatent.baselines` and its RecBole shims: each shim, the ranking -> metrics
path by hand, the rows handed to RecBole, and one tiny SASRec run end to end."""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import subprocess
import sys
import warnings

import pytest
import torch

from fastlatent import recbole_compat
from fastlatent.baselines import (
    MODELS,
    build_parser,
    distinct_top_titles,
    main,
    score_predictions,
    sequence_rows,
    top_titles,
)
from fastlatent.data.example import Catalogue, Example
from fastlatent.errors import DataError
from fastlatent.recbole_compat import BaselineSetupError

needs_recbole = pytest.mark.skipif(
    importlib.util.find_spec("recbole") is None,
    reason="RecBole is not installed (pip install -e '.[baselines]')")
SMALL = ["--data", "synthetic", "--train-split", "train", "--eval-split", "test",
         "--eval-limit", "12"]


# ---------------------------------------------------------------- the shims


def test_numpy_aliases_exist_after_restoring():
    import numpy as np

    added = recbole_compat.restore_numpy_aliases()
    try:
        for alias, target in recbole_compat.NUMPY_ALIASES.items():
            assert getattr(np, alias) is getattr(np, target), alias
        assert recbole_compat.restore_numpy_aliases() == []  # a second call sets nothing
    finally:
        for alias in added:
            delattr(np, alias)


def test_pandas_check_names_the_fix():
    recbole_compat.check_pandas("2.3.3")
    with pytest.raises(BaselineSetupError, match=r"pandas 3\.0\.1 .*pip install 'pandas<3'"):
        recbole_compat.check_pandas("3.0.1")


def test_missing_recbole_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "recbole", None)  # find_spec then reports it missing
    with pytest.raises(BaselineSetupError, match=r"pip install -e '\.\[baselines\]'"):
        recbole_compat.check_recbole_installed()
    assert main([*SMALL, "--models", "sasrec", "--output-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install -e '.[baselines]'" in err


def test_recbole_session_puts_everything_back(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["prog", "--epochs=3"])
    root = logging.getLogger()
    before = (os.getcwd(), list(root.handlers), root.level)
    with recbole_compat.recbole_session(tmp_path / "work") as work:
        assert os.getcwd() == str(work) and sys.argv == ["prog"]
        logging.getLogger().info("\x1b[1;35mcoloured\x1b[0m line")
        warnings.warn("a RecBole warning", FutureWarning, stacklevel=1)
        (work / "written-here").touch()  # a relative path lands in the work folder
    assert (os.getcwd(), list(root.handlers), root.level) == before
    assert sys.argv == ["prog", "--epochs=3"]
    log = (tmp_path / "work" / recbole_compat.LOG_FILE).read_text()
    assert "coloured line" in log and "\x1b" not in log and "a RecBole warning" in log
    assert (tmp_path / "work" / "written-here").is_file()


@needs_recbole
def test_in_memory_trainer_reloads_the_best_state(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    trainer = object.__new__(recbole_compat.in_memory_trainer())  # no RecBole set-up needed
    trainer.model = torch.nn.Linear(3, 2)
    with pytest.raises(RuntimeError, match="expected a best state"):
        trainer.load_best()
    best = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer._save_checkpoint(4, verbose=True)  # what RecBole calls when validation improves
    with torch.no_grad():
        trainer.model.weight.add_(1.0)
        trainer.model.bias.zero_()
    trainer.load_best()
    assert trainer.best_epoch == 4
    for name, value in trainer.model.state_dict().items():
        assert torch.equal(value, best[name]), name
    assert list(tmp_path.iterdir()) == []  # nothing saved to disk


@needs_recbole
def test_importing_recbole_leaves_anomaly_detection_as_it_was():
    """RecBole's sine.py turns torch's anomaly detection on at import; in a fresh process
    (the suite's may have imported RecBole already) it must stay off, and on when on."""
    code = ("import torch; from fastlatent import recbole_compat as c; "
            "torch.autograd.set_detect_anomaly({on}); c.import_recbole(); "
            "import recbole.model.sequential_recommender.sine; "
            "print(torch.is_anomaly_enabled())")
    for on in (False, True):
        done = subprocess.run([sys.executable, "-c", code.format(on=on)],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        assert done.stdout.strip().splitlines()[-1] == str(on)


@needs_recbole
def test_recbole_config_leaves_the_cuda_devices_alone(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "7")
    recbole = recbole_compat.import_recbole()
    with recbole_compat.recbole_session(tmp_path):
        config = recbole_compat.make_recbole_config(
            recbole["Config"], recbole["sequential_models"].SASRec, "x",
            {"data_path": str(tmp_path), "train_neg_sample_args": None, "repeatable": True},
            "cpu")
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "7"
    assert config["device"] == torch.device("cpu") and config["hidden_size"] == 64


# ---------------------------------------------------------------- ranking -> metrics


def test_hand_made_ranking_gives_the_hand_computed_metrics():
    # catalogue ids 0..11; id 2 repeats id 0's title, as Amazon's duplicate titles do
    titles = ["A", "B", "A", "C", "D", "E", "F", "G", "H", "I", "J", "K"]
    # RecBole's internal ids: 0 is padding, internal i names catalogue id 12 - i
    id_tokens = ["[PAD]"] + [str(12 - i) for i in range(1, 13)]
    by_item = {0: 9.0, 2: 8.5, 1: 8.0, 3: 7.0, 4: 6.0, 5: 5.9, 6: 5.8, 7: 5.7, 8: 5.6,
               9: 5.5, 10: 5.0, 11: 5.0}  # 10 and 11 tie: the lower internal id (11) first
    scores = torch.zeros(1, 13)
    scores[0, 0] = 100.0  # padding scores highest and must still be left out
    for item, score in by_item.items():
        scores[0, 12 - item] = score
    [predicted] = top_titles(scores, id_tokens, titles)
    assert predicted == ["A", "B", "C", "D", "E", "F", "G", "H", "I", "K"]

    rows = [Example(f"u{i}", ("B",), target, target_item=item)
            for i, (target, item) in enumerate([("A", 2), ("C", 3), ("K", 11), ("J", 10),
                                                ("B", 1)])]
    metrics, out = score_predictions("sasrec", rows, [predicted] * 5, {2}, seed=0)
    assert [r["rank"] for r in out] == [0, 2, 9, None, 1]  # "A" hits through either id
    assert metrics["hr@5"] == pytest.approx(3 / 5) and metrics["hr@10"] == pytest.approx(4 / 5)
    ndcg5 = (1 + 1 / math.log2(4) + 1 / math.log2(3)) / 5
    assert metrics["ndcg@5"] == pytest.approx(ndcg5)
    assert metrics["ndcg@10"] == pytest.approx(ndcg5 + 1 / math.log2(11) / 5)
    assert metrics["n_popular"] == 1 and metrics["hr@10_popular"] == 1.0
    assert metrics["hr@10_ci"][0] <= metrics["hr@10"] <= metrics["hr@10_ci"][1]
    assert out[3] == {"stage": "sasrec", "user": "u3", "history": ["B"], "target": "J",
                      "rank": None, "predictions": predicted}


def test_distinct_titles_use_the_grounding_form_and_stop_early():
    titles = ["A", ' "A" ', "B"]
    assert distinct_top_titles(iter([1, 0, 2]), titles, k=2) == [' "A" ', "B"]
    assert distinct_top_titles([0, 1], titles, k=5) == ["A"]  # fewer when the items run out


# ---------------------------------------------------------------- rows given to RecBole


def test_rows_map_titles_to_ids_only_when_unambiguous():
    catalogue = Catalogue(("A", "B", "A", "C"))
    train = [Example("x", ("B",), "C"), Example("y", ("B", "C"), "B", target_item=1)]
    rows = sequence_rows(train, [Example("x", ("C",), "B")], [Example("z", ("B",), "C")],
                         catalogue)
    assert [(r.user, r.items, r.target) for r in rows.train] == [("u0", (1,), 3),
                                                                ("u1", (1, 3), 1)]
    assert rows.valid[0].user == "u0" and rows.test[0].user == "u2"
    assert rows.notes == ["4 rows carry no item ids: their titles were mapped to catalogue "
                          "ids (each such title names one catalogue item)"]
    ambiguous = train + [Example("w", ("A",), "B")]
    with pytest.raises(DataError, match=r"training row 3 .*'A' names several catalogue items"):
        sequence_rows(ambiguous, [], [Example("z", ("B",), "C")], catalogue)
    with_ids = [Example("w", ("A", "B"), "C", target_item=3, history_items=(2, 1))]
    assert sequence_rows(with_ids, with_ids, with_ids, catalogue).train[0].items == (2, 1)
    wrong = [Example("w", ("B",), "C", target_item=3, history_items=(0,))]
    with pytest.raises(DataError, match=r"evaluation row 1 .*history id 0 is 'A'"):
        sequence_rows(with_ids, with_ids, wrong, catalogue)


def test_empty_histories_are_dropped_from_training_and_ranked_by_popularity():
    catalogue = Catalogue(("A", "B", "C"))
    train = [Example("x", (), "A", 0), Example("y", ("A",), "B", 1)]
    evaluation = [Example("x", ("A",), "C", 2), Example("y", (), "B", 1),
                  Example("z", ("B",), "C", 2)]
    rows = sequence_rows(train, train[1:], evaluation, catalogue)
    assert len(rows.train) == 1 and rows.test_rows == [0, 2]
    assert "1 of 2 training rows have an empty history (rows 1): dropped" in rows.notes[0]
    assert "1 of 3 evaluation rows" in rows.notes[1] and "ranked by popularity" in rows.notes[1]
    with pytest.raises(DataError, match="every early-stopping row has an empty history"):
        sequence_rows(train, train[:1], evaluation, catalogue)


def test_synthetic_rows_carry_ids_that_name_their_titles(synthetic_dataset):
    titles = synthetic_dataset.catalogue.titles
    for ex in synthetic_dataset.split("train"):
        assert tuple(titles[i] for i in ex.history_items) == ex.history and ex.history


# ---------------------------------------------------------------- command line


def test_every_flag_has_help_text_and_the_models_are_listed():
    for action in build_parser()._actions:
        if action.dest != "help":
            assert action.help and len(action.help) > 20, action.dest
    assert list(MODELS)[:3] == ["sasrec", "gru4rec", "caser"]


@pytest.mark.parametrize("flags, message", [
    (["--models", "sasrec,word2vec"], "expected names among sasrec, gru4rec, caser"),
    (["--epochs", "0"], "--epochs 0: expected a positive integer"),
    (["--device", "tpu"], "expected cpu, cuda or cuda:N"),
    (["--train-split", "nope", "--models", "sasrec"], "has no split 'nope'"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, flags, message):
    out = tmp_path / "o"
    assert main([*SMALL, "--output-dir", str(out), *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err
    assert not (out / "metrics.json").exists()


@needs_recbole
@pytest.mark.slow
def test_sasrec_end_to_end_on_the_llm_rows_then_resumes(tmp_path, capsys):
    from fastlatent.config import build_config
    from fastlatent.data.sources import load_dataset
    from fastlatent.pipeline import choose_splits

    out, cwd = tmp_path / "out", tmp_path / "cwd"
    cwd.mkdir()
    argv = [*SMALL, "--models", "sasrec", "--epochs", "2", "--output-dir", str(out)]
    probe = ("import sys; from fastlatent.baselines import main; rc = main(sys.argv[1:]); "
             "print('imported:', 'recbole.quick_start' in sys.modules, 'ray' in sys.modules); "
             "sys.exit(rc)")
    done = subprocess.run([sys.executable, "-c", probe, *argv], cwd=cwd, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "imported: False False" in done.stdout  # never recbole.quick_start, never ray
    assert "sasrec epoch 1/2" in done.stdout and "popular" in done.stdout
    assert list(cwd.iterdir()) == []  # RecBole wrote nothing in the working directory
    assert (out / "recbole" / recbole_compat.LOG_FILE).is_file()

    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics) == ["sasrec", "popular"]
    sasrec = metrics["sasrec"]
    for key in ("hr@5", "hr@10", "ndcg@5", "ndcg@10"):
        assert 0.0 <= sasrec[key] <= 1.0 and len(sasrec[f"{key}_ci"]) == 2
        assert key in metrics["popular"]
    assert sasrec["n"] == 12 and sasrec["epochs"] == 2 and 1 <= sasrec["best_epoch"] <= 2
    assert sasrec["seconds"] > 0 and sasrec["hr@10_vs_popular"] in ("above", "overlaps",
                                                                      "below")
    hyper = sasrec["hyperparameters"]
    assert hyper["hidden_size"] == 64 and hyper["MAX_ITEM_LIST_LENGTH"] == 10
    assert hyper["loss_type"] == "CE" and hyper["epochs"] == 2

    cfg = build_config("", {"data": "synthetic", "train_split": "train", "eval_split": "test",
                            "eval_limit": 12, "seed": 42})
    expected = choose_splits(load_dataset("synthetic", seed=42), cfg).eval
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    for stage in ("sasrec", "popular"):
        mine = [r for r in rows if r["stage"] == stage]
        assert [(r["user"], r["target"]) for r in mine] == [(e.user, e.target) for e in expected]
        assert all(len(set(r["predictions"])) == len(r["predictions"]) == 10 for r in mine)
    assert set(rows[0]) == {"stage", "user", "history", "target", "rank", "predictions"}

    capsys.readouterr()
    assert main(argv) == 0  # a rerun is a no-op
    assert "sasrec: done already" in capsys.readouterr().out
    assert json.loads((out / "metrics.json").read_text()) == metrics
