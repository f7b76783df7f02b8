"""The paper's ablation on one dataset: does each piece of LatentR³ add what the paper says?

    python benchmarks/fidelity.py --data csv:../shared/data/amazon-cds \
        --train-split valid --eval-split test --budget cpu

Trains, with the same SFT budget and seed, and evaluates on the SAME seeded test rows:

| variant           | what                                              | paper (CDs, H@10) |
|-------------------|---------------------------------------------------|-------------------|
| w/o reasoning     | --latent none: plain SFT, no thought token        | .0929             |
| w/o LatentRATT    | --latent last-hidden: r = last prompt hidden state | .0875             |
| SFT only          | LatentR³ after SFT (no RL)                         | .1005             |
| +RL (batch)       | SFT only + latent GRPO, batch advantage (Eq. 7)    | .1160             |
| +RL (group)       | SFT only + latent GRPO, group advantage (ablation) | .1002             |

"w/o LatentRATT" is SFT-only by construction: it has no LatentRATT, so nothing trains in
RL. One LatentR³ SFT feeds three variants. Each variant runs `python -m fastlatent.train`
in its own process and folder under --output-dir; a variant whose metrics.json exists is
not run again, and one that was interrupted continues with `--resume` from its newest
checkpoint, so an interrupted experiment resumes where it stopped.

Reported per variant: HR/NDCG@5/10 with 95% bootstrap intervals, the mean target NLL per
token under r^0 (log PPL: what RL optimises, far more sensitive than HR@10 at CPU sizes),
and the paired bootstrap difference against SFT only (same rows resampled together);
plus the popularity baseline, and RL diagnostics (||r||, the embedding scale sigma is
compared with, reward spread within groups, how often the noisy rows win). Writes
fidelity.json, fidelity.md and fidelity.png (with matplotlib) in --output-dir.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

METRICS = ("hr@5", "hr@10", "ndcg@5", "ndcg@10")
REFERENCE = "sft-only"
PAPER_CDS_HR10 = {"wo-reasoning": .0929, "wo-latentratt": .0875, "sft-only": .1005,
                  "rl-batch": .1160, "rl-group": .1002}

# Flags of each budget (everything else: fastlatent's defaults).
BUDGETS: dict[str, list[str]] = {
    # ~1.5-2 h on 2 CPU cores with SmolLM2-135M: 512 SFT rows (16 steps of 32), 40 RL
    # steps of 8 prompts x K = 8, 200 test users. RL takes the top of the release's lr grid
    # {1e-5, 5e-5, 1e-4, 5e-4}: 40 steps are ~1/40 of the release's RL run.
    "cpu": ["--preset", "cpu", "--sft-limit", "512", "--sft-batch-size", "32",
            "--sft-micro-batch", "8", "--sft-epochs", "1", "--sft-warmup-steps", "1",
            "--sft-lr", "3e-4", "--valid-limit", "64", "--rl-limit", "320",
            "--rl-batch-size", "8", "--rl-max-steps", "40", "--rl-warmup-steps", "200",
            "--rl-lr", "5e-4", "--eval-limit", "200", "--eval-batch-size", "8"],
    # The paper's setting (a GPU job): the release's hyper-parameters on all rows.
    "full": ["--preset", "paper"],
    # Seconds: the tiny random model on synthetic data (the test of this script).
    "smoke": ["--preset", "smoke", "--rl-max-steps", "2"],
}


@dataclass
class Variant:
    name: str
    label: str
    stage: str  # the metrics.json key of its evaluation
    flags: list[str]
    after: str | None = None  # the variant whose SFT checkpoint it starts from
    extra: dict[str, Any] = field(default_factory=dict)


VARIANTS = [
    Variant("wo-reasoning", "w/o reasoning", "sft", ["--latent", "none", "--stage", "sft"]),
    Variant("wo-latentratt", "w/o LatentRATT", "sft",
            ["--latent", "last-hidden", "--stage", "sft"]),
    Variant(REFERENCE, "SFT only", "sft", ["--latent", "ratt", "--stage", "sft"]),
    Variant("rl-batch", "+RL (batch adv.)", "rl", ["--stage", "rl", "--advantage", "batch"],
            after=REFERENCE),
    Variant("rl-group", "+RL (group adv.)", "rl", ["--stage", "rl", "--advantage", "group"],
            after=REFERENCE),
]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="fastlatent data spec, e.g. csv:DIR")
    p.add_argument("--train-split", default="valid", help="split to train on")
    p.add_argument("--eval-split", default="test", help="split to evaluate on")
    p.add_argument("--budget", choices=sorted(BUDGETS), default="cpu",
                   help="cpu: ~2 h on 2 CPU cores; full: the paper's setting (GPU); "
                   "smoke: tiny random model, seconds (tests)")
    p.add_argument("--model", default="smollm2-135m", help="fastlatent --model")
    p.add_argument("--seed", type=int, default=42, help="one seed for every variant")
    p.add_argument("--output-dir", default="runs/fidelity",
                   help="one folder per variant plus fidelity.{json,md,png}")
    p.add_argument("--only", default="", help="comma-separated variant names to run "
                   f"(default: all of {', '.join(v.name for v in VARIANTS)})")
    p.add_argument("--sigma-variants", default="",
                   help="comma-separated extra sigmas: each adds a '+RL (batch adv.)' variant "
                   "with that noise scale (sigma is absolute, and the paper's 1.5 was set "
                   "for Qwen2.5's scale)")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                   help="further fastlatent.train flags for every variant (after --extra)")
    return p.parse_args(argv)


def all_variants(args: argparse.Namespace) -> list[Variant]:
    """The five of the paper's ablation, then one RL variant per --sigma-variants value."""
    extra = [Variant(f"rl-batch-sigma{sigma}", f"+RL (batch adv., σ={sigma})", "rl",
                     ["--stage", "rl", "--advantage", "batch", "--sigma", sigma],
                     after=REFERENCE)
             for sigma in args.sigma_variants.split(",") if sigma]
    return VARIANTS + extra


def variant_command(v: Variant, args: argparse.Namespace, out: Path) -> list[str]:
    cmd = [sys.executable, "-m", "fastlatent.train", *BUDGETS[args.budget],
           "--data", args.data, "--train-split", args.train_split,
           "--eval-split", args.eval_split, "--seed", str(args.seed),
           "--output-dir", str(out / v.name), *v.flags]
    if v.after:  # the checkpoint fixes the model
        cmd += ["--checkpoint", str(out / v.after / "sft")]
    else:
        cmd += ["--model", args.model]
    if (out / v.name / "run.json").is_file():  # an interrupted variant continues
        cmd.append("--resume")
    return cmd + list(args.extra)


def is_done(v: Variant, out: Path) -> bool:
    path = out / v.name / "metrics.json"
    return path.is_file() and v.stage in json.loads(path.read_text())


def run_variants(args: argparse.Namespace, out: Path, chosen: list[Variant]) -> None:
    start = time.time()
    for i, v in enumerate(chosen, 1):
        if is_done(v, out):
            print(f"[{i}/{len(chosen)}] {v.label}: done already ({out / v.name})", flush=True)
            continue
        if v.after and not (out / v.after / "sft" / "fastlatent.json").is_file():
            raise SystemExit(f"{v.label} starts from {v.after}'s SFT checkpoint, which is "
                             f"missing in {out / v.after}; run that variant first")
        cmd = variant_command(v, args, out)
        print(f"[{i}/{len(chosen)}] {v.label} ({time.time() - start:.0f} s so far): "
              + " ".join(cmd[1:]), flush=True)
        t0 = time.time()
        subprocess.run(cmd, check=True)
        (out / v.name / "wall_seconds.txt").write_text(f"{time.time() - t0:.1f}\n")


# ---- the report ------------------------------------------------------------------------
def load_rows(out: Path, v: Variant) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in
            (out / v.name / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    return [r for r in rows if r["stage"] == v.stage]


def per_row(rows: list[dict[str, Any]]) -> dict[str, list[float]]:
    from fastlatent.metrics import hr_at, ndcg_at

    values = {f"hr@{k}": [hr_at(r["rank"], k) for r in rows] for k in (5, 10)}
    values.update({f"ndcg@{k}": [ndcg_at(r["rank"], k) for r in rows] for k in (5, 10)})
    if all(r.get("target_nll") is not None for r in rows):
        values["target_nll"] = [float(r["target_nll"]) for r in rows]
    return values


def rl_diagnostics(out: Path, v: Variant) -> dict[str, Any]:
    """From the RL log: reward spread within groups, how often the noisy rows won."""
    steps = [json.loads(line) for line in (out / v.name / "log.jsonl").read_text().splitlines()]
    steps = [s for s in steps if s["stage"] == "rl" and s["event"] == "step"]
    if not steps:
        return {}
    spread = [s["reward_std_within"] for s in steps if "reward_std_within" in s]
    noisy = [s["mean_noisy_advantage"] for s in steps if "mean_noisy_advantage" in s]
    return {"steps": len(steps), "reward_r0_first": steps[0]["reward_r0"],
            "reward_r0_last": steps[-1]["reward_r0"],
            "reward_std_within_mean": sum(spread) / len(spread) if spread else None,
            "steps_with_positive_mean_noisy_advantage":
                sum(a > 0 for a in noisy) / len(noisy) if noisy else None,
            "grad_norm_mean": sum(s["grad_norm"] for s in steps) / len(steps)}


def latent_scale(checkpoint: Path, args: argparse.Namespace, rows: int = 32) -> dict[str, float]:
    """||r^0|| on training prompts against the LLM's input-embedding scale: sigma is
    absolute, so what it means depends on both."""
    import torch

    from fastlatent.data.batch import collate
    from fastlatent.data.prompt import PromptBuilder
    from fastlatent.data.sampling import seeded_sample
    from fastlatent.data.sources import load_dataset
    from fastlatent.model.reasoner import LatentReasoner

    reasoner = LatentReasoner.load(checkpoint).eval()
    dataset = load_dataset(args.data, seed=args.seed)
    data_cfg = json.loads((checkpoint.parent / "run.json").read_text())["config"]["data"]
    builder = PromptBuilder(reasoner.tokenizer, template=data_cfg["template"],
                            domain=dataset.domain, release_domain=data_cfg["release_domain"])
    sample = seeded_sample(dataset.split(args.train_split), rows, args.seed)
    batch = collate([builder.encode(ex) for ex in sample], reasoner.tokenizer.pad_token_id)
    with torch.no_grad():
        r = reasoner.latent(batch.prompt_ids, batch.prompt_mask).float()
        emb = reasoner.llm.get_input_embeddings().weight.detach().float()
    d = emb.shape[1]
    return {"hidden_size": d, "r_norm_mean": float(r.norm(dim=-1).mean()),
            "embedding_norm_mean": float(emb.norm(dim=-1).mean()),
            "embedding_rms": float(emb.pow(2).mean().sqrt()),
            "noise_norm_at_sigma_1": math.sqrt(d)}


def power_rows(diff_values: list[float], effect: float) -> int | None:
    """Rows a paired test needs to detect a mean difference ``effect`` at 80% power,
    two-sided alpha 0.05, given the per-row paired differences measured here."""
    import numpy as np

    sd = float(np.std(np.asarray(diff_values), ddof=1)) if len(diff_values) > 1 else 0.0
    if effect <= 0 or sd == 0:
        return None
    return math.ceil(((1.959964 + 0.841621) * sd / effect) ** 2)


def build_report(args: argparse.Namespace, out: Path, chosen: list[Variant]) -> dict[str, Any]:
    from fastlatent.metrics import BASELINE, paired_bootstrap_difference

    done = [v for v in chosen if is_done(v, out)]
    rows = {v.name: load_rows(out, v) for v in done}
    keys = {v.name: [(r["user"], r["target"]) for r in rows[v.name]] for v in done}
    first = next(iter(keys.values()), None)
    for name, k in keys.items():
        if k != first:
            raise SystemExit(f"{name} was evaluated on other rows than {done[0].name}: the "
                             "variants must share seed, data and --eval-limit")
    values = {name: per_row(r) for name, r in rows.items()}
    report: dict[str, Any] = {"data": args.data, "train_split": args.train_split,
                              "eval_split": args.eval_split, "budget": args.budget,
                              "budget_flags": BUDGETS[args.budget], "model": args.model,
                              "seed": args.seed, "variants": {}}
    for v in done:
        metrics = json.loads((out / v.name / "metrics.json").read_text())
        entry: dict[str, Any] = {"label": v.label, **metrics[v.stage],
                                 "paper_cds_hr@10": PAPER_CDS_HR10.get(v.name)}
        wall = out / v.name / "wall_seconds.txt"
        entry["wall_seconds"] = float(wall.read_text()) if wall.is_file() else None
        if REFERENCE in values and v.name != REFERENCE:
            entry["paired_vs_sft_only"] = {
                key: paired_bootstrap_difference(values[v.name][key], values[REFERENCE][key],
                                                 seed=args.seed)
                for key in (*METRICS, "target_nll") if key in values[v.name]}
        if v.stage == "rl":
            entry["rl"] = rl_diagnostics(out, v)
            if REFERENCE in values:
                paired = [a - b for a, b in zip(values[v.name]["hr@10"],
                                                values[REFERENCE]["hr@10"], strict=True)]
                gain = PAPER_CDS_HR10["rl-batch"] - PAPER_CDS_HR10[REFERENCE]
                entry["rows_for_80pct_power_at_paper_gain"] = power_rows(paired, gain)
        report["variants"][v.name] = entry
        report[BASELINE] = metrics.get(BASELINE)
    if (out / REFERENCE / "sft" / "fastlatent.json").is_file():
        report["latent_scale"] = latent_scale(out / REFERENCE / "sft", args)
    return report


def markdown(report: dict[str, Any]) -> str:
    def ci(m, key):
        lo, hi = m[f"{key}_ci"]
        return f"{m[key]:.4f} [{lo:.3f}, {hi:.3f}]"

    def paired(entry, key, digits=4):
        d = entry.get("paired_vs_sft_only", {}).get(key)
        if not d:
            return "—"
        mark = " *" if d["lo"] > 0 or d["hi"] < 0 else ""
        return f"{d['diff']:+.{digits}f} [{d['lo']:+.{digits}f}, {d['hi']:+.{digits}f}]{mark}"

    lines = ["| variant | HR@5 | HR@10 | NDCG@5 | NDCG@10 | target NLL (r⁰) | "
             "ΔHR@10 vs SFT only | ΔNDCG@10 vs SFT only | ΔNLL vs SFT only | paper H@10 |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for entry in report["variants"].values():
        nll = f"{entry['target_nll']:.4f}" if entry.get("target_nll") is not None else "—"
        paper = entry.get("paper_cds_hr@10")
        lines.append(f"| {entry['label']} | " + " | ".join(ci(entry, k) for k in METRICS)
                     + f" | {nll} | {paired(entry, 'hr@10')} | {paired(entry, 'ndcg@10')} | "
                     f"{paired(entry, 'target_nll')} | {paper if paper else '—'} |")
    base = report.get("popular")
    if base:
        lines.append("| popularity (top-10 training targets) | " +
                     " | ".join(ci(base, k) for k in METRICS) + " | — | — | — | — | — |")
    lines.append("")
    lines.append("Intervals: 95% percentile bootstrap over the evaluation rows (1000 "
                 "resamples); Δ columns are paired (rows resampled together), `*` = the "
                 "interval excludes 0. Lower NLL is better.")
    return "\n".join(lines) + "\n"


def chart(report: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no chart (pip install 'fastlatent[plots]')")
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = list(report["variants"].values())
    if report.get("popular"):
        entries.append({"label": "popularity", **report["popular"]})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key in zip(axes, ("hr@10", "ndcg@10"), strict=True):
        xs = range(len(entries))
        vals = [e[key] for e in entries]
        errs = [[e[key] - e[f"{key}_ci"][0] for e in entries],
                [e[f"{key}_ci"][1] - e[key] for e in entries]]
        ax.bar(xs, vals, yerr=errs, capsize=4,
               color=["#888" if e["label"] == "popularity" else "#3572a5" for e in entries])
        ax.set_xticks(list(xs), [e["label"] for e in entries], rotation=30, ha="right")
        ax.set_title(f"{key.upper()} (95% bootstrap)")
    fig.suptitle(f"LatentR³ ablation — {report['data']}, {report['model']}, "
                 f"budget {report['budget']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    variants = all_variants(args)
    names = [n for n in args.only.split(",") if n]
    unknown = set(names) - {v.name for v in variants}
    if unknown:
        raise SystemExit(f"--only: unknown variants {sorted(unknown)}; "
                         f"choose from {[v.name for v in variants]}")
    chosen = [v for v in variants if not names or v.name in names]
    run_variants(args, out, chosen)
    report = build_report(args, out, variants)
    from fastlatent.runlog import write_json_atomic, write_text_atomic

    write_json_atomic(out / "fidelity.json", report)
    table = markdown(report)
    write_text_atomic(out / "fidelity.md", table)
    chart(report, out / "fidelity.png")
    print(table)
    print(f"wrote {out / 'fidelity.json'}, {out / 'fidelity.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
