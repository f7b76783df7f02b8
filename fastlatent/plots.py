"""PNG plots of a run, drawn only from its ``log.jsonl`` and ``metrics.json`` (the files
the printed report comes from), into ``OUTPUT_DIR/plots/``.

    python -m fastlatent.plots OUTPUT_DIR     # (re)draw the plots of a finished run

Needs matplotlib (``pip install -e .[plots]``); headless (Agg backend).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from fastlatent.metrics import BASELINE

PLOTS_DIR = "plots"
METRICS = ("hr@5", "hr@10", "ndcg@5", "ndcg@10")


def read_records(out: Path) -> list[dict[str, Any]]:
    """The run's log records; a run resumed from a checkpoint logged the replayed steps
    twice, so for each (stage, event, step) the last record is kept."""
    path = out / "log.jsonl"
    if not path.is_file():
        return []
    kept: dict[tuple, dict[str, Any]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # a line a kill cut short
            continue
        key = (record.get("stage"), record.get("event"), record.get("step"),
               record.get("epoch") if record.get("event") == "epoch" else None)
        kept.pop(key, None)
        kept[key] = record
    return list(kept.values())


def series(records: list[dict[str, Any]], stage: str, event: str, field: str
           ) -> tuple[list[float], list[float]]:
    """(steps, values) of ``field`` over a stage's records of ``event`` (null skipped)."""
    xs, ys = [], []
    for r in records:
        if r.get("stage") == stage and r.get("event") == event and r.get(field) is not None:
            xs.append(r.get("step", r.get("epoch")))
            ys.append(r[field])
    return xs, ys


def epoch_end_steps(records: list[dict[str, Any]]) -> dict[int, int]:
    """SFT epoch -> the last optimiser step of that epoch (where its validation loss is
    drawn)."""
    ends: dict[int, int] = {}
    for r in records:
        if r.get("stage") == "sft" and r.get("event") == "step":
            ends[r["epoch"]] = max(ends.get(r["epoch"], 0), r["step"])
    return ends


def plot_run(out: str | Path) -> list[Path]:
    """Draw every plot the run's files allow; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    records = read_records(out)
    folder = out / PLOTS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    def save(fig, name: str) -> None:
        path = folder / name
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    steps, loss = series(records, "sft", "step", "loss")
    if steps:
        fig, ax = plt.subplots(figsize=(6, 3.6))
        ax.plot(steps, loss, label="train (per optimiser step)")
        ends = epoch_end_steps(records)
        epochs, valid = series(records, "sft", "epoch", "valid_loss")
        if epochs:
            ax.plot([ends.get(e, 0) for e in epochs], valid, "o-", label="validation (per epoch)")
        ax.set(xlabel="SFT step", ylabel="NLL per target token", title="SFT loss")
        ax.legend()
        save(fig, "sft_loss.png")
    steps, r0 = series(records, "rl", "step", "reward_r0")
    if steps:
        fig, ax = plt.subplots(figsize=(6, 3.6))
        ax.plot(steps, r0, label="r⁰ (noiseless latent)")
        ax.plot(*series(records, "rl", "step", "reward_all"), label="all K rows")
        ax.set(xlabel="RL step", ylabel="reward (−perplexity)", title="RL reward")
        ax.legend()
        save(fig, "rl_reward.png")
    steps, norm = series(records, "rl", "step", "latent_norm_r0")
    if steps:
        fig, ax = plt.subplots(figsize=(6, 3.6))
        ax.plot(steps, norm)
        ax.set(xlabel="RL step", ylabel="mean ‖r⁰‖ over the step's prompts",
               title="RL latent norm")
        save(fig, "rl_latent_norm.png")
    norms = {stage: series(records, stage, "step", "grad_norm") for stage in ("sft", "rl")}
    if any(xs for xs, _ in norms.values()):
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
        for ax, (stage, (xs, ys)) in zip(axes, norms.items(), strict=True):
            ax.plot(xs, ys)
            ax.set(xlabel=f"{stage.upper()} step", ylabel="gradient norm (before clipping)",
                   title=f"{stage.upper()} gradient norm")
        save(fig, "grad_norm.png")
    metrics_path = out / "metrics.json"
    if metrics_path.is_file():
        metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
        save(metrics_figure(plt, metrics), "metrics.png")
    return written


def metrics_figure(plt, metrics: dict[str, dict[str, Any]]):
    """HR/NDCG@5/10 per evaluated stage with the 95% bootstrap intervals the report
    prints, the popularity baseline last."""
    stages = [s for s in metrics if s != BASELINE] + [s for s in metrics if s == BASELINE]
    fig, axes = plt.subplots(1, len(METRICS), figsize=(3 * len(METRICS), 3.4), sharey=False)
    for ax, key in zip(axes, METRICS, strict=True):
        values = [metrics[s].get(key) or 0.0 for s in stages]
        lows, highs = [], []
        for s, v in zip(stages, values, strict=True):
            lo, hi = metrics[s].get(f"{key}_ci") or (v, v)
            lows.append(max(0.0, v - lo))
            highs.append(max(0.0, hi - v))
        colors = ["tab:gray" if s == BASELINE else "tab:blue" for s in stages]
        ax.bar(range(len(stages)), values, yerr=[lows, highs], capsize=4, color=colors)
        ax.set_xticks(range(len(stages)), stages, rotation=30)
        ax.set_title(key.upper())
    n = next(iter(metrics.values())).get("n")
    fig.suptitle(f"metrics with 95% bootstrap intervals ({n} evaluation rows)")
    return fig


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not Path(args[0]).is_dir():
        print("usage: python -m fastlatent.plots OUTPUT_DIR", file=sys.stderr)
        return 2
    for path in plot_run(args[0]):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
