"""Experiment trackers beside ``log.jsonl``: TensorBoard, Weights & Biases, Trackio.

``--report-to auto`` (the default) uses TensorBoard when it is installed and nothing
else otherwise; ``log.jsonl`` is always written. Every numeric field of a log record goes
to the tracker as ``<stage>/<name>`` at the record's step (optimiser step for training,
epoch for SFT's validation loss, 0 for evaluations), so the tracker shows the same numbers
as the log.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastlatent.config import ConfigError

REPORT_TO = ("auto", "none", "tensorboard", "wandb", "trackio")  # trackers = package names


def installed(kind: str) -> bool:
    return importlib.util.find_spec(kind) is not None


def resolve(kind: str) -> str:
    """The tracker ``--report-to kind`` means here; a named one that is not installed is
    a :class:`ConfigError` with the pip command."""
    if kind not in REPORT_TO:
        raise ConfigError(f"--report-to {kind!r}: expected one of {list(REPORT_TO)}")
    if kind == "auto":
        return "tensorboard" if installed("tensorboard") else "none"
    if kind != "none" and not installed(kind):
        raise ConfigError(f"--report-to {kind}: the {kind} package is not installed "
                          f"(pip install {kind}), or use --report-to none")
    return kind


def scalars(values: dict[str, Any]) -> dict[str, float]:
    """The finite numbers among a log record's fields (booleans and ids left out)."""
    out = {}
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if key in ("step", "epoch", "time") or not math.isfinite(value):
            continue
        out[key] = float(value)
    return out


@dataclass
class Tracker:
    """One open tracker run; :meth:`record` takes what :class:`StepLog` writes."""

    kind: str
    handle: Any
    stages: set[str] = field(default_factory=set)  # wandb: stages given a step axis

    def record(self, stage: str, event: str, values: dict[str, Any]) -> None:
        numbers = scalars(values)
        if not numbers:
            return
        step = int(values.get("step", values.get("epoch", 0)) or 0)
        prefix = stage if event in ("step", "eval") else f"{stage}/{event}"
        tagged = {f"{prefix}/{k}": v for k, v in numbers.items()}
        if self.kind == "tensorboard":
            for tag, value in tagged.items():
                self.handle.add_scalar(tag, value, step)
        elif self.kind == "wandb":
            # wandb drops a log whose step is below the run's last one, and RL's steps
            # start again at 1 after SFT's: each stage gets its own step axis instead.
            if stage not in self.stages:
                self.handle.define_metric(f"{stage}/step")
                self.handle.define_metric(f"{stage}/*", step_metric=f"{stage}/step")
                self.stages.add(stage)
            self.handle.log({**tagged, f"{stage}/step": step})
        else:  # trackio keeps every (step, values) row as given
            self.handle.log(tagged, step=step)

    def close(self) -> None:
        if self.kind == "tensorboard":
            self.handle.close()
        else:
            self.handle.finish()


def open_tracker(kind: str, out: Path, run_id: str, config: dict[str, Any]) -> Tracker | None:
    """Start the tracker ``kind`` (already resolved) for the run in ``out``; TensorBoard
    writes to ``out/tensorboard``."""
    if kind == "none":
        return None
    if kind == "tensorboard":
        from torch.utils.tensorboard import SummaryWriter

        return Tracker(kind, SummaryWriter(log_dir=str(out / "tensorboard")))
    module = importlib.import_module(kind)
    flat = {f"{section}.{k}": v for section, values in config.items() for k, v in values.items()}
    if kind == "wandb":
        run = module.init(project="fastlatent", name=run_id, id=run_id, resume="allow",
                          dir=str(out), config=flat)
        return Tracker(kind, run)
    module.init(project="fastlatent", name=run_id, config=flat, resume="allow")
    return Tracker(kind, module)
