"""Data parallelism whose results do not depend on the number of processes (CPU, gloo).

``fastlatent.testing.distributed_check`` computes SFT gradients, the validation loss, RL
gradients/rewards/advantages (batch and group pools; one-pass and micro-batched shares)
and an evaluation, once in this process and once per rank under
``torchrun --nproc-per-node 2``; the CLI tests run the smoke preset both ways.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from fastlatent import distributed
from fastlatent.testing import distributed_check as check
from fastlatent.testing.cli_faults import cli_with_fault, signal_self

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nproc-per-node", "2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}


def test_one_process_helpers_are_the_identity():
    assert not distributed.active() and distributed.is_main()
    assert distributed.deal(["a", "b", "c"]) == [(0, "a"), (1, "b"), (2, "c")]
    assert distributed.rounds(5) == 5
    assert distributed.sum_floats(1.5, 2) == [1.5, 2.0]
    assert distributed.gather_dealt({3: "x"}) == {3: "x"}
    assert distributed.agreed_signal(None) is None and distributed.agreed_signal(15) == 15
    assert distributed.broadcast("path") == "path"
    distributed.all_reduce_gradients([torch.nn.Parameter(torch.ones(2))])  # no-op


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """What each of two torchrun processes computed, and what one process computes."""
    out = tmp_path_factory.mktemp("ranks")
    done = subprocess.run([*TORCHRUN, "-m", "fastlatent.testing.distributed_check", str(out)],
                          env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    torch.set_num_threads(1)  # as each rank: the same kernels, so the same roundings
    try:
        single = check.compute()
    finally:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)))
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]
    return single, ranks


def test_ranks_agree_with_each_other(two_ranks):
    """After the reductions every rank holds the same numbers (same update everywhere)."""
    _, (r0, r1) = two_ranks
    for key in r0:
        if key == "eval":
            assert r0[key] == r1[key]
        elif key == "valid_loss":
            assert r0[key] == r1[key]
        else:
            assert r0[key]["loss"] == r1[key]["loss"], key
            for name in r0[key]["grads"]:
                assert torch.equal(r0[key]["grads"][name], r1[key]["grads"][name]), (key, name)


def test_sft_matches_one_process(two_ranks):
    single, (r0, _) = two_ranks
    assert r0["sft"]["tokens"] == single["sft"]["tokens"]
    assert r0["sft"]["loss"] == pytest.approx(single["sft"]["loss"], rel=1e-6)
    # gradients by parameter name: torch compares mappings key by key and names the key
    torch.testing.assert_close(r0["sft"]["grads"], single["sft"]["grads"], rtol=1e-5, atol=1e-7)
    assert r0["valid_loss"] == pytest.approx(single["valid_loss"], rel=1e-6)


@pytest.mark.parametrize("pool,micro", check.RL_CASES)
def test_rl_matches_one_process(two_ranks, pool, micro):
    """The advantage pool is the global batch (Eq. 7 over all B*K rows, or per prompt),
    the noise a prompt gets does not depend on the rank, the gradients are summed."""
    single, (r0, _) = two_ranks
    got, want = r0[f"rl-{pool}-{micro}"], single[f"rl-{pool}-{micro}"]
    assert got["rewards"].shape == (check.RL_BATCH, check.K)
    torch.testing.assert_close(got["rewards"], want["rewards"].cpu(), rtol=1e-5, atol=1e-6)
    # The group advantage divides by the std of K = 4 rewards: a 1e-6 rounding difference
    # of a reward (another forward split) moves it by up to ~1e-4.
    tol = dict(rtol=1e-4, atol=1e-5) if pool == "batch" else dict(rtol=1e-3, atol=3e-4)
    torch.testing.assert_close(got["advantages"], want["advantages"].cpu(), **tol)
    assert got["loss"] == pytest.approx(want["loss"], rel=tol["rtol"], abs=tol["atol"])
    torch.testing.assert_close(got["grads"], want["grads"], rtol=tol["rtol"],
                               atol=tol["atol"] / 10)


def test_evaluation_is_identical(two_ranks):
    """Each user is decoded in the batch it has in one process: identical titles, scores,
    metrics and target NLLs, in the original order."""
    single, (r0, _) = two_ranks
    assert r0["eval"]["predictions"] == single["eval"]["predictions"]
    assert r0["eval"]["metrics"] == single["eval"]["metrics"]
    assert r0["eval"]["nll"] == single["eval"]["nll"]
    assert [p["user"] for p in r0["eval"]["predictions"]] == \
        [p["user"] for p in single["eval"]["predictions"]]


# ---- the CLI under torchrun (slow: a few smoke runs) ----

FLAGS = ["--preset", "smoke", "--rl-micro-batch", "4"]


def train(out, *extra, nproc=1, wrapper=None):
    flags = FLAGS if "eval" not in extra else FLAGS[:2]  # an evaluation takes no RL flag
    args = [*flags, "--output-dir", str(out), *extra]
    if nproc == 1:
        cmd = [sys.executable, "-m", "fastlatent.train", *args]
    else:
        cmd = [*TORCHRUN[:-1], str(nproc)]
        cmd += [wrapper, *args] if wrapper else ["-m", "fastlatent.train", *args]
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)


def records(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def steps(out, stage):
    return [r for r in records(out) if r["stage"] == stage and r["event"] == "step"]


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("smoke")
    outs = {n: root / f"n{n}" for n in (1, 2)}
    for n, out in outs.items():
        done = train(out, nproc=n)
        assert done.returncode == 0, done.stderr[-4000:]
    return outs


@pytest.mark.slow
def test_torchrun_smoke_matches_one_process(smoke_runs):
    one, two = smoke_runs[1], smoke_runs[2]
    manifest = json.loads((two / "run.json").read_text())
    assert manifest["world_size"] == 2 and manifest["backend"] == "gloo"
    assert manifest["status"] == "complete"
    for stage in ("sft", "rl"):
        a, b = steps(one, stage), steps(two, stage)
        assert len(a) == len(b) > 0  # one record per optimiser step, not one per rank
        for x, y in zip(a, b, strict=True):
            assert y["loss"] == pytest.approx(x["loss"], rel=1e-5), (stage, x["step"])
            assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-4)
            if stage == "rl":
                assert y["reward_r0"] == pytest.approx(x["reward_r0"], rel=1e-5)
                assert y["mean_noisy_advantage"] == pytest.approx(
                    x["mean_noisy_advantage"], rel=1e-4, abs=1e-6)
    from safetensors.torch import load_file

    ratt = [load_file(out / "rl" / "latent_ratt.safetensors") for out in (one, two)]
    torch.testing.assert_close(ratt[1], ratt[0], rtol=1e-5, atol=1e-6)
    preds = [[json.loads(line) for line in (out / "predictions.jsonl").read_text()
              .splitlines()] for out in (one, two)]
    assert [p["predictions"] for p in preds[1]] == [p["predictions"] for p in preds[0]]
    metrics = [json.loads((out / "metrics.json").read_text()) for out in (one, two)]
    for stage in metrics[0]:
        for key in ("hr@5", "hr@10", "ndcg@5", "ndcg@10", "hr@10_ci"):
            assert metrics[1][stage][key] == metrics[0][stage][key], (stage, key)


@pytest.mark.slow
def test_torchrun_evaluation_of_a_checkpoint_is_identical(smoke_runs, tmp_path):
    """The same trained model evaluated by one and by two processes: identical files."""
    outs = {}
    for n in (1, 2):
        outs[n] = tmp_path / f"eval{n}"
        done = train(outs[n], "--stage", "eval", "--checkpoint", str(smoke_runs[1] / "sft"),
                     nproc=n)
        assert done.returncode == 0, done.stderr[-4000:]
    for name in ("predictions.jsonl", "metrics.json"):
        assert (outs[2] / name).read_text() == (outs[1] / name).read_text(), name


@pytest.mark.slow
def test_a_used_folder_stops_every_rank_with_one_message(smoke_runs):
    """Rank 0 checks the folder and tells the others: one message, no rank left waiting."""
    done = train(smoke_runs[2], nproc=2)
    assert done.returncode != 0
    assert done.stderr.count("already holds an earlier run") == 1, done.stderr[-3000:]


@pytest.mark.slow
def test_a_failing_rank_stops_both(tmp_path):
    """Rank 1 raises after RL step 2's gradients while rank 0 goes on to its next
    collective: the launch ends (no hang), non-zero, and rank 0's run.json names rank 1's
    error."""
    wrapper = tmp_path / "fail.py"
    wrapper.write_text(cli_with_fault("rl", "accumulate_rl_gradients", 2,
                                      'raise RuntimeError("injected failure on rank 1")',
                                      rank=1))
    out = tmp_path / "run"
    started = time.monotonic()
    done = train(out, nproc=2, wrapper=str(wrapper))
    assert done.returncode != 0
    assert time.monotonic() - started < 300
    assert "injected failure on rank 1" in done.stderr
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["status"] == "failed"
    assert "rank 1" in manifest["segments"][-1]["message"]
    assert "injected failure on rank 1" in manifest["segments"][-1]["message"]


@pytest.mark.slow
def test_sigterm_stops_every_rank_after_the_same_step_and_resumes(smoke_runs, tmp_path):
    """SIGTERM to one rank only: all ranks agree to stop after the same step, rank 0
    writes the checkpoint, and ``torchrun ... --resume`` ends where the uninterrupted
    two-process run ends."""
    wrapper = tmp_path / "term.py"
    wrapper.write_text(cli_with_fault("sft", "clipped_update", 5, signal_self("SIGTERM"),
                                      rank=1))
    out = tmp_path / "run"
    stopped = train(out, nproc=2, wrapper=str(wrapper))
    assert stopped.returncode != 0
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["status"] == "interrupted", stopped.stderr[-3000:]
    assert [r["step"] for r in records(out) if r["event"] == "interrupted" and
            r["stage"] == "sft"] == [5]
    resumed = train(out, "--resume", nproc=2)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    want = (smoke_runs[2] / "rl" / "latent_ratt.safetensors").read_bytes()
    assert (out / "rl" / "latent_ratt.safetensors").read_bytes() == want
    assert json.loads((out / "metrics.json").read_text()) == \
        json.loads((smoke_runs[2] / "metrics.json").read_text())



@pytest.mark.slow
def test_benchmark_times_one_and_two_processes():
    """benchmarks/engine_vs_naive.py --nproc 2 runs both paths with 1 and 2 processes and reports
    the speed-up and the collectives' share (values are the benchmark's business)."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "benchmarks/engine_vs_naive.py", "--nproc", "2", "--model", "tiny-random",
         "--data", "synthetic", "--prompts", "5", "--num-samples", "2", "--repeats", "1",
         "--warmup", "0", "--json"], cwd=root, env=ENV, capture_output=True, text=True,
        timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["nproc"] == 2
    for name in ("dp-rl", "dp-sft"):
        one, two = summary["paths"][f"{name}-1"], summary["paths"][f"{name}-2"]
        assert one["nproc"] == 1 and two["nproc"] == 2 and two["threads"] == 1
        assert one["comm_share"] < 1e-3 and 0 < two["comm_share"] < 1
    assert summary["rl_speedup_vs_1_process"] > 0 and summary["sft_speedup_vs_1_process"] > 0
