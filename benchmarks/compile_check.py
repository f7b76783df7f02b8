"""Compile every Triton kernel for A100 (sm_80) and H100/H200 (sm_90) on a machine without
a GPU, and report what the GPU compiler makes of each: registers per thread, spilled
(local-memory) bytes, shared memory against the device's limit.

    python benchmarks/compile_check.py [--arch sm_80,sm_90] [--kernel NAME] [--dtype bf16]
                                       [--shape qwen2.5-1.5b] [--max-configs N] [--json]

How: the op launchers in ``fastlatent/ops`` run on ``meta`` tensors at the LatentR3 shapes
of ``benchmarks/shapes.py`` with every kernel object replaced by a recorder, so the
arguments, dtypes and constexprs are exactly what a real launch passes. Each recorded
launch is then compiled with ``triton.compile(ASTSource(...), target=GPUTarget(...))``
for every autotune config, through Triton's own cache (``TRITON_CACHE_DIR`` is honoured,
so the cubins stay there to inspect), specialised as a launch would be (16-byte aligned
pointers, integers divisible by 16 marked so, integers equal to 1 made constants). The
resource usage comes from ``cuobjdump --dump-resource-usage`` shipped in Triton's wheel,
the spills (bytes of spill stores + loads) from ``ptxas -v`` on the same PTX, dynamic
shared memory from the compiled kernel's metadata.

Output: one line per kernel x config x dtype x shape x arch; with ``--json`` one JSON
object per line and, last, a summary with ``compiled``, ``failed``,
``configs_with_spills`` and ``max_shared_bytes``. Exit status 1 when a compile failed.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# The kernels pick their GPU autotune configs only when the interpreter is off.
if os.environ.get("TRITON_INTERPRET") == "1":
    raise SystemExit("compile_check: unset TRITON_INTERPRET (the interpreter's configs are "
                     "not the ones a GPU compiles)")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shapes import PAPER_STEP, PAPER_TREE_STEP, QWEN25_15B_HEAD, SMOLLM2_HEAD  # noqa: E402

SHARED_LIMIT = {80: 164 * 1024, 90: 227 * 1024}  # usable shared memory per block (bytes)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
POINTER_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
                 torch.int64: "i64", torch.int32: "i32", torch.int8: "i8",
                 torch.uint8: "u8", torch.bool: "i1"}


@dataclass(frozen=True)
class ModelShape:
    """What the three ops see for one model at the paper's RL step."""

    name: str
    hidden: int
    vocab: int
    heads: int
    kv_heads: int
    head_dim: int


MODELS = {
    "smollm2": ModelShape("smollm2", SMOLLM2_HEAD.hidden, SMOLLM2_HEAD.vocab, 9, 3, 64),
    "qwen2.5-1.5b": ModelShape("qwen2.5-1.5b", QWEN25_15B_HEAD.hidden, QWEN25_15B_HEAD.vocab,
                               12, 2, 128),
}


# ---- recording launches ------------------------------------------------------------------
@dataclass
class Launch:
    kernel: str
    fn: JITFunction
    configs: list[triton.Config]
    args: tuple
    kwargs: dict[str, Any]


class _Recorder:
    """Stands in for a kernel object: ``kernel[grid](*args)`` records instead of running."""

    def __init__(self, name: str, kernel: Autotuner | JITFunction, sink: list[Launch]):
        self.name, self.kernel, self.sink = name, kernel, sink

    def __getitem__(self, grid) -> Callable[..., None]:
        kernel = self.kernel
        if isinstance(kernel, Autotuner):
            fn, configs = kernel.fn, list(kernel.configs)
        else:
            fn, configs = kernel, [triton.Config({}, num_warps=4, num_stages=3)]
        while not isinstance(fn, JITFunction):  # heuristics wrappers
            fn = fn.fn

        def record(*args, **kwargs):
            kept = configs
            prune = getattr(kernel, "early_config_prune", None)
            if prune is not None:  # the configs the autotuner would try for these arguments
                kept = prune(configs, dict(zip(fn.arg_names, args, strict=False)), **kwargs)
            self.sink.append(Launch(self.name, fn, kept, args, kwargs))
        return record


@contextlib.contextmanager
def recording(module) -> Iterator[list[Launch]]:
    sink: list[Launch] = []
    saved = {name: obj for name, obj in vars(module).items()
             if isinstance(obj, (Autotuner, JITFunction))}
    for name, obj in saved.items():
        setattr(module, name, _Recorder(name, obj, sink))
    try:
        yield sink
    finally:
        for name, obj in saved.items():
            setattr(module, name, obj)


# fastlatent.ops exports functions named like its modules, so the launcher modules are
# imported by name.


def _meta(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta")


def launches_fused_logprob(model: ModelShape, dtype: torch.dtype) -> list[Launch]:
    """Forward, combine and the backward coefficient kernel over the RL step's target rows."""
    from fastlatent.kernels import fused_logprob as kern
    op = importlib.import_module("fastlatent.ops.fused_logprob")

    rows = PAPER_STEP.prompts * PAPER_STEP.k * PAPER_STEP.target_len
    hidden, weight = _meta(rows, model.hidden, dtype=dtype), _meta(model.vocab, model.hidden,
                                                                   dtype=dtype)
    targets = _meta(rows, dtype=torch.int64)
    with recording(kern) as sink:
        _, lse = op._fused_logprob_fwd(hidden, weight, targets)
        op._fused_logprob_bwd(_meta(rows), hidden, weight, targets, _meta(rows),
                              need_hidden=True, need_weight=True)
    return sink


def launches_latent_attention(model: ModelShape, dtype: torch.dtype) -> list[Launch]:
    """LatentRATT's attention core forward/backward and the K-way expansion (given noise
    and in-kernel Philox noise), one head over d as in the release."""
    from fastlatent.kernels import latent_attention as kern
    op = importlib.import_module("fastlatent.ops.latent_attention")

    b, length, d, k = PAPER_STEP.prompts, PAPER_STEP.prompt_len, model.hidden, PAPER_STEP.k
    hidden = _meta(b, length, d, dtype=dtype)
    mask, pos = _meta(b, length, dtype=torch.int32), _meta(b, length, dtype=torch.int32)
    qcol, q, keys = _meta(b, dtype=torch.int32), _meta(b, d), _meta(b, length, d)
    with recording(kern) as sink:
        op._latent_attention_fwd(hidden, mask, pos, qcol, q, keys, 1000.0)
        op._latent_attention_expand(_meta(b, d), _meta(d), _meta(b, k, d), 1.5)
        op._latent_attention_expand(_meta(b, d), _meta(d), None, 1.5, seed=7, num_samples=k)
        op._latent_attention_bwd(_meta(b, d), hidden, mask, pos, qcol, q, keys,
                                 _meta(b, length), 1000.0)
    return sink


def launches_shared_prefix_attention(model: ModelShape, dtype: torch.dtype) -> list[Launch]:
    """One layer of the RL suffix pass: G prompts x K rows of [latent, target] tokens over
    the batch's common start and each prompt's own cache (the release template's split);
    forward, dq, and dk/dv for suffix, prompt and common keys."""
    from fastlatent.kernels import shared_prefix_attention as kern
    op = importlib.import_module("fastlatent.ops.shared_prefix_attention")

    step = PAPER_TREE_STEP
    g, rows, t = step.prompts, step.k, 1 + step.target_len
    h, hkv, d, length, c = (model.heads, model.kv_heads, model.head_dim, step.prompt_len,
                            step.common_len)
    r = g * rows
    q, k, v = _meta(r, h, t, d, dtype=dtype), _meta(r, hkv, t, d, dtype=dtype), \
        _meta(r, hkv, t, d, dtype=dtype)
    valid = _meta(r, t, dtype=torch.int8)
    pk, pv = _meta(g, hkv, length, d, dtype=dtype), _meta(g, hkv, length, d, dtype=dtype)
    ok = _meta(g, length, dtype=torch.int8)
    ck, cv = _meta(1, hkv, c, d, dtype=dtype), _meta(1, hkv, c, d, dtype=dtype)
    cok = _meta(1, c, dtype=torch.int8)
    scale = d ** -0.5
    with recording(kern) as sink:
        out, lse = op._shared_prefix_attention_fwd(q, k, v, valid, pk, pv, ok, ck, cv, cok,
                                                   rows, scale)
        op._shared_prefix_attention_bwd(_meta(r, h, t, d), q, k, v, valid, pk, pv, ok, ck, cv,
                                        cok, out, lse, rows, scale, (True,) * 7)
    return sink


OPS = {"fused_logprob": launches_fused_logprob,
       "latent_attention": launches_latent_attention,
       "shared_prefix_attention": launches_shared_prefix_attention}


# ---- compiling one launch ----------------------------------------------------------------
def specialise(launch: Launch, config: triton.Config
               ) -> tuple[dict[str, str], dict[str, Any], dict[tuple[int], list], dict]:
    """Signature, constexprs and attributes as a real launch would specialise them."""
    fn = launch.fn
    names = fn.arg_names
    values = dict(zip(names, launch.args, strict=False))  # the rest come as kwargs
    values.update(launch.kwargs)
    values.update(config.kwargs)
    signature: dict[str, str] = {}
    constexprs: dict[str, Any] = {}
    attrs: dict[tuple[int], list] = {}
    no_spec = set(getattr(fn, "do_not_specialize", ()) or ())
    for i, param in enumerate(fn.params):
        name = param.name
        if param.is_constexpr:
            value = values[name] if name in values else param.default
            signature[name], constexprs[name] = "constexpr", value
            continue
        if name not in values:
            raise TypeError(f"{launch.kernel}: no value recorded for argument {name!r}")
        value = values[name]
        if isinstance(value, torch.Tensor):
            signature[name] = "*" + POINTER_TYPES[value.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]  # the caching allocator aligns to 256 B
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            if value == 1 and i not in no_spec and name not in no_spec:
                signature[name], constexprs[name] = "constexpr", 1
                continue
            signature[name] = "i32" if -2**31 <= value < 2**31 else "i64"
            if value % 16 == 0 and i not in no_spec and name not in no_spec:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        elif value is None:
            signature[name], constexprs[name] = "constexpr", None
        else:
            raise TypeError(f"{launch.kernel}: cannot type argument {name}={value!r}")
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    return signature, constexprs, attrs, options


_USAGE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


_SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, "
                     r"(\d+) bytes spill loads")
_TARGET = re.compile(r"^\.target\s+(\S+)", re.M)


def nvidia_tool(name: str) -> Path:
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if not path.is_file():
        raise SystemExit(f"compile_check: {path} is missing (Triton's NVIDIA backend tools)")
    return path


def ptxas_for(cc: int) -> str:
    """The ptxas Triton itself runs for this target (its PTX version needs that one)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas
    except ImportError:
        return str(nvidia_tool("ptxas"))
    try:
        return str(get_ptxas(cc).path)
    except TypeError:  # older Triton: get_ptxas() takes no architecture
        return str(get_ptxas().path)


def resource_usage(cubin: bytes, ptx: str, cc: int) -> dict[str, int]:
    """Registers, stack frame and static shared memory of the cubin Triton built
    (cuobjdump), and the spill stores/loads ptxas reports for the same PTX (ptxas -v, as
    Triton runs it)."""
    with tempfile.TemporaryDirectory() as tmp:
        binary, source = Path(tmp) / "k.cubin", Path(tmp) / "k.ptx"
        binary.write_bytes(cubin)
        source.write_text(ptx)
        usage = subprocess.run([str(nvidia_tool("cuobjdump")), "--dump-resource-usage",
                                str(binary)], capture_output=True, text=True,
                               check=True).stdout
        target = _TARGET.search(ptx)
        log = ""
        # Triton's own flags (3.9 adds --regAllocOptLevel=2 for a ptxas 13 bug; older
        # ptxas may not know it, so it is retried without).
        for extra in (["--regAllocOptLevel=2"], []):
            done = subprocess.run([ptxas_for(cc), "-lineinfo", "-v", *extra,
                                   f"--gpu-name={target[1]}", str(source), "-o",
                                   str(Path(tmp) / "check.cubin")],
                                  capture_output=True, text=True)
            log += done.stderr
            if done.returncode == 0:
                break
    match, spills = _USAGE.search(usage), _SPILLS.search(log)
    if not match or not spills:
        raise RuntimeError(f"no resource usage found: {usage[-300:]!r} {log[-300:]!r}")
    reg, stack, shared, local = map(int, match.groups())
    return {"registers": reg, "stack_bytes": stack, "static_shared_bytes": shared,
            "local_bytes": local, "spill_bytes": int(spills[2]) + int(spills[3])}


@dataclass
class Result:
    op: str
    kernel: str
    shape: str
    dtype: str
    arch: str
    config: str
    compiled: bool
    seconds: float
    registers: int | None = None
    spill_bytes: int | None = None
    stack_bytes: int | None = None
    shared_bytes: int | None = None
    shared_limit: int | None = None
    error: str | None = None
    constexprs: dict[str, Any] = field(default_factory=dict)


def config_label(config: triton.Config) -> str:
    tiles = ",".join(f"{k}={v}" for k, v in sorted(config.kwargs.items()))
    return f"{tiles or 'default'} w{config.num_warps} s{config.num_stages}"


def compile_one(op: str, launch: Launch, config: triton.Config, shape: str, dtype: str,
                cc: int) -> Result:
    signature, constexprs, attrs, options = specialise(launch, config)
    shown = {k: v for k, v in constexprs.items() if k not in config.kwargs}
    base = dict(op=op, kernel=launch.kernel, shape=shape, dtype=dtype, arch=f"sm_{cc}",
                config=config_label(config), constexprs=shown)
    t0 = time.perf_counter()
    try:
        compiled = triton.compile(ASTSource(launch.fn, signature, constexprs, attrs),
                                  target=GPUTarget("cuda", cc, 32), options=options)
        usage = resource_usage(compiled.asm["cubin"], compiled.asm["ptx"], cc)
    except Exception as err:  # the compiler's own error is the finding
        message = str(err).strip().splitlines()
        return Result(**base, compiled=False, seconds=time.perf_counter() - t0,
                      error=f"{type(err).__name__}: {message[-1] if message else ''}"[:500])
    shared = max(int(getattr(compiled.metadata, "shared", 0) or 0),
                 usage["static_shared_bytes"])
    return Result(**base, compiled=True, seconds=time.perf_counter() - t0,
                  registers=usage["registers"], spill_bytes=usage["spill_bytes"],
                  stack_bytes=usage["stack_bytes"], shared_bytes=shared,
                  shared_limit=SHARED_LIMIT[cc])


def unique_launches(launches: list[Launch]) -> list[Launch]:
    """One launch per kernel and constexpr set (e.g. the two dk/dv launches differ in
    SUFFIX; two expand launches in HAS_NOISE/HAS_SEED). The launchers pass every argument
    by keyword; only the constexpr ones tell launches apart here."""
    seen, out = set(), []
    for launch in launches:
        constexprs = {param.name for param in launch.fn.params if param.is_constexpr}
        key = (launch.kernel, tuple(sorted((k, repr(v)) for k, v in launch.kwargs.items()
                                           if k in constexprs)))
        if key not in seen:
            seen.add(key)
            out.append(launch)
    return out


def run(args: argparse.Namespace) -> list[Result]:
    archs = [int(a.removeprefix("sm_")) for a in args.arch.split(",") if a]
    ops = [op for op in OPS if not args.op or op in args.op.split(",")]
    for op in ops:  # import every kernel now: @triton.jit reads its source at import
        importlib.import_module(f"fastlatent.kernels.{op}")
        importlib.import_module(f"fastlatent.ops.{op}")
    results = []
    for op in ops:
        make = OPS[op]
        for shape in args.shape.split(","):
            for dtype in args.dtype.split(","):
                launches = unique_launches(make(MODELS[shape], DTYPES[dtype]))
                for launch in launches:
                    if args.kernel and args.kernel not in launch.kernel:
                        continue
                    configs = launch.configs[:args.max_configs or None]
                    for config in configs:
                        for cc in archs:
                            result = compile_one(op, launch, config, shape, dtype, cc)
                            results.append(result)
                            report(result, args.json)
    return results


def report(result: Result, as_json: bool) -> None:
    if as_json:
        print(json.dumps(asdict(result), default=str), flush=True)
        return
    if not result.compiled:
        print(f"FAILED {result.kernel} {result.arch} {result.dtype} {result.shape} "
              f"[{result.config}]: {result.error}", flush=True)
        return
    flag = " SPILLS" if result.spill_bytes else ""
    flag += " OVER SHARED LIMIT" if result.shared_bytes > result.shared_limit else ""
    print(f"{result.kernel:<42} {result.arch} {result.dtype:<4} {result.shape:<12} "
          f"[{result.config}] regs {result.registers:>3}  spill {result.spill_bytes:>5} B  "
          f"shared {result.shared_bytes / 1024:6.1f} KiB  ({result.seconds:.1f} s){flag}",
          flush=True)


def summarise(results: list[Result]) -> dict[str, Any]:
    ok = [r for r in results if r.compiled]
    spilled = sorted({(r.kernel, r.config, r.dtype, r.shape, r.arch) for r in ok
                      if r.spill_bytes})
    return {"summary": True, "triton": triton.__version__,
            "compiled": len(ok), "failed": len(results) - len(ok),
            "configs_with_spills": len(spilled),
            "max_shared_bytes": max((r.shared_bytes for r in ok), default=0),
            "over_shared_limit": sum(r.shared_bytes > r.shared_limit for r in ok),
            "max_registers": max((r.registers for r in ok), default=0),
            "spilled": [" ".join(s) for s in spilled]}


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """One line per kernel x dtype x arch from ``--json`` lines: configs compiled, register
    range, spills (worst config; how many configs spill), most shared memory."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for row in rows:
        if not row.get("summary"):
            groups.setdefault((row["kernel"], row["dtype"], row["arch"]), []).append(row)
    lines = ["| kernel | dtype | arch | compiled | registers | spill B (configs) | "
             "shared KiB |", "|---|---|---|---|---|---|---|"]
    for (kernel, dtype, arch), group in sorted(groups.items()):
        ok = [r for r in group if r["compiled"]]
        if not ok:
            lines.append(f"| {kernel} | {dtype} | {arch} | 0/{len(group)} | — | — | — "
                         f"(`{group[0]['error'][:60]}`) |")
            continue
        spilling = [r for r in ok if r["spill_bytes"]]
        regs = sorted(r["registers"] for r in ok)
        lines.append(f"| {kernel} | {dtype} | {arch} | {len(ok)}/{len(group)} | "
                     f"{regs[0]}–{regs[-1]} | {max(r['spill_bytes'] for r in ok)} "
                     f"({len(spilling)}) | {max(r['shared_bytes'] for r in ok) / 1024:.0f} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="sm_80,sm_90", help="comma-separated sm_XX targets")
    p.add_argument("--op", default="", help=f"comma-separated ops among {sorted(OPS)}")
    p.add_argument("--kernel", default="", help="only kernels whose name contains this")
    p.add_argument("--dtype", default="fp32,fp16,bf16", help="input dtypes of the launchers")
    p.add_argument("--shape", default="smollm2,qwen2.5-1.5b",
                   help=f"model shapes among {sorted(MODELS)}")
    p.add_argument("--max-configs", type=int, default=0,
                   help="compile only the first N autotune configs per kernel (0 = all)")
    p.add_argument("--json", action="store_true", help="JSON lines; the last is a summary")
    p.add_argument("--table", default="", metavar="JSONL",
                   help="print the markdown table of an earlier --json run and exit")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.table:
        print(markdown_table([json.loads(line) for line in
                              Path(args.table).read_text().splitlines() if line.strip()]))
        return 0
    t0 = time.perf_counter()
    results = run(args)
    summary = summarise(results)
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"compiled {summary['compiled']}, failed {summary['failed']}, "
              f"configs with spills {summary['configs_with_spills']}, max shared "
              f"{summary['max_shared_bytes'] / 1024:.1f} KiB, max registers "
              f"{summary['max_registers']} (Triton {summary['triton']}, "
              f"{summary['seconds']} s)")
    return 1 if summary["failed"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
