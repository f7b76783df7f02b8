"""``fastlatent.recommend``: a saved model names the next titles for users, exactly as the
evaluation decodes them, from the catalogue saved with it."""

from __future__ import annotations

import json

import pytest

import fastlatent
from fastlatent.errors import CheckpointError, DataError
from fastlatent.model.reasoner import LatentReasoner
from fastlatent.recommendation import Recommender, main, recommend
from fastlatent.train import main as train

EVAL_BEAMS, EVAL_BATCH, MAX_TOKENS = 5, 4, 24  # the smoke preset's evaluation settings


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("rec") / "run"
    assert train(["--preset", "smoke", "--output-dir", str(out), "--report-to", "none"]) == 0
    return out


@pytest.fixture(scope="module")
def reasoner(run):
    return LatentReasoner.load(run / "rl")


def test_the_catalogue_travels_with_every_saved_model(run, reasoner):
    for folder in ("sft", "rl"):
        saved = json.loads((run / folder / "catalogue.json").read_text())
        assert saved["template"] == "default" and saved["domain"] == "products"
        assert len(saved["titles"]) == len(set(saved["titles"])) > 10
    assert reasoner.catalogue == saved


def test_recommend_equals_what_the_evaluation_decoded(run, reasoner):
    """The evaluation's users, in its batches: the same titles in the same order."""
    rows = [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()
            if json.loads(line)["stage"] == "rl"]
    recs = recommend(reasoner, [r["history"] for r in rows], top=EVAL_BEAMS,
                     num_beams=EVAL_BEAMS, batch_size=EVAL_BATCH, max_new_tokens=MAX_TOKENS)
    assert [r.titles for r in recs] == [row["predictions"] for row in rows]
    for rec, row in zip(recs, rows, strict=True):
        assert rec.scores == pytest.approx(row["scores"], abs=1e-5)
        assert rec.unknown_history == []


def test_titles_come_from_the_catalogue_best_first(reasoner):
    titles = set(reasoner.catalogue["titles"])
    history = reasoner.catalogue["titles"][:3]
    (rec,) = fastlatent.recommend(reasoner, [history], top=7, max_new_tokens=MAX_TOKENS)
    assert len(rec.titles) == 7 and set(rec.titles) <= titles
    assert rec.scores == sorted(rec.scores, reverse=True)


def test_unknown_history_titles_are_reported_not_guessed(reasoner):
    known = reasoner.catalogue["titles"][0]
    (rec,) = recommend(reasoner, [[known, "A Title Nobody Has", f' "{known}" ']], top=3,
                       max_new_tokens=MAX_TOKENS)
    assert rec.unknown_history == ["A Title Nobody Has"]  # quotes/spaces are not a miss


def test_bad_histories_are_named(reasoner):
    rec = Recommender.of(reasoner)
    with pytest.raises(DataError, match="history 1 is empty"):
        rec([["a"], []])
    with pytest.raises(DataError, match="history 0: expected a list of titles"):
        rec(["just one string"])
    with pytest.raises(ValueError, match="top >= 1"):
        rec([["a"]], top=0)


def test_a_model_without_catalogue_says_what_to_do(reasoner):
    saved, reasoner.catalogue = reasoner.catalogue, None
    try:
        with pytest.raises(CheckpointError, match="holds no catalogue"):
            recommend(reasoner, [["a"]])
    finally:
        reasoner.catalogue = saved


def test_cli_one_user_and_many(run, reasoner, tmp_path, capsys):
    titles = reasoner.catalogue["titles"]
    assert main(["--checkpoint", str(run / "rl"), "--history", titles[0], titles[1],
                 "--top", "3", "--json"]) == 0
    (line,) = capsys.readouterr().out.strip().splitlines()
    got = json.loads(line)
    assert got["history"] == titles[:2] and len(got["titles"]) == 3
    users = tmp_path / "users.jsonl"
    users.write_text(json.dumps({"history": titles[:2]}) + "\n\n" + json.dumps(titles[2:4])
                     + "\n")
    assert main(["--checkpoint", str(run / "rl"), "--input", str(users), "--top", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("  1. ") == 2 and out.count("  2. ") == 2
    users.write_text('{"history": "not a list"}\n')
    assert main(["--checkpoint", str(run / "rl"), "--input", str(users)]) == 1
    assert 'users.jsonl:1: expected {"history"' in capsys.readouterr().err


def test_cli_names_a_folder_that_is_not_a_checkpoint(tmp_path, capsys):
    assert main(["--checkpoint", str(tmp_path), "--history", "x"]) == 1
    assert "is not a fastlatent checkpoint" in capsys.readouterr().err


def test_the_function_and_the_command_line_share_a_name_without_a_module_swap():
    """fastlatent.recommend is a plain function; python -m fastlatent.recommend is the
    command line; importing the command-line file is refused (it would replace the
    function with a module)."""
    import subprocess
    import sys
    import types

    import fastlatent.recommendation

    assert isinstance(fastlatent.recommend, types.FunctionType)
    assert fastlatent.recommend is fastlatent.recommendation.recommend
    with pytest.raises(ImportError, match="fastlatent.recommendation"):
        import fastlatent.recommend  # noqa: F401
    assert isinstance(fastlatent.recommend, types.FunctionType)
    done = subprocess.run([sys.executable, "-m", "fastlatent.recommend", "--help"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "--checkpoint" in done.stdout
