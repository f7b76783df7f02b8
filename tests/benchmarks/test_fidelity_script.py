"""benchmarks/fidelity.py end to end on the smoke budget: five variants on the same rows,
paired differences against SFT only, a resumable layout."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "fidelity.py"


def run_fidelity(out: Path, *extra: str) -> str:
    cmd = [sys.executable, str(SCRIPT), "--data", "synthetic", "--train-split", "train",
           "--eval-split", "test", "--budget", "smoke", "--model", "tiny-random",
           "--output-dir", str(out), *extra]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow
def test_fidelity_runs_every_variant_on_the_same_rows_and_resumes(tmp_path):
    out = tmp_path / "fid"
    run_fidelity(out, "--only", "wo-reasoning,sft-only,rl-group")
    report = json.loads((out / "fidelity.json").read_text())
    assert set(report["variants"]) == {"wo-reasoning", "sft-only", "rl-group"}

    stdout = run_fidelity(out)  # resumes: the three finished variants are not rerun
    assert stdout.count("done already") == 3
    report = json.loads((out / "fidelity.json").read_text())
    assert list(report["variants"]) == ["wo-reasoning", "wo-latentratt", "sft-only",
                                        "rl-batch", "rl-group"]
    assert report["popular"]["n"] == 12
    for name, entry in report["variants"].items():
        assert entry["n"] == 12 and 0.0 <= entry["hr@10"] <= 1.0 and entry["target_nll"] > 0
        if name == "sft-only":
            assert "paired_vs_sft_only" not in entry
            continue
        paired = entry["paired_vs_sft_only"]
        assert set(paired) == {"hr@5", "hr@10", "ndcg@5", "ndcg@10", "target_nll"}
        diff = paired["target_nll"]
        assert diff["lo"] <= diff["diff"] <= diff["hi"]
    for name in ("rl-batch", "rl-group"):
        rl = report["variants"][name]["rl"]
        assert rl["steps"] == 2 and rl["reward_std_within_mean"] > 0
    assert report["latent_scale"]["r_norm_mean"] > 0
    table = (out / "fidelity.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert len(rows) == 7  # header + 5 variants + the popularity row
    assert (out / "fidelity.png").stat().st_size > 1000
