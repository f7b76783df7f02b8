"""Everything only a GPU can show, in one call: ``python benchmarks/gpu.py --out DIR``.

Made for a lent H100/H200 machine with the GPU image (torch, Triton, transformers; no
hub, no data download), under 10 minutes:

1. ``device``: what the machine is (``torch.cuda.get_device_name()``, capability, versions).
2. ``gpu_tests``: the gpu-marked tests (bf16 at real sizes, Triton vs torch vs an fp32
   reference).
3. ``op_benchmarks``: ``pytest benchmarks/ --benchmark-only`` (Triton vs torch vs SDPA /
   full logits), JSON from pytest-benchmark.
4. ``compile_check``: registers, spills and shared memory of every kernel for this
   device's architecture at the Qwen2.5-1.5B shape in bf16 (``compile_check.py``).
5. ``engine_vs_naive``: ``engine_vs_naive.py`` at the paper's shape (32 prompts x K = 8) on
   the random-weight Qwen2.5-1.5B, bf16: engine vs the one-pass naive step, time and peak memory.
6. The RL step's FLOP floor (necessary FLOPs only: prompt prefill without gradient, the
   suffix forward, its backward to the activations, the LM head on real target tokens)
   and the fraction of the device's dense bf16 peak the engine reached.
7. ``reasoning_latency``: ``reasoning_latency.py`` on the random-weight SmolLM2-135M, bf16:
   seconds per user of constrained beam search with no thought, 1 and 8 latents, and a
   32- and 128-token textual chain of thought; what one latent costs in tokens.
8. ``grpo_cost``: ``grpo_cost.py`` on the random-weight SmolLM2-135M, bf16, 32 prompts x
   K = 8: one RL optimiser step with the PPL reward against the exact-match reward
   (LatentRATT only, and the whole model): the paper's Figure 4 cost ratio.

Each step runs in a subprocess with its own time limit; a failing step is recorded and
the rest still run. Writes ``DIR/gpu.json`` and ``DIR/gpu.md`` (a section for
``benchmarks/RESULTS.md``). ``--dry-run`` runs the same steps on the CPU under the Triton
interpreter at tiny sizes (tested in CI, so the script cannot rot).

On the device machine (the working tree is copied, not installed):

    pip install -q --no-deps --no-build-isolation -e . && python benchmarks/gpu.py --out $OUT
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

# Dense bf16 tensor-core peaks (FLOP/s) by device name fragment, from the vendors' sheets.
BF16_PEAK = {"H200": 989e12, "H100 SXM": 989e12, "H100 80GB HBM3": 989e12,
             "H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12,
             "A100": 312e12}


def peak_flops(device_name: str) -> float | None:
    for fragment, peak in BF16_PEAK.items():  # most specific first
        if fragment in device_name:
            return peak
    return None


def steps(dry_run: bool, out: Path) -> list[tuple[str, list[str], int, dict[str, str]]]:
    """(name, command, timeout seconds, extra environment) per step."""
    py = sys.executable
    interp = {"TRITON_INTERPRET": "1"} if dry_run else {}
    no_interp = {"TRITON_INTERPRET": ""}
    device = [py, "-c", (
        "import json, torch, triton, transformers; cuda = torch.cuda.is_available(); "
        "print(json.dumps({'device_name': torch.cuda.get_device_name() if cuda else 'cpu', "
        "'capability': list(torch.cuda.get_device_capability()) if cuda else None, "
        "'torch': torch.__version__, 'triton': triton.__version__, "
        "'transformers': transformers.__version__}))")]
    if dry_run:
        tests = [py, "-m", "pytest", "-q", "-x", "tests/ops/test_fused_logprob.py",
                 "-k", "gpu or fp16", "-p", "no:cacheprovider"]
        bench = [py, "-m", "pytest", "-q", "benchmarks/test_bench_fused_logprob.py",
                 "--benchmark-only", "--benchmark-min-rounds=1", "--benchmark-max-time=0.01",
                 "--benchmark-warmup=off", "-k", "smollm2",
                 f"--benchmark-json={out / 'op_benchmarks.json'}", "-p", "no:cacheprovider"]
        compile_ = [py, "benchmarks/compile_check.py", "--kernel", "combine", "--dtype",
                    "bf16", "--shape", "smollm2", "--arch", "sm_90", "--json"]
        rl = [py, "benchmarks/engine_vs_naive.py", "--model", "tiny-random", "--data", "synthetic",
              "--prompts", "2", "--num-samples", "2", "--repeats", "1", "--warmup", "0",
              "--paths", "rl-naive,rl-engine", "--device", "cpu", "--json"]
        reasoning = [py, "benchmarks/reasoning_latency.py", "--model", "tiny-random",
                     "--data", "synthetic", "--users", "2", "--batch", "2", "--repeats", "1",
                     "--cot-tokens", "2,4", "--num-latents", "2", "--device", "cpu", "--json"]
        grpo = [py, "benchmarks/grpo_cost.py", "--model", "tiny-random", "--data", "synthetic",
                "--prompts", "2", "--num-samples", "2", "--repeats", "1", "--warmup", "0",
                "--device", "cpu", "--json"]
    else:
        tests = [py, "-m", "pytest", "-q", "-m", "gpu", "tests/", "-p", "no:cacheprovider"]
        bench = [py, "-m", "pytest", "-q", "benchmarks/", "--benchmark-only",
                 f"--benchmark-json={out / 'op_benchmarks.json'}", "-p", "no:cacheprovider"]
        compile_ = [py, "benchmarks/compile_check.py", "--dtype", "bf16", "--shape",
                    "qwen2.5-1.5b", "--arch", "sm_90", "--json"]
        rl = [py, "benchmarks/engine_vs_naive.py", "--model", "qwen2.5-1.5b-random", "--data",
              "synthetic", "--prompts", "32", "--num-samples", "8", "--dtype", "bfloat16",
              "--paths", "rl-naive,rl-engine", "--device", "cuda", "--json"]
        reasoning = [py, "benchmarks/reasoning_latency.py", "--model", "smollm2-135m-random",
                     "--data", "synthetic", "--users", "16", "--batch", "8", "--repeats", "5",
                     "--dtype", "bfloat16", "--device", "cuda", "--json"]
        grpo = [py, "benchmarks/grpo_cost.py", "--model", "smollm2-135m-random", "--data",
                "synthetic", "--prompts", "32", "--num-samples", "8", "--repeats", "3",
                "--dtype", "bfloat16", "--device", "cuda", "--json"]
    # Time limits sum to 580 s: the whole call fits the device tool's 10-minute limit.
    return [("device", device, 60, {}),
            ("gpu_tests", tests, 100, interp),
            ("op_benchmarks", bench, 100, interp),
            ("compile_check", compile_, 70, no_interp),
            ("engine_vs_naive", rl, 120, {}),
            ("reasoning_latency", reasoning, 70, {}),
            ("grpo_cost", grpo, 60, {})]


def run_step(name: str, cmd: list[str], timeout: int, env_extra: dict[str, str],
             out: Path) -> dict[str, Any]:
    env = {**os.environ, **env_extra, "TRITON_DEFAULT_FP_FUSION": "1"}
    env = {k: v for k, v in env.items() if v != ""}
    print(f"[gpu.py] {name}: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=timeout)
        rc, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as err:
        rc = "timeout"
        stdout = err.stdout.decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
        stderr = err.stderr.decode() if isinstance(err.stderr, bytes) else (err.stderr or "")
    seconds = round(time.perf_counter() - t0, 1)
    (out / f"{name}.log").write_text(f"$ {' '.join(cmd)}\n--- stdout\n{stdout}\n"
                                     f"--- stderr\n{stderr}\n")
    last = stdout.strip().splitlines()[-1] if stdout.strip() else ""
    try:
        parsed = json.loads(last)
    except ValueError:
        parsed = None
    print(f"[gpu.py] {name}: rc {rc}, {seconds} s", file=sys.stderr, flush=True)
    return {"rc": rc, "seconds": seconds, "last_line": last[-2000:], "json": parsed}


def transformer_params(config) -> tuple[int, int]:
    """(parameters in the decoder layers, in the LM head) from a HF config."""
    d, layers = config.hidden_size, config.num_hidden_layers
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or d // heads
    kv = getattr(config, "num_key_value_heads", heads) * head_dim
    attention = d * heads * head_dim + 2 * d * kv + heads * head_dim * d
    mlp = 3 * d * config.intermediate_size
    return layers * (attention + mlp), config.vocab_size * d


def rl_flop_floor(config, prompts: int, k: int, prompt_tokens: int, target_tokens: int,
                  prompt_width: int) -> dict[str, float]:
    """Necessary FLOPs of one engine RL step (LLM frozen; LatentRATT's share is <0.1%).

    prefill: 2 P per real prompt token (no gradient) + causal attention over the prompt;
    suffix: 2 P forward and 2 P backward (activation gradients only: the weights are
    frozen) per suffix token (K rows x (1 latent + the target)); head: 2 d V forward and
    2 d V backward (to the hidden state) per real target token per row.
    """
    layer_params, head_params = transformer_params(config)
    d, layers = config.hidden_size, config.num_hidden_layers
    suffix_tokens = k * (prompts + target_tokens)  # one latent per row + its target
    mean_prompt = prompt_tokens / max(prompts, 1)
    prefill = 2 * layer_params * prompt_tokens + 2 * layers * d * prompt_tokens * mean_prompt
    suffix_attention = 4 * layers * d * suffix_tokens * (prompt_width + 1 + target_tokens
                                                         / max(prompts, 1))
    suffix = 4 * layer_params * suffix_tokens + 2 * suffix_attention
    head = 4 * head_params * k * target_tokens
    return {"prefill": prefill, "suffix": suffix, "head": head,
            "total": prefill + suffix + head}


def rl_summary(rl: dict[str, Any] | None, device_name: str, dry_run: bool) -> dict[str, Any]:
    if not rl or "paths" not in rl:
        return {}
    engine, naive = rl["paths"].get("rl-engine", {}), rl["paths"].get("rl-naive", {})
    summary = {"rl_speedup_vs_naive": rl.get("rl_speedup_vs_naive"),
               "rl_peak_mem_ratio": rl.get("rl_peak_mem_ratio"),
               "engine_seconds": engine.get("seconds"), "naive_seconds": naive.get("seconds")}
    if "seconds" not in engine:
        return summary
    from fastlatent.model.loading import RANDOM_CONFIGS, tiny_llama_config

    if dry_run:
        config = tiny_llama_config(256)
    else:
        from transformers import AutoConfig

        family, fields = RANDOM_CONFIGS["qwen2.5-1.5b-random"]
        config = AutoConfig.for_model(family, **fields)
    floor = rl_flop_floor(config, rl["batch"], rl["k"], engine["prompt_tokens"],
                          engine["target_tokens"], engine.get("prompt_width", 0) or
                          engine["prompt_tokens"] // max(rl["batch"], 1))
    achieved = floor["total"] / engine["seconds"]
    peak = peak_flops(device_name)
    summary.update(flop_floor=floor, achieved_flops=achieved,
                   bf16_peak_flops=peak,
                   fraction_of_peak=None if peak is None else achieved / peak)
    return summary


def markdown(report: dict[str, Any]) -> str:
    dev = report["steps"]["device"].get("json") or {}
    name = dev.get("device_name", "unknown device")
    kind = "dry run on the CPU" if report["dry_run"] else "GPU"
    lines = [f"## {report['date']} — {name} ({kind}), "
             f"torch {dev.get('torch')}, Triton {dev.get('triton')}, transformers "
             f"{dev.get('transformers')}", "",
             f"`python benchmarks/gpu.py --out DIR{' --dry-run' if report['dry_run'] else ''}`"
             f", {report['seconds']:.0f} s in all.", "",
             "| step | exit | seconds | result |", "|---|---|---|---|"]
    for step, result in report["steps"].items():
        lines.append(f"| {step} | {result['rc']} | {result['seconds']} | "
                     f"`{result['last_line'][:160]}` |")
    rl = report.get("rl", {})
    if rl:
        lines += ["", f"RL step: engine {rl.get('engine_seconds') or float('nan'):.4f} s, "
                      f"naive {rl.get('naive_seconds') or float('nan'):.4f} s, speed-up "
                      f"{rl.get('rl_speedup_vs_naive')}x, peak-memory ratio "
                      f"{rl.get('rl_peak_mem_ratio')}."]
        if "flop_floor" in rl:
            floor = rl["flop_floor"]
            frac = rl["fraction_of_peak"]
            lines.append(f"FLOP floor {floor['total'] / 1e12:.3f} TFLOP (prefill "
                         f"{floor['prefill'] / 1e12:.3f}, suffix {floor['suffix'] / 1e12:.3f},"
                         f" head {floor['head'] / 1e12:.3f}); achieved "
                         f"{rl['achieved_flops'] / 1e12:.2f} TFLOP/s"
                         + ("" if frac is None else f" = {frac:.1%} of the bf16 peak") + ".")
    reasoning = (report["steps"].get("reasoning_latency") or {}).get("json") or {}
    if "variants" in reasoning:
        variants = reasoning["variants"]
        lines += ["", "Reasoning latency (s per user, x no latent): " + ", ".join(
            f"{name} {v['median_s_per_user']:.4f} (x{v['ratio_to_none']:.2f})"
            for name, v in variants.items()) + "; one latent = "
            f"{reasoning.get('latent1_in_tokens')} tokens of a chain of thought."]
    grpo = (report["steps"].get("grpo_cost") or {}).get("json") or {}
    if "ppl_s" in grpo:
        lines += ["", f"GRPO step cost (Fig. 4): PPL reward {grpo['ppl_s']:.4f} s, exact-match "
                      f"{grpo.get('exact_match_s')} s (x{grpo.get('exact_match_vs_ppl')}), "
                      f"exact-match on the whole model {grpo.get('exact_match_all_s')} s "
                      f"(x{grpo.get('exact_match_all_vs_ppl')}); the paper: about x5."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for gpu.json, gpu.md and the logs")
    p.add_argument("--dry-run", action="store_true",
                   help="the same steps on the CPU (Triton interpreter, tiny sizes)")
    p.add_argument("--only", default="", help="comma-separated step names to run")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        import fastlatent.kernels  # noqa: F401  (installed, so kernels/ has its name)
    except ImportError:
        print("gpu.py: fastlatent is not installed here; run "
              "pip install --no-deps --no-build-isolation -e . first", file=sys.stderr)
        return 2
    if not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            print("gpu.py: no CUDA device here; use --dry-run on a CPU", file=sys.stderr)
            return 2
    t0 = time.perf_counter()
    results = {}
    for name, cmd, timeout, env in steps(args.dry_run, out):
        if args.only and name not in args.only.split(","):
            continue
        results[name] = run_step(name, cmd, timeout, env, out)
    device_name = ((results.get("device") or {}).get("json") or {}).get("device_name", "")
    report = {"date": _dt.date.today().isoformat(), "dry_run": args.dry_run,
              "seconds": round(time.perf_counter() - t0, 1), "steps": results,
              "rl": rl_summary((results.get("engine_vs_naive") or {}).get("json"), device_name,
                               args.dry_run)}
    (out / "gpu.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    if "device" in results:
        (out / "gpu.md").write_text(markdown(report))
    print(json.dumps({"out": str(out), "failed": [n for n, r in results.items()
                                                  if r["rc"] != 0],
                      "seconds": report["seconds"]}))
    return 1 if any(r["rc"] != 0 for r in results.values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
