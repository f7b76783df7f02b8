"""``python -m fastlatent.train``: SFT warm-up -> latent GRPO -> constrained evaluation.

With no arguments: SmolLM2-135M-Instruct on MovieLens-100K, sized by the ``cpu`` preset
(without CUDA) or ``paper`` (with CUDA). Outputs in OUTPUT_DIR: run.json (manifest),
log.jsonl (every step), sft/ and rl/ checkpoints, metrics.json, predictions.jsonl.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import platform
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastlatent.config import PRESETS, Config, ConfigError, build_config, validate_config
from fastlatent.metrics import BASELINE
from fastlatent.runlog import StepLog, write_json_atomic

METRIC_KEYS = ("hr@5", "hr@10", "ndcg@5", "ndcg@10")



def demo_note(cfg: Config) -> str:
    d, r = cfg.data, cfg.rl
    return (f"note: the cpu preset is a demonstration sized for 2 CPU cores "
            f"({d.sft_limit or 'all'} SFT examples, {r.rl_max_steps or 'all'} RL steps of "
            f"{r.rl_batch_size} prompts, "
            f"{d.eval_limit or 'all'} evaluation users); its numbers are not the paper's, and "
            f"at this size it does not beat the popularity baseline (see README).")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def build_parser() -> argparse.ArgumentParser:
    """One argparse group per config dataclass; defaults are SUPPRESSed so that only
    explicit flags override the preset."""
    parser = argparse.ArgumentParser(
        prog="python -m fastlatent.train",
        description="LatentR3: SFT warm-up, latent GRPO and constrained beam-search "
                    "evaluation. Explicit flags override the preset.",
        argument_default=argparse.SUPPRESS)
    for section in dataclasses.fields(Config):
        defaults = section.default_factory()  # type: ignore[misc]
        group = parser.add_argument_group(section.name)
        for f in dataclasses.fields(defaults):
            default = getattr(defaults, f.name)
            kwargs: dict[str, Any] = {"help": f"{f.metadata['help']} (default: {default!r})"}
            if "choices" in f.metadata:
                kwargs["choices"] = f.metadata["choices"]
            kwargs["type"] = type(default)
            group.add_argument(_flag(f.name), dest=f.name, **kwargs)
    return parser


def parse_config(argv: list[str] | None) -> Config:
    overrides = vars(build_parser().parse_args(argv))
    preset = overrides.pop("preset", "") or ("paper" if torch.cuda.is_available() else "cpu")
    return build_config(preset, overrides)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def package_versions() -> dict[str, str | None]:
    from importlib import metadata

    versions = {"python": platform.python_version()}
    for name in ("fastlatent", "torch", "transformers", "tokenizers", "safetensors", "numpy",
                 "triton", "gguf", "accelerate"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def format_table(metrics: dict[str, dict[str, Any]]) -> str:
    """A fixed-width table: one row per stage, HR/NDCG with 95% bootstrap intervals, the
    popularity baseline's row last, and whether each stage's HR@10 interval lies above,
    overlaps or lies below the baseline's."""
    head = f"{'stage':<8}" + "".join(f"{k:>24}" for k in METRIC_KEYS) + "  HR@10 vs popular"
    lines = [head, "-" * len(head)]
    order = [name for name in metrics if name != BASELINE] + [
        name for name in metrics if name == BASELINE]
    for stage in order:
        m = metrics[stage]
        cells = []
        for k in METRIC_KEYS:
            lo, hi = m.get(f"{k}_ci", (float("nan"), float("nan")))
            cells.append(f"{m[k]:.4f} [{lo:.3f},{hi:.3f}]".rjust(24))
        relation = m.get(f"hr@10_vs_{BASELINE}", "(baseline)" if stage == BASELINE else "")
        lines.append(f"{stage:<8}" + "".join(cells) + f"  {relation}")
    n = next(iter(metrics.values())).get("n") if metrics else None
    lines.append(f"(95% bootstrap intervals; {n} evaluation rows; popular = the 10 most "
                 "frequent training targets for every row)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(argv)
    try:
        validate_config(cfg)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from fastlatent.pipeline import run_pipeline

    run = cfg.run
    out = Path(run.output_dir or
               f"runs/{run.preset}-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(run.device)
    seed_everything(run.seed)
    manifest = {"argv": sys.argv[1:] if argv is None else list(argv), "config": cfg.to_dict(),
                "preset_values": PRESETS.get(run.preset, {}), "seed": run.seed,
                "device": str(device), "git_commit": git_commit(),
                "versions": package_versions(),
                "started": _dt.datetime.now(_dt.timezone.utc).isoformat()}
    write_json_atomic(out / "run.json", manifest)
    print(f"fastlatent: preset {run.preset}, stage {run.stage}, model {cfg.model.model}, "
          f"data {cfg.data.data}, device {device}, output {out}")
    if run.preset == "cpu":
        print(demo_note(cfg))
    log = StepLog(out / "log.jsonl")
    notes: list[str] = []
    try:
        metrics = run_pipeline(cfg, out, device, log, notes)
    finally:
        log.close()
    write_json_atomic(out / "metrics.json", metrics)
    manifest["notes"] = notes
    manifest["finished"] = _dt.datetime.now(_dt.timezone.utc).isoformat()
    write_json_atomic(out / "run.json", manifest)
    if metrics:
        print(format_table(metrics))
    if run.preset == "cpu":
        print(demo_note(cfg))
    print(f"wrote {out / 'metrics.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
