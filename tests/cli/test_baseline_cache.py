"""``fastlatent.train --baselines``: RecBole models beside the popularity baseline, trained
once per rows by the baselines command and cached; a failure is a note, not the run's."""

from __future__ import annotations

import dataclasses
import json
import sys

import pytest

from fastlatent import baseline_cache
from fastlatent.baseline_cache import (
    BaselineChoiceError,
    BaselineRows,
    cache_key,
    cached_baselines,
    resolve_models,
)
from fastlatent.data.example import Example
from fastlatent.train import format_table, main

METRICS = ("hr@5", "hr@10", "ndcg@5", "ndcg@10")


def rows(**changes) -> BaselineRows:
    ex = [Example(user=f"u{i}", history=("A", "B"), target="C", target_item=2,
                  history_items=(0, 1)) for i in range(3)]
    base = BaselineRows(data="synthetic", train_split="train", eval_split="test",
                        eval_limit=12, seed=42, epochs=2, train=ex, valid=ex[:1],
                        evaluation=ex[1:])
    return dataclasses.replace(base, **changes)


def test_the_key_follows_every_setting_and_every_row():
    key = cache_key(rows(), ["sasrec"])
    assert key == cache_key(rows(), ["sasrec"])
    other_row = Example(user="u0", history=("A", "B"), target="D", target_item=3,
                        history_items=(0, 1))
    changed = [rows(seed=1), rows(epochs=3), rows(eval_limit=0), rows(data="csv:x"),
               rows(train=[other_row, *rows().train[1:]]), rows(valid=rows().train[:2])]
    keys = {cache_key(r, ["sasrec"]) for r in changed} | {cache_key(rows(), ["gru4rec"])}
    assert key not in keys and len(keys) == len(changed) + 1


def test_auto_none_and_names(monkeypatch):
    monkeypatch.setattr(baseline_cache, "recbole_installed", lambda: True)
    assert resolve_models("auto") == (("sasrec",), None)
    assert resolve_models("none") == ((), None)
    assert resolve_models(" SASRec, caser,sasrec") == (("sasrec", "caser"), None)
    with pytest.raises(BaselineChoiceError, match="expected auto, none or names.*foo"):
        resolve_models("sasrec,foo")
    monkeypatch.setattr(baseline_cache, "recbole_installed", lambda: False)
    models, note = resolve_models("auto")
    assert models == () and "pip install -e '.[baselines]'" in note
    with pytest.raises(BaselineChoiceError, match="RecBole is not installed"):
        resolve_models("sasrec")


def fake_command(entries: dict, exit_code: int = 0):
    """A stand-in for the baselines command that writes ``entries`` as its metrics.json."""
    def command(rows, models, output_dir):
        script = ("import json, pathlib, sys; out = pathlib.Path(sys.argv[1]); "
                  "out.mkdir(parents=True); (out / 'metrics.json').write_text(sys.argv[2]); "
                  "print('trained'); sys.exit(int(sys.argv[3]))")
        return [sys.executable, "-c", script, str(output_dir), json.dumps(entries),
                str(exit_code)]
    return command


def entry(hr10: float) -> dict:
    return {"n": 2, **{k: hr10 for k in METRICS}, **{f"{k}_ci": [0.0, 1.0] for k in METRICS}}


def test_computed_once_then_read_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(baseline_cache, "command", fake_command({"sasrec": entry(0.5)}))
    first = cached_baselines(rows(), ["sasrec"], tmp_path / "run" / "baselines.log",
                             cache_root=tmp_path / "cache", announce=lambda _: None)
    assert first.error is None and not first.cached and first.entries["sasrec"]["hr@10"] == 0.5
    assert "trained" in (tmp_path / "run" / "baselines.log").read_text()
    monkeypatch.setattr(baseline_cache, "command", fake_command({}, exit_code=9))
    again = cached_baselines(rows(), ["sasrec"], tmp_path / "log2",
                             cache_root=tmp_path / "cache", announce=lambda _: None)
    assert again.cached and again.entries == first.entries and not (tmp_path / "log2").exists()
    assert [p.name for p in (tmp_path / "cache" / "baselines").iterdir()] == [first.folder.name]


@pytest.mark.parametrize("exit_code, entries", [(3, {"sasrec": entry(0.5)}), (0, {})],
                         ids=["exit-3", "no-entry"])
def test_a_failed_command_leaves_no_cache_entry(tmp_path, monkeypatch, exit_code, entries):
    monkeypatch.setattr(baseline_cache, "command", fake_command(entries, exit_code))
    outcome = cached_baselines(rows(), ["sasrec"], tmp_path / "baselines.log",
                               cache_root=tmp_path / "cache", announce=lambda _: None)
    assert outcome.entries == {} and f"exited {exit_code}" in outcome.error
    assert str(tmp_path / "baselines.log") in outcome.error
    assert list((tmp_path / "cache" / "baselines").iterdir()) == []


def test_table_puts_each_stage_against_popularity_and_sasrec():
    def stage(hr10, lo, hi, **relations):
        return {"n": 50, **{k: hr10 for k in METRICS}, **{f"{k}_ci": [lo, hi] for k in METRICS},
                **{f"hr@10_vs_{name}": r for name, r in relations.items()}}

    table = format_table({"popular": stage(0.04, 0.0, 0.1),
                          "sasrec": stage(0.3, 0.2, 0.4, popular="above"),
                          "sft": stage(0.2, 0.12, 0.3, popular="above", sasrec="overlaps")})
    lines = table.splitlines()
    assert "HR@10 vs popular" in lines[0] and "HR@10 vs sasrec" in lines[0]
    assert lines[2].startswith("sft") and lines[2].split()[-2:] == ["above", "overlaps"]
    assert lines[3].startswith("sasrec") and lines[3].split()[-2:] == ["above", "(baseline)"]
    assert lines[4].startswith("popular") and lines[4].endswith("(baseline)")
    assert "sasrec = RecBole" in lines[-1]


def test_unknown_baseline_is_one_line_before_loading(tmp_path, capsys):
    assert main(["--preset", "smoke", "--baselines", "sasrec,popularity",
                 "--output-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --baselines 'sasrec,popularity'")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_trainer_reports_what_the_baselines_command_computes(tmp_path, monkeypatch):
    """The trainer's SASRec entry equals ``python -m fastlatent.baselines`` run by hand on
    the same data, splits, rows and epochs; a failing baseline leaves the run complete."""
    from fastlatent import baselines

    monkeypatch.setenv("FASTLATENT_CACHE", str(tmp_path / "cache"))
    flags = ["--preset", "smoke", "--stage", "sft", "--sft-epochs", "1"]
    assert main([*flags, "--output-dir", str(tmp_path / "run")]) == 0
    run = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert run["sft"]["hr@10_vs_sasrec"] in ("above", "overlaps", "below")
    assert baselines.main(["--data", "synthetic", "--eval-limit", "12", "--epochs", "2",
                           "--models", "sasrec", "--output-dir", str(tmp_path / "by-hand")]) == 0
    by_hand = json.loads((tmp_path / "by-hand" / "metrics.json").read_text())
    for key in (*METRICS, *(f"{k}_ci" for k in METRICS), "n", "best_epoch"):
        assert run["sasrec"][key] == by_hand["sasrec"][key], key
    log = (tmp_path / "run" / "log.jsonl").read_text().splitlines()
    events = [json.loads(line) for line in log]
    assert any(e["stage"] == "sasrec" and e["event"] == "eval" and "hr@10" in e for e in events)

    monkeypatch.setattr(baseline_cache, "command", fake_command({}, exit_code=4))
    assert main([*flags, "--seed", "7", "--output-dir", str(tmp_path / "failing")]) == 0
    failing = tmp_path / "failing"
    assert set(json.loads((failing / "metrics.json").read_text())) == {"sft", "popular"}
    notes = json.loads((failing / "run.json").read_text())["notes"]
    assert any("baselines sasrec not reported" in note for note in notes)
