"""Runs that survive: SIGKILL and SIGTERM at a step, then --resume, end bitwise where the
uninterrupted run ends; one run per output folder.

Each run is a subprocess of ``python -m fastlatent.train`` (the same threads and code path
for the reference and the interrupted runs). The interruption is injected by a wrapper
that sends the signal to its own process right after the N-th optimiser update of a
stage, before that step's checkpoint could be written.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys

import pytest

from fastlatent.testing.cli_faults import cli_with_fault, signal_self

pytestmark = pytest.mark.slow

# Small enough for a few seconds a run: 2 SFT epochs of 3 steps, 3 RL steps, 6 users.
FLAGS = ["--preset", "smoke", "--sft-limit", "96", "--sft-batch-size", "32",
         "--sft-micro-batch", "16",
         "--rl-max-steps", "3", "--eval-limit", "6", "--save-every", "2"]
SFT_STEPS, RL_STEPS = 6, 3

def train(out, *extra, stage=None, at=None, sig="SIGKILL"):
    """Run the CLI in a subprocess; with ``stage`` ("sft", "rl"), signal ``sig`` right
    after its optimiser update number ``at``; with "eval", after the ``at``-th title that
    an evaluation decodes."""
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    flags = FLAGS
    if "--stage" in extra and extra[extra.index("--stage") + 1] == "sft":  # no RL flag
        at = FLAGS.index("--rl-max-steps")
        flags = FLAGS[:at] + FLAGS[at + 2:]
    args = [*flags, "--output-dir", str(out), *extra]
    if stage is None:
        cmd = [sys.executable, "-m", "fastlatent.train", *args]
    else:
        function = "title_of" if stage == "eval" else "clipped_update"
        module = "evaluate" if stage == "eval" else stage
        code = cli_with_fault(module, function, at, signal_self(sig))
        cmd = [sys.executable, "-c", code, *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def outcome(out):
    """What must not depend on interruptions: LatentRATT's bytes after RL, the metrics."""
    ratt = (out / "rl" / "latent_ratt.safetensors").read_bytes()
    metrics = json.loads((out / "metrics.json").read_text())
    return ratt, metrics


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "run"
    done = train(out)
    assert done.returncode == 0, done.stderr[-3000:]
    steps = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert sum(e["event"] == "step" and e["stage"] == "sft" for e in steps) == SFT_STEPS
    assert sum(e["event"] == "step" and e["stage"] == "rl" for e in steps) == RL_STEPS
    return outcome(out)


# A seeded draw of the steps to kill at (fixed per run of the suite, different per stage).
KILL_AT = {"sft": random.Random(11).randint(2, SFT_STEPS),
           "rl": random.Random(12).randint(2, RL_STEPS)}


@pytest.mark.parametrize("stage", ["sft", "rl"])
def test_sigkill_then_resume_ends_bitwise_as_the_uninterrupted_run(stage, reference,
                                                                   tmp_path):
    out = tmp_path / "run"
    # Checkpoints every step here (every 2 in the reference): where checkpoints fall must
    # not change the result either, and the resume starts from a mid-stage checkpoint.
    killed = train(out, "--save-every", "1", stage=stage, at=KILL_AT[stage])
    assert killed.returncode == -signal.SIGKILL
    assert not (out / "metrics.json").exists()
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["status"] == "running"  # what a kill leaves
    resumed = train(out, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert outcome(out) == reference
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["status"] == "complete" and len(manifest["segments"]) == 2
    assert manifest["segments"][1]["resumed"] is True
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert len({r["run_id"] for r in records}) == 1  # both segments log under one id
    assert not (out / ".fastlatent.lock").exists()


def test_sigterm_saves_says_how_to_resume_and_resumes_bitwise(reference, tmp_path):
    out = tmp_path / "run"
    stopped = train(out, stage="sft", at=3, sig="SIGTERM")
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-3000:]
    assert "--resume" in stopped.stderr and str(out) in stopped.stderr
    assert (out / "checkpoints" / "sft-00000003" / "complete.json").is_file()
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["status"] == "interrupted"
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r for r in records if r["event"] == "interrupted"]
    assert train(out, "--resume").returncode == 0
    assert outcome(out) == reference


def test_sigterm_during_evaluation_stops_between_batches_and_resume_redoes_it(reference,
                                                                             tmp_path):
    out = tmp_path / "run"
    stopped = train(out, stage="eval", at=1, sig="SIGTERM")  # during the first batch
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-3000:]
    assert "during eval after sft" in stopped.stderr
    progress = json.loads((out / "progress.json").read_text())
    assert progress == {"done": ["sft:trained"], "metrics": {}}
    assert train(out, "--resume").returncode == 0
    assert outcome(out) == reference
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in rows] == ["sft"] * 6 + ["rl"] * 6


def test_a_second_run_into_a_used_folder_is_refused(tmp_path):
    from fastlatent.rundir import LOCK_FILE

    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.json").write_text("{}")
    refused = train(out)
    assert refused.returncode == 2
    assert "--resume" in refused.stderr and "--overwrite" in refused.stderr
    assert (out / "metrics.json").read_text() == "{}"  # nothing of the earlier run touched
    # A live process holding the lock keeps even --overwrite out.
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / LOCK_FILE).write_text(json.dumps({"pid": holder.pid,
                                                 "host": os.uname().nodename}))
        locked = train(out, "--overwrite")
        assert locked.returncode == 2 and f"pid {holder.pid}" in locked.stderr
    finally:
        holder.kill()
        holder.wait()
    # Its process gone, the stale lock is taken over; --overwrite starts afresh.
    assert train(out, "--overwrite", "--stage", "sft", "--sft-epochs", "1").returncode == 0
    assert set(json.loads((out / "metrics.json").read_text())) == {"sft", "popular", "sasrec"}
