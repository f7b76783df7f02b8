"""benchmarks/gpu.py --dry-run: the device script's steps run end to end on the CPU, so
the one call a lent GPU gets cannot fail on plumbing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_dry_run_runs_every_step_and_writes_the_report(tmp_path):
    out = tmp_path / "gpu"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "benchmarks/gpu.py", "--dry-run", "--out",
                           str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "gpu.json").read_text())
    assert set(report["steps"]) == {"device", "gpu_tests", "op_benchmarks", "compile_check",
                                    "engine_vs_naive", "reasoning_latency", "grpo_cost"}
    assert all(step["rc"] == 0 for step in report["steps"].values())
    assert report["steps"]["compile_check"]["json"]["compiled"] >= 1
    rl = report["rl"]
    assert rl["engine_seconds"] > 0 and rl["flop_floor"]["total"] > 0
    assert rl["fraction_of_peak"] is None  # no peak known for a CPU
    assert (out / "op_benchmarks.json").is_file()
    md = (out / "gpu.md").read_text()
    assert "dry run on the CPU" in md and "FLOP floor" in md
    reasoning = report["steps"]["reasoning_latency"]["json"]
    assert set(reasoning["variants"]) == {"none", "latent1", "latent2", "cot2", "cot4"}
    assert "Reasoning latency" in md
    grpo = report["steps"]["grpo_cost"]["json"]
    assert grpo["ppl_s"] > 0 and grpo["exact_match_all_vs_ppl"] > 0
    assert "GRPO step cost" in md


def test_flop_floor_counts_what_the_step_must_compute():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from gpu import peak_flops, rl_flop_floor, transformer_params

    from fastlatent.model.loading import tiny_llama_config

    config = tiny_llama_config(256)
    layer_params, head_params = transformer_params(config)
    assert head_params == 256 * config.hidden_size
    floor = rl_flop_floor(config, prompts=2, k=4, prompt_tokens=40, target_tokens=10,
                          prompt_width=20)
    assert floor["head"] == 4 * head_params * 4 * 10  # fwd + bwd-to-hidden, K rows each
    assert floor["suffix"] > 4 * layer_params * 4 * (2 + 10)  # + attention
    assert floor["total"] == pytest.approx(floor["prefill"] + floor["suffix"] + floor["head"])
    assert peak_flops("NVIDIA H200") == 989e12 and peak_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_flops("cpu") is None
