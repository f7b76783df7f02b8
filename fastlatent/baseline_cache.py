"""Traditional recommenders beside the trainer's stages: ``fastlatent.train --baselines``.

The trainer reports RecBole's SASRec (or the models named) next to the popularity baseline
without training it on every run: ``python -m fastlatent.baselines`` runs once per set of
rows in a subprocess (RecBole seeds torch's global generator, switches logging and
anomaly detection; none of that reaches the LLM's run) and its metrics.json is kept in
``cache_dir()/baselines/<key>``, where the key hashes the settings that choose the rows
and the rows themselves. The rows are those the baselines command takes for the same
``--data``, splits, ``--eval-limit`` and ``--seed``: training on the trainer's training
rows, early stopping on all of its held-out rows (``--valid-limit`` 0, as the command's
default), scoring on the trainer's evaluation rows.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastlatent.assets import cache_dir
from fastlatent.data.example import Example
from fastlatent.errors import UserError

CACHE_FOLDER = "baselines"
AUTO = "auto"
NONE = "none"
AUTO_MODELS = ("sasrec",)  # what "auto" trains when RecBole is installed
KEY_VERSION = 1  # bump when what a cached entry holds changes


class BaselineChoiceError(UserError, ValueError):
    """``--baselines`` names something the run cannot train."""


@dataclass(frozen=True)
class BaselineRows:
    """What fixes a baseline's numbers: the command's row settings and the rows."""

    data: str
    train_split: str
    eval_split: str
    eval_limit: int
    seed: int
    epochs: int
    train: Sequence[Example]
    valid: Sequence[Example]
    evaluation: Sequence[Example]


def recbole_installed() -> bool:
    return importlib.util.find_spec("recbole") is not None


def resolve_models(choice: str) -> tuple[tuple[str, ...], str | None]:
    """``--baselines`` -> (models to report, a note for the user or None).

    "auto": SASRec when RecBole is installed, else nothing (with a note naming the extra);
    "none": nothing; otherwise comma-separated names of ``fastlatent.baselines.MODELS``,
    which need RecBole.

    Raises:
        BaselineChoiceError: an unknown name, or names given without RecBole installed.
    """
    from fastlatent.baselines import MODELS

    text = choice.strip().lower()
    if text == NONE:
        return (), None
    if text == AUTO:
        if recbole_installed():
            return AUTO_MODELS, None
        return (), ("note: no traditional baseline beside popularity (RecBole is not "
                    "installed: pip install -e '.[baselines]' adds SASRec to the report)")
    names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    unknown = [n for n in names if n not in MODELS]
    if unknown or not names:
        raise BaselineChoiceError(
            f"--baselines {choice!r}: expected auto, none or names among "
            f"{', '.join(MODELS)}, got {', '.join(unknown) or 'none'}")
    if not recbole_installed():
        raise BaselineChoiceError(f"--baselines {choice!r}: RecBole is not installed; "
                                  "pip install -e '.[baselines]', or use --baselines none")
    return names, None


def _row_record(ex: Example) -> list[Any]:
    return [ex.user, list(ex.history), ex.target, ex.target_item,
            None if ex.history_items is None else list(ex.history_items)]


def cache_key(rows: BaselineRows, models: Sequence[str]) -> str:
    """sha256 of the settings and every row (user, titles, ids): the same key means the
    command would train on and score the same rows."""
    digest = hashlib.sha256()
    head = {"version": KEY_VERSION, "models": sorted(models), "data": rows.data,
            "train_split": rows.train_split, "eval_split": rows.eval_split,
            "eval_limit": rows.eval_limit, "seed": rows.seed, "epochs": rows.epochs}
    digest.update(json.dumps(head, sort_keys=True).encode())
    for name in ("train", "valid", "evaluation"):
        digest.update(f"\n{name}\n".encode())
        for ex in getattr(rows, name):
            digest.update(json.dumps(_row_record(ex), ensure_ascii=False).encode() + b"\n")
    return digest.hexdigest()[:24]


def command(rows: BaselineRows, models: Sequence[str], output_dir: Path) -> list[str]:
    """The ``python -m fastlatent.baselines`` command that computes the entries."""
    return [sys.executable, "-m", "fastlatent.baselines", "--data", rows.data,
            "--train-split", rows.train_split, "--eval-split", rows.eval_split,
            "--eval-limit", str(rows.eval_limit), "--valid-limit", "0",
            "--seed", str(rows.seed), "--epochs", str(rows.epochs),
            "--models", ",".join(models),
            "--output-dir", str(output_dir)]


def _entries(folder: Path, models: Sequence[str]) -> dict[str, dict[str, Any]] | None:
    path = folder / "metrics.json"
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not all(isinstance(metrics.get(m), dict) and "hr@10_ci" in metrics[m] for m in models):
        return None
    return {m: metrics[m] for m in models}


@dataclass
class BaselineOutcome:
    """The entries (model -> metrics), where they came from, and a failure message."""

    entries: dict[str, dict[str, Any]]
    folder: Path
    cached: bool
    seconds: float
    error: str | None = None


def cached_baselines(rows: BaselineRows, models: Sequence[str], log_path: Path, *,
                     cache_root: Path | None = None, announce=print) -> BaselineOutcome:
    """The metrics of ``models`` on ``rows``: from the cache, or computed by the baselines
    command (output appended to ``log_path``) into a temporary folder that is renamed into
    the cache only when complete, so a killed or failed training leaves no entry. A failed
    command gives an outcome with ``error`` set (the LLM's run goes on without it)."""
    root = (cache_root or cache_dir()) / CACHE_FOLDER
    folder = root / cache_key(rows, models)
    found = _entries(folder, models)
    if found is not None:
        return BaselineOutcome(found, folder, cached=True, seconds=0.0)
    root.mkdir(parents=True, exist_ok=True)
    work = root / f"{folder.name}.tmp-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    cmd = command(rows, models, work)
    announce(f"baselines: training {', '.join(models)} on the run's rows once (RecBole; "
             f"cached in {folder}; log {log_path})")
    start = time.time()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        log.write(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} $ {' '.join(cmd)}\n".encode())
        log.flush()
        done = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=False)
    seconds = round(time.time() - start, 1)
    found = _entries(work, models)
    if done.returncode != 0 or found is None:
        shutil.rmtree(work, ignore_errors=True)
        return BaselineOutcome({}, folder, cached=False, seconds=seconds, error=(
            f"the baselines command exited {done.returncode} after {seconds:.0f} s; "
            f"see {log_path}"))
    try:
        work.rename(folder)
    except OSError:  # another run finished the same entry first: keep theirs
        shutil.rmtree(work, ignore_errors=True)
        found = _entries(folder, models) or found
    return BaselineOutcome(found, folder, cached=False, seconds=seconds)
