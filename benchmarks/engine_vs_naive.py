"""One RL step, one SFT step and one evaluation batch: engine vs the naive oracles.

    python benchmarks/engine_vs_naive.py --json              # SmolLM2-135M, 8 ml-100k prompts, K=8
    python benchmarks/engine_vs_naive.py --template latentr3 --json   # the release's wording
    python benchmarks/engine_vs_naive.py --data csv:../shared/data/amazon-cds --train-split valid \
        --template latentr3 --json                               # the paper's CDs prompts
    python benchmarks/engine_vs_naive.py --model qwen2.5-1.5b-random --device cuda --json

Each path runs in its own subprocess, so one path's peak memory cannot hide another's:
on the CPU peak RSS (VmHWM, reset after loading) minus the RSS after loading; on CUDA
torch.cuda.max_memory_allocated after a reset. Times are medians of --repeats runs after
--warmup runs. The last line of stdout is one JSON object with the ratios, and
``prompt_tokens_encoded_ratio`` per stage: the prompt tokens the engine runs through the
LLM divided by those the naive path runs (counted from the batch: the engine encodes the
batch's common start once and each prompt's own tokens once; the naive RL step encodes
every prompt once for r and again in each of its K rows, the naive SFT step twice,
HF beam search once for r and once per beam).

    python benchmarks/engine_vs_naive.py --nproc 2 --json    # data parallel: 1 vs 2 processes

``--nproc N`` times whole optimiser steps instead (``accumulate_rl_gradients`` /
``accumulate_sft_gradients`` over the global batch of --prompts, as the trainer runs them):
once in one process with the machine's threads, once under ``torchrun --nproc-per-node N``
(gloo on the CPU, NCCL on GPUs; one thread per process on the CPU), and reports the seconds
per step, the speed-up, and the share of a step rank 0 spends in the collectives (gradient
all-reduce, reward gather, loss sum; this includes waiting for a slower rank).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

PATHS = ("rl-naive", "rl-engine", "sft-naive", "sft-engine", "eval-naive", "eval-engine")


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def setup(args):
    """The dataset, a LatentReasoner over ``args.model`` (LatentRATT at its seeded init) on
    ``args.device`` and its prompt builder: what every benchmark of a step starts from."""
    from fastlatent.data.prompt import PromptBuilder
    from fastlatent.data.sources import load_dataset
    from fastlatent.model.loading import load_llm
    from fastlatent.model.reasoner import LatentReasoner, ReasonerConfig

    dataset = load_dataset(args.data, seed=0)
    texts = list(dataset.catalogue.distinct_titles)
    llm, tok = load_llm(args.model, dtype=args.dtype, tokenizer_texts=texts, seed=0)
    reasoner = LatentReasoner.build(llm, tok, ReasonerConfig()).to(args.device)
    return dataset, reasoner, PromptBuilder(tok, domain=dataset.domain, template=args.template)


def build(args, encoded_rows: bool = False):
    import torch

    from fastlatent.data.batch import collate
    from fastlatent.data.sampling import seeded_sample
    from fastlatent.evaluate import build_title_trie

    dataset, reasoner, builder = setup(args)
    tok = reasoner.tokenizer
    rows = seeded_sample(dataset.split(args.train_split), args.prompts, seed=0)
    if encoded_rows:  # the trainer's input: one optimiser batch of encoded examples
        torch.manual_seed(0)
        return reasoner, [builder.encode(ex) for ex in rows]
    batch = collate([builder.encode(ex) for ex in rows], tok.pad_token_id).to(args.device)
    users = seeded_sample(dataset.split(args.eval_split), args.eval_users, seed=0)
    eval_batch = collate([builder.encode(ex) for ex in users], tok.pad_token_id).to(args.device)
    trie = build_title_trie(builder, dataset.catalogue)
    torch.manual_seed(0)
    return reasoner, batch, eval_batch, trie


def path_function(name: str, reasoner, batch, eval_batch, trie, args):
    import torch

    from fastlatent.engine.decoder import Decoder
    from fastlatent.engine.grpo import sample_noise
    from fastlatent.engine.steps import rl_step, sft_step
    from fastlatent.rl import freeze_llm
    from fastlatent.testing.naive_steps import loss_of_one_pool, naive_rl_step, naive_sft_step

    stage, impl = name.split("-")
    tok = reasoner.tokenizer
    if stage == "rl":
        freeze_llm(reasoner)
        noise = sample_noise(len(batch), args.num_samples, reasoner.llm.config.hidden_size,
                             generator=torch.Generator().manual_seed(0), device=args.device)
        decoder = Decoder(reasoner.llm)

        def run():
            if impl == "naive":
                loss = naive_rl_step(reasoner, batch, noise=noise, sigma=1.5).loss
            else:
                out = rl_step(reasoner, batch, noise=noise, sigma=1.5, decoder=decoder)
                loss, _ = loss_of_one_pool(out)
            loss.backward()
            reasoner.ratt.zero_grad(set_to_none=True)
        return run
    if stage == "sft":
        reasoner.train()
        decoder = Decoder(reasoner.llm)

        def run():
            if impl == "naive":
                out = naive_sft_step(reasoner, batch)
            else:
                out = sft_step(reasoner, batch, decoder=decoder)
            (out.nll_sum / out.num_tokens).backward()
            reasoner.zero_grad(set_to_none=True)
        return run
    reasoner.eval()

    def run():
        with torch.no_grad():
            if impl == "naive":
                from fastlatent.testing.beam_search import naive_beam_search

                embeds = reasoner.prompt_embeds(eval_batch.prompt_ids, eval_batch.prompt_mask)
                naive_beam_search(reasoner.llm, embeds, eval_batch.prompt_mask, trie,
                                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                  num_beams=10, num_return=10, length_penalty=1.0,
                                  max_new_tokens=128)
            else:
                from fastlatent.engine.beam_search import engine_beam_search

                engine_beam_search(reasoner, eval_batch.prompt_ids, eval_batch.prompt_mask,
                                   trie, num_beams=10, num_return=10, length_penalty=1.0,
                                   max_new_tokens=128)
    return run


DP_PATHS = ("dp-rl", "dp-sft")


def data_parallel_function(name: str, reasoner, batch_rows, args):
    """A whole optimiser step's gradient as the trainer computes it, with the time spent
    in the collectives recorded in ``comm`` (seconds, appended per call)."""
    import torch

    from fastlatent import distributed, rl, sft
    from fastlatent.config import RLConfig
    from fastlatent.engine.generic import step_for

    comm: list[float] = []
    for fn in ("all_reduce_gradients", "gather_dealt", "sum_floats"):
        real = getattr(distributed, fn)

        def timed(*a, _real=real, **kw):
            start = time.perf_counter()
            try:
                return _real(*a, **kw)
            finally:
                comm.append(time.perf_counter() - start)
        setattr(distributed, fn, timed)
    share = -(-len(batch_rows) // distributed.world_size())
    if name == "dp-rl":
        rl.freeze_llm(reasoner)
        cfg = RLConfig(rl_batch_size=len(batch_rows), num_samples=args.num_samples, sigma=1.5)
        step = step_for(reasoner, "rl")

        def run():
            rl.accumulate_rl_gradients(reasoner, batch_rows, cfg, step,
                                       torch.Generator().manual_seed(0))
            reasoner.ratt.zero_grad(set_to_none=True)
    else:
        reasoner.train()
        step = step_for(reasoner, "sft")

        def run():
            sft.accumulate_sft_gradients(reasoner, batch_rows, share, step)
            reasoner.zero_grad(set_to_none=True)
    return run, comm


def data_parallel_worker(args) -> dict:
    from fastlatent import distributed

    if distributed.launched():
        distributed.init(args.device, timeout_minutes=30)
    try:
        reasoner, batch_rows = build(args, encoded_rows=True)
        distributed.broadcast_parameters(reasoner)
        run, comm = data_parallel_function(args.worker, reasoner, batch_rows, args)
        for _ in range(args.warmup):
            run()
        times, comm_shares = [], []
        for _ in range(args.repeats):
            distributed.barrier()
            comm.clear()
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
            comm_shares.append(sum(comm) / times[-1])
        return {"path": args.worker, "nproc": distributed.world_size(),
                "threads": __import__("torch").get_num_threads(),
                "seconds": statistics.median(times), "times": times,
                "comm_share": statistics.median(comm_shares)}
    finally:
        distributed.close()


def run_worker(cmd: list[str], env: dict[str, str]) -> dict:
    """One path's subprocess: its JSON line, or ``{"error": [last stderr line]}``."""
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        return {"error": proc.stderr.strip().splitlines()[-1:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_data_parallel(args, argv) -> dict:
    """Each dp path with one process and with ``args.nproc``; the ratios."""
    given = list(argv if argv is not None else sys.argv[1:])
    base = []  # the worker's flags; --nproc would be an ambiguous prefix to torchrun
    while given:
        arg = given.pop(0)
        if arg == "--nproc":
            given.pop(0)
        elif arg != "--json" and not arg.startswith("--nproc="):
            base.append(arg)
    results = {}
    for name in DP_PATHS:
        for n in (1, args.nproc):
            worker = [__file__, "--worker", name, *base, "--device", args.device]
            env = os.environ.copy()
            if n == 1:
                cmd = [sys.executable, *worker]
            else:
                cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                       "--nproc-per-node", str(n), *worker]
                if not args.device.startswith("cuda"):
                    env["OMP_NUM_THREADS"] = "1"
            print(f"running {name} with {n} process(es) ...", file=sys.stderr, flush=True)
            key = f"{name}-{n}"
            results[key] = run_worker(cmd, env)
            if "error" not in results[key]:
                print(f"  {key}: {results[key]['seconds']:.3f} s per step, collectives "
                      f"{results[key]['comm_share']:.1%}", file=sys.stderr)

    def speedup(name):
        one, many = results.get(f"{name}-1", {}), results.get(f"{name}-{args.nproc}", {})
        if "seconds" not in one or "seconds" not in many:
            return None
        return round(one["seconds"] / many["seconds"], 3)

    return {"nproc": args.nproc, "rl_speedup_vs_1_process": speedup("dp-rl"),
            "sft_speedup_vs_1_process": speedup("dp-sft"),
            "rl_comm_share": results.get(f"dp-rl-{args.nproc}", {}).get("comm_share"),
            "sft_comm_share": results.get(f"dp-sft-{args.nproc}", {}).get("comm_share"),
            "device": args.device, "model": args.model, "dtype": args.dtype,
            "batch": args.prompts, "k": args.num_samples, "repeats": args.repeats, "paths": results}


def prompt_token_counts(batch, eval_batch, k: int, num_beams: int) -> dict:
    """Prompt tokens each path runs through the LLM, per stage (see the module docstring);
    the thought token is not a prompt token here (the latent takes its place)."""
    from fastlatent.engine.decoder import common_prefix_length

    def engine(b):
        ids, mask = b.prompt_ids[:, :-1], b.prompt_mask[:, :-1]
        c = common_prefix_length(ids, mask)
        return c + int(mask.sum()) - c * ids.shape[0]

    def naive(b, passes):
        return passes * int(b.prompt_mask[:, :-1].sum())

    return {"rl": {"engine": engine(batch), "naive": naive(batch, k + 1)},
            "sft": {"engine": engine(batch), "naive": naive(batch, 2)},
            "eval": {"engine": engine(eval_batch), "naive": naive(eval_batch, num_beams + 1)}}


def worker(args) -> dict:
    import torch

    reasoner, batch, eval_batch, trie = build(args)
    run = path_function(args.worker, reasoner, batch, eval_batch, trie, args)
    cuda = args.device.startswith("cuda")

    def sync():
        if cuda:
            torch.cuda.synchronize()

    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_kib("VmRSS") * 1024  # after loading the model and data
        _reset_peak()
    for _ in range(args.warmup):
        run()
    sync()
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        run()
        sync()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if cuda else _rss_kib("VmHWM") * 1024
    return {"path": args.worker, "seconds": statistics.median(times), "times": times,
            "peak_bytes": max(0, peak - base),
            "prompt_tokens": int(batch.prompt_mask.sum()),
            "target_tokens": int(batch.target_mask.sum()),
            "prompt_tokens_encoded": prompt_token_counts(batch, eval_batch, args.num_samples, 10)}


def add_setup_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags :func:`setup` reads, shared with grpo_cost.py: model, data, prompts, K,
    repeats, dtype and device."""
    parser.add_argument("--model", default="smollm2-135m",
                        help="smollm2-135m | smollm2-135m-random | qwen2.5-1.5b-random | ...")
    parser.add_argument("--data", default="movielens-100k", help="dataset spec (see train.py)")
    parser.add_argument("--train-split", default="train", help="split of the training prompts")
    parser.add_argument("--template", default="default", choices=("default", "latentr3"),
                        help="prompt wording (latentr3: the release's)")
    parser.add_argument("--prompts", type=int, default=8, help="prompts per step")
    parser.add_argument("--num-samples", type=int, default=8,
                        help="K: rows per prompt in RL (the trainer's --num-samples)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per path (median)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs per path")
    parser.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_setup_arguments(parser)
    parser.add_argument("--eval-split", default="test", help="split of the beam-search users")
    parser.add_argument("--eval-users", type=int, default=4, help="users per beam-search batch")
    parser.add_argument("--paths", default=",".join(PATHS), help="comma-separated subset")
    parser.add_argument("--nproc", type=int, default=1,
                        help="> 1: time whole optimiser steps with 1 and with N processes "
                             "(torchrun; gloo on the CPU) instead of engine vs naive")
    parser.add_argument("--json", action="store_true", help="print the JSON summary last")
    parser.add_argument("--worker", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device == "auto":
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.worker in DP_PATHS:
        result = data_parallel_worker(args)
        if os.environ.get("RANK", "0") == "0":
            print(json.dumps(result))
        return 0
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    if args.nproc > 1:
        summary = run_data_parallel(args, argv)
        print(json.dumps(summary) if args.json else json.dumps(summary, indent=2))
        return 0
    results = {}
    for name in args.paths.split(","):
        cmd = [sys.executable, __file__, "--worker", name] + [
            a for a in (argv if argv is not None else sys.argv[1:]) if a != "--json"]
        if "--device" not in cmd:
            cmd += ["--device", args.device]
        print(f"running {name} ...", file=sys.stderr, flush=True)
        results[name] = run_worker(cmd, os.environ.copy())
        if "error" not in results[name]:
            print(f"  {name}: {results[name]['seconds']:.3f} s, peak "
                  f"{results[name]['peak_bytes'] / 2**20:.0f} MiB", file=sys.stderr)

    def ratio(stage, key, invert=False):
        a, b = results.get(f"{stage}-naive", {}), results.get(f"{stage}-engine", {})
        if key not in a or key not in b or not (a[key] and b[key]):
            return None
        return round(b[key] / a[key] if invert else a[key] / b[key], 3)

    def encoded_ratios(results):
        counts = next((r["prompt_tokens_encoded"] for r in results.values()
                       if "prompt_tokens_encoded" in r), None)
        if counts is None:
            return None
        return {stage: round(c["engine"] / c["naive"], 3) for stage, c in counts.items()}

    summary = {
        "rl_speedup_vs_naive": ratio("rl", "seconds"),
        "rl_peak_mem_ratio": ratio("rl", "peak_bytes", invert=True),
        "sft_speedup_vs_naive": ratio("sft", "seconds"),
        "sft_peak_mem_ratio": ratio("sft", "peak_bytes", invert=True),
        "eval_speedup_vs_naive": ratio("eval", "seconds"),
        "prompt_tokens_encoded_ratio": encoded_ratios(results),
        "template": args.template,
        "device": args.device, "model": args.model, "dtype": args.dtype,
        "batch": args.prompts, "k": args.num_samples, "eval_users": args.eval_users,
        "repeats": args.repeats, "paths": results,
    }
    if args.json:
        print(json.dumps(summary))
    else:
        print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
