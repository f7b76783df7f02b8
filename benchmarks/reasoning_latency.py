"""The price of reasoning at inference: seconds per user of trie-constrained beam search
with no thought, one latent, N latents, and after a textual chain of thought.

    python benchmarks/reasoning_latency.py --json               # SmolLM2-135M, MovieLens
    python benchmarks/reasoning_latency.py --data csv:../shared/data/amazon-cds --json

LatentR³'s motivation: a latent thought costs about one extra token at inference, where a
textual chain of thought (CoT) costs many; the paper's reasoning-length study (App. E,
N latents) reports accuracy, not time. This script measures the time side. Every variant
runs the beam search the trainer evaluates with (``engine_beam_search``: 10 beams, 10
returned, length penalty 1.0, the catalogue's trie) over the SAME LLM weights, the same
users and the same batches of ``--batch`` users:

- ``none``: BIGRec, the model without a latent; its prompt has no thought token (0 extra
  tokens before the answer).
- ``latent1``: LatentRATT's one latent, the paper's model (1 extra token).
- ``latent{N}``: N autoregressive latents (``--num-latents``; ``chain_latents``).
- ``cot{T}`` per ``--cot-tokens``: the no-latent model after T tokens generated greedily
  after its prompt, unconstrained and without an EOS stop (a fixed length, so the cost of
  T tokens is what is measured), with a KV cache: the prompt encoded once
  (``Decoder.prefix``), one ``Decoder.suffix`` step per token. The beam search then
  continues from that cache (``PrefixCache.extend``), so prompt + CoT is not encoded again.

The variants run interleaved (A B C D E, A B C D E, ...) for ``--repeats`` rounds after one
untimed warm-up round; a round times all users of one variant (on CUDA, synchronised
before each clock read). Per variant: the median, min, max, p25 and p75 over rounds of
seconds per user, and the median's ratio to ``none``'s. ``per_token_s`` is the measured
cost of one extra token per user, from the longest CoT: (cot_T - none) / T;
``latent{n}_in_tokens`` = (latent_n - none) / per_token_s reads off "one latent costs
about one token". Weights are random (``tiny-random``, ``*-random``) or the base model's
with a fresh LatentRATT: training changes which titles the beams follow, not the work per
step, so an untrained model times what a trained one would (up to how early searches
close). The last stdout line with ``--json`` is one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence

NUM_BEAMS = NUM_RETURN = 10
LENGTH_PENALTY = 1.0
MAX_NEW_TOKENS = 128


def build_reasoners(llm, tokenizer, num_latents: int) -> dict:
    """Three reasoners over ONE llm (same weights): ``none`` (no latent), ``latent1``
    (LatentRATT, the default) and ``latent{N}`` (the same LatentRATT, N latents), in eval
    mode. Builds the no-latent one first, so the thought token added for the latent ones
    is the only change to the vocabulary, shared by all three."""
    from fastlatent.model.reasoner import LatentReasoner, ReasonerConfig

    if num_latents < 2:
        raise ValueError(f"expected --num-latents >= 2 (1 is latent1), got {num_latents}")
    none = LatentReasoner.build(llm, tokenizer, ReasonerConfig(latent="none"))
    one = LatentReasoner.build(llm, tokenizer, ReasonerConfig(latent="ratt"))
    many = LatentReasoner(llm, tokenizer, dataclasses.replace(one.config,
                                                              num_latents=num_latents),
                          ratt=one.ratt)
    return {"none": none.eval(), "latent1": one.eval(), f"latent{num_latents}": many.eval()}


def user_batches(builder, examples: Sequence, batch: int, pad_id: int, device) -> list:
    """``examples`` encoded by ``builder`` in consecutive batches of ``batch`` users:
    ``[(prompt_ids, prompt_mask)]`` on ``device``, left-padded."""
    from fastlatent.data.batch import collate
    from fastlatent.data.sampling import chunks

    out = []
    for part in chunks(list(examples), batch):
        b = collate([builder.encode(ex) for ex in part], pad_id).to(device)
        out.append((b.prompt_ids, b.prompt_mask))
    return out


def generate_cot(reasoner, decoder, prompt_ids, prompt_mask, tokens: int):
    """``tokens`` greedy, unconstrained tokens after each left-padded prompt [B, L] (no
    EOS stop), with a KV cache: the prompt encoded once, then one suffix step per token.

    Returns the generated ids [B, T] and the cache of prompt + generated tokens
    (:meth:`PrefixCache.extend`), whose last hidden state predicts the answer's first
    token."""
    import torch

    if tokens < 1:
        raise ValueError(f"expected at least 1 CoT token, got {tokens}")
    prefix = decoder.prefix(prompt_ids, prompt_mask)
    one = torch.ones(prompt_ids.shape[0], 1, dtype=torch.long, device=prompt_ids.device)
    hidden, generated, states, cache = prefix.last_hidden, [], [], None
    for _ in range(tokens):
        token = decoder.logits(hidden).argmax(-1)  # [B]
        generated.append(token)
        step, cache = decoder.suffix(reasoner.embed(token[:, None]), one, prefix, 1, cache)
        states.append(step)
        hidden = step[:, -1]
    return torch.stack(generated, dim=1), prefix.extend(torch.cat(states, dim=1), cache)


def search(reasoner, prompt_ids, prompt_mask, trie, prefix=None) -> list:
    from fastlatent.engine.beam_search import engine_beam_search

    return engine_beam_search(reasoner, prompt_ids, prompt_mask, trie, num_beams=NUM_BEAMS,
                              num_return=NUM_RETURN, length_penalty=LENGTH_PENALTY,
                              max_new_tokens=MAX_NEW_TOKENS, prefix=prefix)


def variant_runs(reasoners: dict, plain: list, thought: list, trie,
                 cot_tokens: Sequence[int]) -> dict[str, tuple[int, Callable[[], list]]]:
    """Per variant: (extra tokens fed before the answer, a function that runs every user
    batch and returns the hypotheses, users in order). ``plain`` / ``thought``: the same
    users' batches without / with the thought token."""
    import torch

    from fastlatent.engine.decoder import Decoder

    none = reasoners["none"]
    decoder = Decoder(none.llm)

    def latent_run(reasoner, batches):
        return lambda: [hyp for ids, mask in batches
                        for hyp in search(reasoner, ids, mask, trie)]

    def cot_run(t):
        def run():
            out = []
            for ids, mask in plain:
                cot, prefix = generate_cot(none, decoder, ids, mask, t)
                out += search(none, torch.cat((ids, cot), dim=1),
                              torch.cat((mask, torch.ones_like(cot)), dim=1), trie, prefix)
            return out
        return run

    runs = {"none": (0, latent_run(none, plain))}
    for name, reasoner in reasoners.items():
        if name != "none":
            runs[name] = (reasoner.config.num_latents, latent_run(reasoner, thought))
    for t in cot_tokens:
        runs[f"cot{t}"] = (t, cot_run(t))
    return runs


def time_interleaved(runs: dict, users: int, repeats: int, sync: Callable[[], None]
                     ) -> dict[str, list[float]]:
    """Seconds per user of each variant, one entry per round; one untimed warm-up round,
    then ``repeats`` rounds of every variant in turn."""
    times = {name: [] for name in runs}
    for round_ in range(repeats + 1):
        for name, (_, run) in runs.items():
            sync()
            start = time.perf_counter()
            run()
            sync()
            if round_ > 0:
                times[name].append((time.perf_counter() - start) / users)
    return times


def _seconds(x: float) -> float:
    return round(x, 7)


def spread(values: list[float]) -> dict[str, float]:
    quarters = (statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1
                else [values[0]] * 3)
    return {"median_s_per_user": statistics.median(values), "min_s_per_user": min(values),
            "max_s_per_user": max(values), "p25_s_per_user": quarters[0],
            "p75_s_per_user": quarters[2]}


def summarize(times: dict[str, list[float]], extra: dict[str, int]) -> dict:
    """The per-variant figures, the cost of one token from the longest CoT and each
    latent variant's cost counted in such tokens."""
    medians = {name: statistics.median(values) for name, values in times.items()}
    base = medians["none"]
    variants = {name: {"extra_tokens": extra[name],
                       **{k: _seconds(v) for k, v in spread(values).items()},
                       "ratio_to_none": round(medians[name] / base, 4),
                       "times_s_per_user": [_seconds(v) for v in values]}
                for name, values in times.items()}
    cots = sorted((n for n in times if n.startswith("cot")), key=lambda n: extra[n])
    out = {"variants": variants, "per_token_s": None, "per_token_from": None}
    if cots:
        longest = cots[-1]
        per_token = (medians[longest] - base) / extra[longest]
        out.update(per_token_s=_seconds(per_token), per_token_from=longest,
                   per_token_s_by_cot={n: _seconds((medians[n] - base) / extra[n])
                                       for n in cots})
        for name in times:
            if name.startswith("latent"):
                out[f"{name}_in_tokens"] = (round((medians[name] - base) / per_token, 3)
                                            if per_token > 0 else None)
    return out


def table(summary: dict) -> str:
    lines = [f"{summary['model']} on {summary['data']} ({summary['device']}, "
             f"{summary['threads']} threads): {summary['users']} users, {summary['batch']} "
             f"per batch, {NUM_BEAMS} beams, {summary['repeats']} rounds",
             f"{'variant':<10} {'tokens':>6} {'median s/user':>14} {'p25':>9} {'p75':>9} "
             f"{'x none':>7}"]
    for name, v in summary["variants"].items():
        lines.append(f"{name:<10} {v['extra_tokens']:>6} {v['median_s_per_user']:>14.4f} "
                     f"{v['p25_s_per_user']:>9.4f} {v['p75_s_per_user']:>9.4f} "
                     f"{v['ratio_to_none']:>7.2f}")
    if summary["per_token_s"] is not None:
        lines.append(f"one extra token (from {summary['per_token_from']}): "
                     f"{summary['per_token_s']:.5f} s per user")
        lines += [f"{key[:-len('_in_tokens')]} costs {value:.2f} tokens"
                  for key, value in summary.items()
                  if key.endswith("_in_tokens") and value is not None]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m",
                   help="smollm2-135m | smollm2-135m-random | tiny-random | a hub id or dir")
    p.add_argument("--data", default="movielens-100k",
                   help="dataset spec: movielens-100k | synthetic | csv:DIR")
    p.add_argument("--split", default="test", help="split the users are drawn from")
    p.add_argument("--template", default="default", choices=("default", "latentr3"),
                   help="prompt wording (latentr3: the release's)")
    p.add_argument("--users", type=int, default=16, help="users timed per variant and round")
    p.add_argument("--batch", type=int, default=8, help="users per beam-search batch")
    p.add_argument("--repeats", type=int, default=5,
                   help="timed rounds of every variant (after one warm-up round)")
    p.add_argument("--cot-tokens", default="32,128",
                   help="comma-separated lengths of the textual chains of thought")
    p.add_argument("--num-latents", type=int, default=8,
                   help="latents of the multi-latent variant (>= 2)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the user sample, random weights and LatentRATT's init")
    p.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--json", action="store_true",
                   help="print one JSON line instead of the table")
    args = p.parse_args(argv)
    args.cot = [int(t) for t in args.cot_tokens.split(",") if t.strip()]
    if any(t < 1 for t in args.cot):
        p.error(f"--cot-tokens: expected positive lengths, got {args.cot_tokens!r}")
    if args.users < 1 or args.batch < 1 or args.repeats < 1:
        p.error("--users, --batch and --repeats must be at least 1")
    if args.num_latents < 2:
        p.error(f"--num-latents: expected >= 2 (1 is latent1), got {args.num_latents}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from fastlatent.data.prompt import PromptBuilder
    from fastlatent.data.sampling import seeded_sample
    from fastlatent.data.sources import load_dataset
    from fastlatent.evaluate import build_title_trie
    from fastlatent.model.loading import load_llm

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu")
                          if args.device == "auto" else args.device)
    dataset = load_dataset(args.data, seed=args.seed)
    llm, tok = load_llm(args.model, dtype=args.dtype,
                        tokenizer_texts=list(dataset.catalogue.distinct_titles), seed=args.seed)
    torch.manual_seed(args.seed)  # LatentRATT's init
    reasoners = build_reasoners(llm.to(device), tok, args.num_latents)
    for r in reasoners.values():
        r.to(device)
    users = seeded_sample(dataset.split(args.split), args.users, seed=args.seed)
    plain_builder = PromptBuilder(tok, domain=dataset.domain, template=args.template,
                                  use_thought=False)
    thought_builder = PromptBuilder(tok, domain=dataset.domain, template=args.template)
    plain = user_batches(plain_builder, users, args.batch, tok.pad_token_id, device)
    thought = user_batches(thought_builder, users, args.batch, tok.pad_token_id, device)
    trie = build_title_trie(plain_builder, dataset.catalogue)
    runs = variant_runs(reasoners, plain, thought, trie, args.cot)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    times = time_interleaved(runs, len(users), args.repeats, sync)
    summary = {"device": torch.cuda.get_device_name(device) if device.type == "cuda"
               else "cpu", "model": args.model, "data": args.data, "dtype": args.dtype,
               "template": args.template, "users": len(users), "batch": args.batch,
               "beams": NUM_BEAMS, "returned": NUM_RETURN, "repeats": args.repeats,
               "threads": torch.get_num_threads(),
               "prompt_tokens_mean": sum(int(m.sum()) for _, m in plain) / len(users),
               "catalogue_titles": len(dataset.catalogue.distinct_titles),
               **summarize(times, {name: extra for name, (extra, _) in runs.items()})}
    print(json.dumps(summary) if args.json else table(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
