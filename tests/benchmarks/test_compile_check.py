"""benchmarks/compile_check.py compiles kernels for GPU targets on this CPU-only machine.

It must run without TRITON_INTERPRET (the suite sets it), so every check here runs in a
subprocess with the variable removed. A small selection keeps this within seconds; the
full run is documented in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_python(args: list[str], tmp_path: Path, code: str | None = None):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path / "cache"), TRITON_DEFAULT_FP_FUSION="1")
    if code is not None:  # @triton.jit reads the kernel's source file
        script = tmp_path / "script.py"
        script.write_text(code)
        args = [str(script), *args]
    cmd = [sys.executable, *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)


def test_a_small_selection_compiles_for_both_targets_through_tritons_cache(tmp_path):
    done = run_python(["benchmarks/compile_check.py", "--kernel", "combine", "--dtype",
                       "fp32", "--shape", "smollm2", "--arch", "sm_80,sm_90", "--json"],
                      tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    summary = lines[-1]
    assert summary["summary"] and summary["compiled"] == 2 and summary["failed"] == 0
    assert {"configs_with_spills", "max_shared_bytes"} <= set(summary)
    rows = lines[:-1]
    assert sorted(r["arch"] for r in rows) == ["sm_80", "sm_90"]
    for row in rows:
        assert row["kernel"] == "_fused_logprob_combine_kernel" and row["compiled"]
        assert 0 < row["registers"] <= 255 and row["spill_bytes"] == 0
        assert row["shared_bytes"] < row["shared_limit"]
    assert list((tmp_path / "cache").rglob("*.cubin"))  # Triton's cache holds the cubins


def test_a_kernel_the_gpu_compiler_rejects_is_reported_not_hidden(tmp_path):
    """A loop counter that changes type between two loops, as in the latent-attention
    forward before the fix (the interpreter runs it; the compiler refuses):
    the report must say failed, with the compiler's message, and exit non-zero."""
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, "{ROOT / 'benchmarks'}")
        import torch, triton, triton.language as tl
        import compile_check as cc

        @triton.jit
        def bad(x, n, BLOCK: tl.constexpr):
            wide = tl.load(x).to(tl.int64)
            acc = tl.zeros([BLOCK], dtype=tl.float32)
            for i in range(0, tl.cdiv(n, BLOCK)):  # i: int32
                acc += tl.load(x + i * BLOCK + tl.arange(0, BLOCK)).to(tl.float32)
            for j in range(0, 2):  # carries i, which the inner loop makes int64
                for i in range(0, tl.cdiv(wide, BLOCK)):
                    acc += tl.load(x + i * BLOCK + tl.arange(0, BLOCK)).to(tl.float32)
            tl.store(x + tl.arange(0, BLOCK), acc.to(tl.int64))

        launch = cc.Launch("bad", bad, [triton.Config({{"BLOCK": 32}}, num_warps=4)],
                           (torch.empty(64, dtype=torch.int64, device="meta"), 64), {{}})
        result = cc.compile_one("test", launch, launch.configs[0], "tiny", "fp32", 90)
        print(result.compiled, result.error)
    """)
    done = run_python([], tmp_path, code)
    assert done.returncode == 0, done.stderr[-3000:]
    compiled, _, error = done.stdout.strip().partition(" ")
    assert compiled == "False" and "CompilationError" in error
