"""How much of latent GRPO's batch advantage (paper Eq. 7) comes from the noise, per sigma.

    python benchmarks/advantage_split.py --checkpoint runs/paper-industrial/sft-only/sft \
        --data csv:../shared/data/amazon-industrial --train-split valid \
        --sigmas 0.107,0.32,1.5 --batches 4 --json

Eq. 7 centres every reward on the batch mean of the noiseless rewards s^0. The centred
reward of row k of prompt b splits into a between-prompt part, s_b^0 - mean_b s^0 (the
same for all K rows of a prompt: how easy the prompt is), and a within-prompt part,
s_b^k - s_b^0 (what the noise did). Only the second says which direction of the latent is
better; the first weights all K rows of a prompt alike, so the update raises the
likelihood of the easy prompts' targets and lowers the hard prompts'. This script scores
``--batches`` batches of ``--prompts`` training prompts (the trainer's RL prompts: a seeded
sample of the training rows) with K rows each, and reports, per sigma, the within-prompt
share of the centred rewards' sum of squares (sum (s_b^k - s_b^0)^2 over
sum (s_b^k - mean_b s^0)^2), and how often a noisy row beats its r^0.
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="a saved LatentReasoner (OUTPUT_DIR/sft)")
    p.add_argument("--data", required=True, help="fastlatent data spec, e.g. csv:DIR")
    p.add_argument("--train-split", default="valid", help="split of the RL prompts")
    p.add_argument("--sigmas", default="0.107,0.32,1.5", help="comma-separated noise scales")
    p.add_argument("--prompts", type=int, default=8, help="prompts per batch (--rl-batch-size)")
    p.add_argument("--num-samples", type=int, default=8, help="K, r^0 included")
    p.add_argument("--batches", type=int, default=4, help="batches scored")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--json", action="store_true", help="one JSON line on stdout")
    args = p.parse_args(argv)

    import torch

    from fastlatent.data.batch import collate
    from fastlatent.data.prompt import PromptBuilder
    from fastlatent.data.sampling import seeded_sample
    from fastlatent.data.sources import load_dataset
    from fastlatent.engine.grpo import sample_noise
    from fastlatent.engine.steps import rl_step
    from fastlatent.model.reasoner import LatentReasoner

    reasoner = LatentReasoner.load(args.checkpoint).eval()
    dataset = load_dataset(args.data, seed=args.seed)
    catalogue = reasoner.catalogue or {}
    builder = PromptBuilder(reasoner.tokenizer, template=catalogue.get("template", "default"),
                            domain=catalogue.get("domain", dataset.domain),
                            release_domain=catalogue.get("release_domain", "musics"))
    rows = seeded_sample(dataset.split(args.train_split), args.prompts * args.batches,
                         args.seed + 1)
    d = reasoner.llm.config.hidden_size
    results = {}
    for sigma in (float(s) for s in args.sigmas.split(",") if s):
        generator = torch.Generator().manual_seed(args.seed)
        within = total = 0.0
        wins, noisy = 0, 0
        for i in range(args.batches):
            part = rows[i * args.prompts:(i + 1) * args.prompts]
            batch = collate([builder.encode(ex) for ex in part], reasoner.tokenizer.pad_token_id)
            noise = sample_noise(len(part), args.num_samples, d, generator=generator)
            with torch.no_grad():
                s = rl_step(reasoner, batch, noise=noise, sigma=sigma).rewards.double()
            centred = s - s[:, 0].mean()
            own = s - s[:, :1]
            within += float(own.pow(2).sum())
            total += float(centred.pow(2).sum())
            wins += int((own[:, 1:] > 0).sum())
            noisy += own[:, 1:].numel()
        results[f"{sigma:g}"] = {"within_prompt_share": within / total,
                                 "noisy_rows_beating_r0": wins / noisy}
        print(f"sigma {sigma:g}: within-prompt share of the centred rewards' squares "
              f"{within / total:.4f}; noisy rows beating their r^0 {wins / noisy:.3f}",
              file=sys.stderr)
    if args.json:
        print(json.dumps({"checkpoint": args.checkpoint, "data": args.data,
                          "prompts": args.prompts, "k": args.num_samples,
                          "batches": args.batches, "sigmas": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
