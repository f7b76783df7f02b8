"""Trackers beside log.jsonl (--report-to) and the plots every run leaves in plots/."""

from __future__ import annotations

import json
import math

import pytest

from fastlatent import tracking
from fastlatent.config import ConfigError
from fastlatent.plots import plot_run, read_records, series
from fastlatent.runlog import StepLog
from fastlatent.train import draw_plots, main

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tracked") / "run"
    assert main(["--preset", "smoke", "--output-dir", str(out), "--report-to",
                 "tensorboard"]) == 0
    return out


def tensorboard_scalars(out):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_holds_the_numbers_of_the_log(smoke_run):
    scalars = tensorboard_scalars(smoke_run)
    records = read_records(smoke_run)
    for stage, field in (("sft", "loss"), ("sft", "grad_norm"), ("rl", "reward_r0"),
                         ("rl", "reward_all"), ("rl", "loss"), ("rl", "latent_norm_r0")):
        steps, values = series(records, stage, "step", field)
        assert len(steps) > 0
        got = scalars[f"{stage}/{field}"]
        assert [s for s, _ in got] == steps
        for (_, v), want in zip(got, values, strict=True):
            assert v == pytest.approx(want, rel=1e-6)  # TensorBoard stores float32
    epochs, valid = series(records, "sft", "epoch", "valid_loss")
    assert [v for _, v in scalars["sft/epoch/valid_loss"]] == pytest.approx(valid, rel=1e-6)
    metrics = json.loads((smoke_run / "metrics.json").read_text())
    assert scalars["rl/hr@10"][0][1] == pytest.approx(metrics["rl"]["hr@10"], rel=1e-6)


def test_every_run_leaves_its_plots(smoke_run):
    names = sorted(p.name for p in (smoke_run / "plots").iterdir())
    assert names == ["grad_norm.png", "metrics.png", "rl_latent_norm.png", "rl_reward.png",
                     "sft_loss.png"]
    for name in names:
        assert (smoke_run / "plots" / name).read_bytes()[:8] == PNG


def test_plots_redraw_from_the_files_alone(smoke_run, tmp_path):
    """Only log.jsonl and metrics.json are read: a folder holding just those two gets
    the same set of plots."""
    for name in ("log.jsonl", "metrics.json"):
        (tmp_path / name).write_bytes((smoke_run / name).read_bytes())
    written = plot_run(tmp_path)
    assert sorted(p.name for p in written) == sorted(
        p.name for p in (smoke_run / "plots").iterdir())


def test_a_resumed_run_plots_each_step_once(tmp_path):
    log = StepLog(tmp_path / "log.jsonl")
    for step, loss in ((1, 3.0), (2, 2.5), (3, 2.0), (2, 2.4), (3, 2.1)):  # resumed at 1
        log.write("sft", "step", step=step, epoch=0, loss=loss)
    log.close()
    assert series(read_records(tmp_path), "sft", "step", "loss") == ([1, 2, 3],
                                                                     [3.0, 2.4, 2.1])


def test_a_resumed_runs_redone_steps_are_marked_replayed(tmp_path):
    from fastlatent.runlog import logged_steps

    path = tmp_path / "log.jsonl"
    first = StepLog(path)
    for step in (1, 2, 3):
        first.write("sft", "step", step=step, loss=1.0)
    first.write("rl", "step", step=1, loss=1.0)
    first.write("sft", "epoch", epoch=0, valid_loss=1.0)
    first.close()
    with path.open("a") as f:
        f.write('{"stage": "rl", "event": "st')  # a line a kill cut short
    assert logged_steps(path) == {"sft": 3, "rl": 1}
    assert logged_steps(tmp_path / "none.jsonl") == {}
    resumed = StepLog(path, replay_until=logged_steps(path))
    for stage, step in (("sft", 2), ("sft", 3), ("sft", 4), ("rl", 1), ("rl", 2)):
        resumed.write(stage, "step", step=step, loss=0.5)
    resumed.write("sft", "epoch", epoch=0, valid_loss=0.5)
    resumed.close()
    lines = path.read_text().splitlines()
    assert lines[5] == '{"stage": "rl", "event": "st'  # left as it was, on its own line
    later = [json.loads(line) for line in lines[6:]]
    assert [r.get("replayed", False) for r in later] == [True, True, False, True, False,
                                                         False]
    assert series(read_records(tmp_path), "sft", "step", "loss") == ([1, 2, 3, 4],
                                                                     [1.0, 0.5, 0.5, 0.5])


def test_no_matplotlib_is_a_note_not_a_failure(tmp_path, monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    draw_plots(tmp_path)
    assert "pip install -e '.[plots]'" in capsys.readouterr().out


class StandIn:
    """Records what a wandb run / the trackio module is asked to do."""

    def __init__(self):
        self.logged, self.defined, self.finished = [], [], False

    def log(self, values, step=None):
        self.logged.append((step, values))

    def define_metric(self, name, step_metric=None):
        self.defined.append((name, step_metric))

    def finish(self):
        self.finished = True


def feed(tracker):
    tracker.record("sft", "step", {"step": 9, "epoch": 0, "loss": 1.0})
    tracker.record("rl", "step", {"step": 4, "epoch": 0, "loss": -0.2, "reward_r0": -4.1,
                                  "skipped": False, "grad_norm": math.nan, "prompts": 8})
    tracker.record("sft", "epoch", {"epoch": 1, "valid_loss": 1.5, "improved": True})
    tracker.record("rl", "checkpoint", {"step": 4, "path": "x"})  # nothing numeric
    tracker.close()


def test_trackio_gets_the_log_scalars_at_their_steps():
    handle = StandIn()
    feed(tracking.Tracker("trackio", handle))
    assert handle.logged == [
        (9, {"sft/loss": 1.0}),
        (4, {"rl/loss": -0.2, "rl/reward_r0": -4.1, "rl/prompts": 8.0}),
        (1, {"sft/epoch/valid_loss": 1.5})]
    assert handle.finished


def test_wandb_gets_one_step_axis_per_stage():
    """wandb ignores a step below the last one logged; RL restarts at step 1 after SFT,
    so each stage's scalars are plotted against that stage's own step."""
    handle = StandIn()
    feed(tracking.Tracker("wandb", handle))
    assert handle.defined == [("sft/step", None), ("sft/*", "sft/step"),
                              ("rl/step", None), ("rl/*", "rl/step")]
    assert handle.logged == [
        (None, {"sft/loss": 1.0, "sft/step": 9}),
        (None, {"rl/loss": -0.2, "rl/reward_r0": -4.1, "rl/prompts": 8.0, "rl/step": 4}),
        (None, {"sft/epoch/valid_loss": 1.5, "sft/step": 1})]
    assert handle.finished


def wandb_history(run_file):
    """The history rows of an offline wandb run, read from its ``run-ID.wandb`` file: a
    7-byte header, then 32 KiB blocks of records (4-byte checksum, 2-byte length, 1-byte
    kind: 1 whole, 2 first, 3 middle, 4 last piece; a block's last < 7 bytes are padding),
    each whole record a ``wandb_internal_pb2.Record``; a key holding "/" is stored split
    into ``nested_key``."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, pieces, rows = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            break
        pieces += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record.FromString(pieces)
            pieces = b""
            if record.WhichOneof("record_type") == "history":
                items = record.history.item
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in items})
    return rows


def test_real_wandb_holds_the_numbers_of_the_log(tmp_path, monkeypatch):
    """An offline wandb run (no account, no network) of the smoke preset: every SFT loss
    and RL reward of log.jsonl is in wandb's own run file, against its stage's step."""
    pytest.importorskip("wandb")
    for name, value in (("WANDB_MODE", "offline"), ("WANDB_SILENT", "true"),
                        ("WANDB_DISABLE_GIT", "true"), ("WANDB_CACHE_DIR", str(tmp_path)),
                        ("WANDB_CONFIG_DIR", str(tmp_path)), ("WANDB_DATA_DIR", str(tmp_path))):
        monkeypatch.setenv(name, value)
    out = tmp_path / "run"
    assert main(["--preset", "smoke", "--output-dir", str(out), "--report-to", "wandb",
                 "--sft-epochs", "1", "--rl-max-steps", "2", "--eval-limit", "4"]) == 0
    (run_file,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
    assert json.loads((out / "run.json").read_text())["run_id"] in run_file.name
    rows = wandb_history(run_file)
    records = read_records(out)
    for stage, field in (("sft", "loss"), ("rl", "reward_r0"), ("rl", "loss")):
        steps, values = series(records, stage, "step", field)
        logged = {row[f"{stage}/step"]: row[f"{stage}/{field}"] for row in rows
                  if f"{stage}/{field}" in row}
        assert len(steps) > 0 and logged == pytest.approx(dict(zip(steps, values, strict=True)))
    metrics = json.loads((out / "metrics.json").read_text())
    (evaluation,) = [row for row in rows if "rl/hr@10" in row]
    assert evaluation["rl/hr@10"] == pytest.approx(metrics["rl"]["hr@10"])


def test_real_trackio_stores_what_the_log_holds(tmp_path, monkeypatch):
    """trackio's local store (no account) holds the SFT losses of log.jsonl at their
    steps."""
    import sqlite3

    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "store"))  # read when it is imported
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pytest.importorskip("trackio")
    out = tmp_path / "run"
    assert main(["--preset", "smoke", "--output-dir", str(out), "--report-to", "trackio",
                 "--sft-epochs", "1", "--rl-max-steps", "1", "--eval-limit", "4"]) == 0
    rows = sqlite3.connect(tmp_path / "store" / "fastlatent.db").execute(
        "select step, metrics from metrics order by id").fetchall()
    stored = {step: json.loads(m)["sft/loss"] for step, m in rows if "sft/loss" in json.loads(m)}
    steps, losses = series(read_records(out), "sft", "step", "loss")
    assert stored == pytest.approx(dict(zip(steps, losses, strict=True)))


def test_report_to(monkeypatch):
    assert tracking.resolve("none") == "none"
    monkeypatch.setattr(tracking, "installed", lambda kind: kind == "tensorboard")
    assert tracking.resolve("auto") == "tensorboard"
    with pytest.raises(ConfigError, match="pip install wandb"):
        tracking.resolve("wandb")
    monkeypatch.setattr(tracking, "installed", lambda kind: False)
    assert tracking.resolve("auto") == "none"


def test_a_tracker_that_is_not_installed_stops_before_anything_loads(tmp_path, capsys,
                                                                     monkeypatch):
    monkeypatch.setattr(tracking, "installed", lambda kind: False)
    out = tmp_path / "run"
    assert main(["--preset", "smoke", "--report-to", "trackio", "--output-dir", str(out)]) == 2
    assert "pip install trackio" in capsys.readouterr().err
    assert not out.exists()
