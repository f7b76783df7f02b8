"""Memory of one RL step per ``--base-quant`` and one SFT step per ``--optim`` (and with
LoRA r=16), and how far the quantised LLM moves the RL rewards.

    python benchmarks/memory_options.py --json       # SmolLM2-135M, 8 MovieLens prompts, K=8

Each setting runs in its own process. On the CPU: resident memory after the model is
loaded (and quantised), and the peak resident memory during the step (VmHWM reset after
loading); on CUDA: allocated bytes after loading and the peak during the step. The
rewards (fixed noise) of each quantised run are compared with the unquantised run's.
The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from engine_vs_naive import _reset_peak, _rss_kib  # noqa: E402

SETTINGS = ("rl-none", "rl-int8", "rl-nf4", "sft-adamw", "sft-adamw8bit", "sft-lora")


def worker(args) -> dict:
    import torch

    from fastlatent.config import RLConfig, SFTConfig
    from fastlatent.data.prompt import PromptBuilder
    from fastlatent.data.sampling import seeded_sample
    from fastlatent.data.sources import load_dataset
    from fastlatent.engine.generic import step_for
    from fastlatent.model.loading import load_llm
    from fastlatent.model.quantize import quantize_llm
    from fastlatent.model.reasoner import LatentReasoner, ReasonerConfig
    from fastlatent.optim import clipped_update, make_scheduler
    from fastlatent.rl import accumulate_rl_gradients, freeze_llm
    from fastlatent.sft import accumulate_sft_gradients, make_optimizer

    stage, option = args.worker.split("-")
    cuda = args.device.startswith("cuda")
    dataset = load_dataset(args.data, seed=0)
    if args.checkpoint:  # a trained model: its rewards are what RL would see
        reasoner = LatentReasoner.load(args.checkpoint, dtype=args.dtype).to(args.device)
        tok = reasoner.tokenizer
    else:
        llm, tok = load_llm(args.model, dtype=args.dtype,
                            tokenizer_texts=list(dataset.catalogue.distinct_titles), seed=0)
        reasoner = LatentReasoner.build(llm, tok, ReasonerConfig()).to(args.device)
    builder = PromptBuilder(tok, domain=dataset.domain)
    rows = [builder.encode(ex) for ex in
            seeded_sample(dataset.split("train"), args.prompts, seed=0)]
    if stage == "rl":
        freeze_llm(reasoner)
        quantize_llm(reasoner.llm, option, source=None)
    if option == "lora":  # LoRA r=16 on the projections, AdamW over adapters + LatentRATT
        from fastlatent.model.lora import LoraSettings, add_lora

        add_lora(reasoner.llm, LoraSettings(r=16, alpha=32.0, dropout=0.0))
    gc.collect()

    def memory() -> int:
        return torch.cuda.memory_allocated() if cuda else _rss_kib("VmRSS") * 1024

    loaded = memory()
    weight_bytes = sum(t.numel() * t.element_size() for t in
                       [*reasoner.llm.parameters(), *reasoner.llm.buffers()])
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    else:
        _reset_peak()
    result = {"setting": args.worker, "loaded_bytes": loaded, "llm_weight_bytes": weight_bytes}
    if stage == "rl":
        cfg = RLConfig(rl_batch_size=len(rows), num_samples=args.num_samples, sigma=1.5)
        out = accumulate_rl_gradients(reasoner, rows, cfg, step_for(reasoner, "rl"),
                                      torch.Generator().manual_seed(0))
        result["rewards"] = out.rewards.cpu().tolist()
    else:
        cfg = SFTConfig(optim="adamw" if option == "lora" else option,
                        sft_micro_batch=len(rows))
        if option != "lora":
            reasoner.requires_grad_(True)
        params = [p for p in reasoner.parameters() if p.requires_grad]
        result["trainable_params"] = sum(p.numel() for p in params)
        optimizer = make_optimizer(cfg, params)
        scheduler = make_scheduler(optimizer, "sft", 0, 10)
        accumulate_sft_gradients(reasoner, rows, len(rows), step_for(reasoner, "sft"))
        clipped_update(optimizer, scheduler, params, 1.0)
        result["optimizer_state_bytes"] = sum(
            t.numel() * t.element_size() for state in optimizer.state.values()
            for t in state.values() if torch.is_tensor(t))
    result["peak_bytes"] = (torch.cuda.max_memory_allocated() if cuda
                            else _rss_kib("VmHWM") * 1024)
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data", default="movielens-100k")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--num-samples", type=int, default=8, help="K: rows per prompt")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="auto")
    p.add_argument("--settings", default=",".join(SETTINGS))
    p.add_argument("--checkpoint", default="", help="a saved LatentReasoner instead of "
                   "--model with a fresh LatentRATT (e.g. OUTPUT_DIR/rl of a cpu-preset run)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.device == "auto":
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    results = {}
    base = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--json"]
    for name in args.settings.split(","):
        print(f"running {name} ...", file=sys.stderr, flush=True)
        proc = subprocess.run([sys.executable, __file__, "--worker", name, *base,
                               "--device", args.device], capture_output=True, text=True,
                              env=os.environ.copy())
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            results[name] = {"error": proc.stderr.strip().splitlines()[-1:]}
            continue
        results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
        r = results[name]
        print(f"  {name}: loaded {r['loaded_bytes'] / 2**20:.0f} MiB, peak "
              f"{r['peak_bytes'] / 2**20:.0f} MiB", file=sys.stderr)
    reference = results.get("rl-none", {}).get("rewards")
    for mode in ("int8", "nf4"):
        got = results.get(f"rl-{mode}", {}).get("rewards")
        if reference and got:
            rel = [abs(g - r) / abs(r) for gr, rr in zip(got, reference, strict=True)
                   for g, r in zip(gr, rr, strict=True)]
            results[f"rl-{mode}"]["reward_rel_diff"] = {"max": max(rel),
                                                        "mean": sum(rel) / len(rel)}
    for r in results.values():
        r.pop("rewards", None)
    summary = {"device": args.device, "model": args.checkpoint or args.model,
               "dtype": args.dtype,
               "prompts": args.prompts, "k": args.num_samples, "settings": results}
    print(json.dumps(summary) if args.json else json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
