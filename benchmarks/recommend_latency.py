"""Latency of ``fastlatent.recommend`` per user: p50/p95 one user at a time, and the time
per user when users are batched.

    python benchmarks/recommend_latency.py --json              # SmolLM2-135M, MovieLens

The model's weights do not change the work beam search does per step (only which titles it
follows), so an untrained LatentReasoner over the real catalogue times what a trained one
would; the last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main(argv: list[str] | None = None) -> int:
    import torch

    from fastlatent.data.prompt import PromptBuilder
    from fastlatent.data.sampling import seeded_sample
    from fastlatent.data.sources import load_dataset
    from fastlatent.evaluate import catalogue_record
    from fastlatent.model.loading import load_llm
    from fastlatent.model.reasoner import LatentReasoner, ReasonerConfig
    from fastlatent.recommendation import Recommender

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data", default="movielens-100k")
    p.add_argument("--split", default="test")
    p.add_argument("--users", type=int, default=20, help="users timed one at a time")
    p.add_argument("--batch-size", type=int, default=8, help="users per batch (2nd figure)")
    p.add_argument("--top", type=int, default=10)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)

    dataset = load_dataset(args.data, seed=0)
    llm, tok = load_llm(args.model, tokenizer_texts=list(dataset.catalogue.distinct_titles),
                        seed=0)
    reasoner = LatentReasoner.build(llm, tok, ReasonerConfig()).to(args.device)
    reasoner.catalogue = catalogue_record(PromptBuilder(tok, domain=dataset.domain),
                                          dataset.catalogue)
    torch.manual_seed(0)
    start = time.perf_counter()
    rec = Recommender.of(reasoner)
    setup = time.perf_counter() - start
    histories = [list(ex.history) for ex in
                 seeded_sample(dataset.split(args.split), args.users, seed=0)]

    def sync():
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    rec(histories[:1], args.top)  # warm-up
    single = []
    for history in histories:
        sync()
        start = time.perf_counter()
        rec([history], args.top)
        sync()
        single.append(time.perf_counter() - start)
    sync()
    start = time.perf_counter()
    rec(histories, args.top, batch_size=args.batch_size)
    sync()
    batched = (time.perf_counter() - start) / len(histories)
    summary = {"model": args.model, "data": args.data, "device": args.device,
               "catalogue_titles": len(reasoner.catalogue["titles"]), "top": args.top,
               "users": len(histories), "recommender_setup_s": round(setup, 3),
               "p50_s": round(percentile(single, 0.5), 3),
               "p95_s": round(percentile(single, 0.95), 3),
               "mean_s": round(statistics.mean(single), 3),
               f"batched_{args.batch_size}_s_per_user": round(batched, 3)}
    print(json.dumps(summary) if args.json else json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
