"""`python -m fastlatent.train`: presets, flag precedence, outputs, bad input."""

from __future__ import annotations

import json

import pytest

from fastlatent.config import build_config
from fastlatent.testing.toy_data import write_csv_dir
from fastlatent.train import build_parser, main, parse_config

METRICS = {"hr@5", "hr@10", "ndcg@5", "ndcg@10"}


def test_explicit_flags_override_the_preset():
    cfg = parse_config(["--preset", "smoke", "--data", "csv:somewhere", "--sigma", "0.5"])
    assert cfg.run.preset == "smoke"
    assert cfg.data.data == "csv:somewhere"  # flag beats the preset's "synthetic"
    assert cfg.model.model == "tiny-random"  # preset beats the default
    assert cfg.rl.sigma == 0.5
    assert build_config("", {}).rl.num_samples == 8  # the release's K
    cpu = parse_config(["--preset", "cpu"])
    assert cpu.model.model == "smollm2-135m" and cpu.data.data == "movielens-100k"


def test_every_flag_has_help_text():
    for action in build_parser()._actions:
        if action.dest != "help":
            assert action.help and len(action.help) > 20, action.dest


def test_bad_flags_exit_with_usage(capsys):
    with pytest.raises(SystemExit):
        main(["--preset", "nope"])
    with pytest.raises(SystemExit):
        main(["--sigma", "lots"])
    assert "invalid" in capsys.readouterr().err


@pytest.mark.slow
def test_smoke_end_to_end_then_eval_from_checkpoint(tmp_path):
    out = tmp_path / "run"
    assert main(["--preset", "smoke", "--output-dir", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"sft", "rl", "popular", "sasrec"}  # [dev] has RecBole
    assert METRICS <= set(metrics["popular"]) and metrics["popular"]["n"] == 12
    assert METRICS <= set(metrics["sasrec"]) and metrics["sasrec"]["n"] == 12
    for name in ("sft", "rl"):
        stage = metrics[name]
        assert stage["hr@10_vs_popular"] in ("above", "overlaps", "below")
        assert stage["hr@10_vs_sasrec"] in ("above", "overlaps", "below")
        assert stage["target_nll"] > 0
        assert METRICS <= set(stage)
        assert {"hr@10_popular", "hr@10_unpopular", "hr@10_ci"} <= set(stage)
        assert 0.0 <= stage["ndcg@10"] <= stage["hr@10"] <= 1.0
        assert stage["n"] == 12
    for ckpt in ("sft", "rl"):
        assert (out / ckpt / "fastlatent.json").is_file()
        assert (out / ckpt / "latent_ratt.safetensors").is_file()
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["seed"] == 42 and manifest["config"]["run"]["preset"] == "smoke"
    assert manifest["versions"]["torch"] and "finished" in manifest
    events = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert any(e["stage"] == "sft" and e["event"] == "step" for e in events)
    assert sum(e["stage"] == "rl" and e["event"] == "step" for e in events) == 2
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in rows] == ["sft"] * 12 + ["rl"] * 12
    assert all(len(r["predictions"]) == 5 for r in rows)

    again = tmp_path / "eval"
    assert main(["--preset", "smoke", "--stage", "eval", "--checkpoint", str(out / "rl"),
                 "--output-dir", str(again)]) == 0
    evaluated = json.loads((again / "metrics.json").read_text())
    assert set(evaluated) == {"eval", "popular", "sasrec"}
    assert evaluated["eval"] == metrics["rl"]  # the checkpoint reproduces the run's model
    assert evaluated["popular"] == metrics["popular"]


@pytest.mark.slow
def test_smoke_on_csv_data_trained_on_valid(tmp_path):
    titles = [f"Album {c}{c}" for c in "ABCDEFGHIJ"]
    write_csv_dir(tmp_path / "data", ["valid", "test"], titles)
    out = tmp_path / "run"
    assert main(["--preset", "smoke", "--data", f"csv:{tmp_path / 'data'}",
                 "--train-split", "valid", "--eval-split", "test", "--stage", "sft",
                 "--sft-epochs", "1", "--output-dir", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"sft", "popular", "sasrec"} and metrics["sft"]["n"] == 12
    splits = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()
              if json.loads(line)["event"] == "splits"][0]
    assert splits["train"] + splits["valid"] == 24 and splits["valid"] >= 1


def test_missing_split_is_one_clear_line_and_a_failed_run(tmp_path, capsys):
    titles = ["One", "Two", "Three", "Four"]
    write_csv_dir(tmp_path / "data", ["valid", "test"], titles, rows_per_split=4)
    out = tmp_path / "run"
    assert main(["--preset", "smoke", "--data", f"csv:{tmp_path / 'data'}",
                 "--output-dir", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no split 'train'" in err[0] and "--train-split" in err[0], err
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["status"] == "failed" and "no split" in manifest["segments"][-1]["message"]
    assert not (out / ".fastlatent.lock").exists()  # the lock is released on failure


@pytest.mark.parametrize("flags, named", [
    (["--advantage", "group", "--num-samples", "1"], "--num-samples"),
    (["--rl-batch-size", "0"], "--rl-batch-size"),
    (["--sft-warmup-steps", "0"], "--sft-warmup-steps"),
    (["--rl-warmup-steps", "-3"], "--rl-warmup-steps"),
    (["--sigma", "-1"], "--sigma"),
    (["--sigma", "inf"], "--sigma"),
    (["--sft-lr", "nan"], "--sft-lr"),
    (["--sft-lr", "inf"], "--sft-lr"),
    (["--grad-clip", "nan"], "--grad-clip"),
    (["--num-samples", "0"], "--num-samples"),
    (["--save-every", "-1"], "--save-every"),
    (["--max-nonfinite-steps", "0"], "--max-nonfinite-steps"),
    (["--checkpoint", "somewhere", "--model", "smollm2-135m"], "--model"),
    (["--checkpoint", "somewhere", "--latent", "none"], "--latent"),
    (["--checkpoint", "somewhere", "--ratt-heads", "2"], "--ratt-heads"),
    (["--resume", "--overwrite"], "--resume"),
    (["--grad-clip", "0"], "--grad-clip"),
    (["--sft-epochs", "0"], "--sft-epochs"),
    (["--num-latents", "0"], "--num-latents"),
])
def test_bad_configuration_stops_before_anything_loads(flags, named, capsys, monkeypatch,
                                                       tmp_path):
    import fastlatent.model.loading as loading

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the configuration was checked")

    monkeypatch.setattr(loading, "load_llm", no_load)
    out = tmp_path / "run"
    assert main(["--preset", "smoke", "--output-dir", str(out), *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: " + named), err
    assert not out.exists()  # nothing written either


def test_the_cpu_note_shows_the_sizes_in_use():
    from fastlatent.train import demo_note

    note = demo_note(parse_config(["--preset", "cpu", "--sft-limit", "64",
                                   "--rl-max-steps", "3", "--eval-limit", "20"]))
    assert "64 SFT examples, 3 RL steps of 8 prompts, 20 evaluation users" in note


def test_a_model_that_cannot_be_loaded_is_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["--preset", "smoke", "--model", str(tmp_path / "missing.gguf"),
                 "--output-dir", str(out)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("error: --model ")
    assert "missing.gguf" in err


def test_format_table_has_the_baseline_row_and_each_stage_against_it():
    from fastlatent.train import format_table

    def stage(hr10, ci, relation=None):
        m = {"n": 50, **{k: hr10 for k in METRICS}, **{f"{k}_ci": ci for k in METRICS}}
        if relation:
            m["hr@10_vs_popular"] = relation
        return m

    table = format_table({"popular": stage(0.04, [0.0, 0.1]),
                          "sft": stage(0.2, [0.12, 0.3], "above"),
                          "rl": stage(0.06, [0.02, 0.1], "overlaps")})
    lines = table.splitlines()
    assert lines[2].startswith("sft") and lines[2].rstrip().endswith("above")
    assert lines[3].startswith("rl") and lines[3].rstrip().endswith("overlaps")
    assert lines[4].startswith("popular") and "(baseline)" in lines[4]
