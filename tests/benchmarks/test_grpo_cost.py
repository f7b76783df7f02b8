"""benchmarks/grpo_cost.py on the tiny model: the three RL steps of the paper's Figure 4
run as the trainer runs them, interleaved, and report their ratios."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_grpo_cost_reports_every_path_and_the_ratios():
    done = subprocess.run(
        [sys.executable, "benchmarks/grpo_cost.py", "--model", "tiny-random", "--data",
         "synthetic", "--prompts", "2", "--num-samples", "3", "--repeats", "2", "--warmup",
         "0", "--threads", "1", "--json"], cwd=ROOT, capture_output=True, text=True,
        timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(out["paths"]) == {"ppl", "exact_match", "exact_match_all"}
    for name, path in out["paths"].items():
        assert len(path["times_s"]) == 2 and path["min_s"] <= path["median_s"] <= path["max_s"]
        assert out[f"{name}_s"] == path["median_s"] > 0
    assert out["exact_match_vs_ppl"] == round(out["exact_match_s"] / out["ppl_s"], 3)
    assert 0.0 <= out["paths"]["exact_match"]["mean_reward"] <= 1.0  # a 0/1 reward
    assert out["paths"]["ppl"]["mean_reward"] < 0  # -PPL


def test_grpo_cost_refuses_unknown_paths_and_k_below_two():
    for flags in (["--paths", "ppl,nope"], ["--num-samples", "1"]):
        done = subprocess.run([sys.executable, "benchmarks/grpo_cost.py", *flags], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and "error:" in done.stderr
