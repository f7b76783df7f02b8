"""The training cost of the paper's Figure 4 / App. F: one RL optimiser step of the
modified GRPO (PPL reward, LatentRATT only) against the original GRPO (each latent row
writes an answer, 0/1 exact-match reward), on the LatentRATT alone and on the whole model.

    python benchmarks/grpo_cost.py --json                     # SmolLM2-135M, 8 ml-100k prompts, K=8
    python benchmarks/grpo_cost.py --data csv:DATA --train-split valid --json

Each path is a whole optimiser step as the trainer runs it (``accumulate_rl_gradients``
then the clipped AdamW update), on the same batch, the same noise and the same starting
weights (each path owns a copy of the model, so one path's updates never reach another's
inputs). The paths run interleaved (A B C, A B C, ...) after a warm-up round; each
reports the median and the spread of its step times, and the ratios of the medians.

    ppl             --reward ppl          --rl-trainable ratt   (the paper's latent GRPO)
    exact_match     --reward exact-match  --rl-trainable ratt   (decoded answers, 0/1 reward)
    exact_match_all --reward exact-match  --rl-trainable all    (the original GRPO: full model)

The paper reports the modified GRPO at about 1/5 of the original's training cost. Here
the decoding runs on the engine (the K rows share the prompt's cache and forced trie runs
are fed in one pass), constrained greedy over the catalogue rather than free text, so the
ratio measures this engine's original GRPO, not the paper's implementation of it.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time

PATHS = {"ppl": ("ppl", "ratt"), "exact_match": ("exact-match", "ratt"),
         "exact_match_all": ("exact-match", "all")}


def build(args):
    """The reasoner, one optimiser batch of encoded training rows and the catalogue's trie."""
    import torch
    from engine_vs_naive import setup

    from fastlatent.data.sampling import seeded_sample
    from fastlatent.evaluate import build_title_trie

    dataset, reasoner, builder = setup(args)
    rows = seeded_sample(dataset.split(args.train_split), args.prompts, seed=0)
    torch.manual_seed(0)
    return (reasoner, [builder.encode(ex) for ex in rows],
            build_title_trie(builder, dataset.catalogue))


def step_function(reasoner, rows, trie, reward: str, trainable: str, args):
    """One optimiser step of RL with ``reward`` on ``trainable`` (the trainer's code)."""
    import torch

    from fastlatent.config import RLConfig
    from fastlatent.engine.generic import step_for
    from fastlatent.optim import clipped_update, make_scheduler
    from fastlatent.rl import accumulate_rl_gradients, rl_param_groups

    cfg = RLConfig(rl_batch_size=len(rows), num_samples=args.num_samples, sigma=args.sigma,
                   advantage="group" if reward == "exact-match" else "batch", reward=reward,
                   rl_trainable=trainable, rl_lr=1e-4, rl_llm_lr=1e-5)
    groups = rl_param_groups(reasoner, cfg)
    params = [p for g in groups for p in g["params"]]
    optimizer = torch.optim.AdamW(groups, lr=cfg.rl_lr, weight_decay=0.0)
    scheduler = make_scheduler(optimizer, "rl", 0, 10 ** 6)
    step = step_for(reasoner, "rl", reward=reward, trie=trie, train_llm=trainable == "all")
    stats = {"equal_reward_groups": [], "mean_reward": []}

    def run():
        out = accumulate_rl_gradients(reasoner, rows, cfg, step,
                                      torch.Generator().manual_seed(0), params)
        clipped_update(optimizer, scheduler, params, 1.0)
        stats["equal_reward_groups"].append(
            float((out.rewards == out.rewards[:, :1]).all(dim=1).float().mean()))
        stats["mean_reward"].append(float(out.rewards.mean()))
    return run, stats


def summary_of(times: list[float]) -> dict:
    ordered = sorted(times)
    return {"median_s": round(statistics.median(times), 4), "min_s": round(ordered[0], 4),
            "max_s": round(ordered[-1], 4), "times_s": [round(t, 4) for t in times]}


def main(argv=None) -> int:
    from engine_vs_naive import add_setup_arguments

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_setup_arguments(parser)
    parser.add_argument("--sigma", type=float, default=1.5, help="noise scale (--sigma)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    parser.add_argument("--paths", default=",".join(PATHS),
                        help=f"comma-separated subset of {', '.join(PATHS)}")
    parser.add_argument("--json", action="store_true", help="one JSON line on stdout")
    args = parser.parse_args(argv)
    names = [n for n in args.paths.split(",") if n]
    unknown = sorted(set(names) - set(PATHS))
    if unknown or args.num_samples < 2:
        parser.error(f"unknown --paths {unknown}; choose from {list(PATHS)}" if unknown else
                     "--num-samples: the exact-match reward needs K >= 2")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = args.device.startswith("cuda")
    reasoner, rows, trie = build(args)
    runs = {}
    for name in names:
        reward, trainable = PATHS[name]
        runs[name] = step_function(copy.deepcopy(reasoner), rows, trie, reward, trainable,
                                   args)
    del reasoner
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(args.warmup + args.repeats):
        for name in names:
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            runs[name][0]()
            if cuda:
                torch.cuda.synchronize()
            if round_ >= args.warmup:
                times[name].append(time.perf_counter() - start)
            print(f"round {round_ + 1}: {name} {time.perf_counter() - start:.3f} s",
                  file=sys.stderr, flush=True)
    result = {name: {**summary_of(times[name]),
                     "equal_reward_groups": runs[name][1]["equal_reward_groups"][-1],
                     "mean_reward": round(runs[name][1]["mean_reward"][-1], 4)}
              for name in names}
    summary = {f"{name}_s": result[name]["median_s"] for name in names}
    if "ppl" in result:
        for name in names:
            if name != "ppl":
                summary[f"{name}_vs_ppl"] = round(result[name]["median_s"]
                                                  / result["ppl"]["median_s"], 3)
    summary.update({"paper_original_vs_modified": 5.0, "device": args.device,
                    "model": args.model, "dtype": args.dtype, "data": args.data,
                    "prompts": args.prompts, "k": args.num_samples, "sigma": args.sigma,
                    "repeats": args.repeats, "threads": torch.get_num_threads(),
                    "paths": result})
    print(json.dumps(summary) if args.json else json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
