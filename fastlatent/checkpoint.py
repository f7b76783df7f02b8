"""Resumable training state under ``OUTPUT_DIR/checkpoints/``.

One checkpoint = one folder ``<stage>-<step:08d>`` holding what the stage trains (SFT: the
whole LatentReasoner in ``model/``; RL: ``latent_ratt.safetensors``, the LLM being frozen,
or with ``--rl-trainable all`` the whole model in ``model/``),
``trainer.pt`` (optimiser, schedule, position in the data order, counters, and every RNG
in use: Python, NumPy, torch CPU and CUDA, the RL noise generator) and, written last,
``complete.json`` listing each file's size and sha256 (verified on load). The folder is
built under a temporary name and renamed into place, so it is either complete or absent;
the previous checkpoint is deleted only after the new one is complete (the newest
``KEEP`` are kept).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastlatent.errors import CheckpointError

CHECKPOINTS = "checkpoints"
COMPLETE_FILE, TRAINER_FILE, MODEL_DIR = "complete.json", "trainer.pt", "model"
STAGE_ORDER = {"sft": 0, "rl": 1}
KEEP = 2
HASH_CHUNK = 1 << 22  # 4 MiB reads
_NAME = re.compile(r"^(sft|rl)-(\d{8})$")


@dataclass
class TrainingState:
    """Where a stage's loop stands: ``step`` optimiser steps done, ``batch`` batches of
    epoch ``epoch`` consumed, plus the stage's own counters (``extra``)."""

    stage: str
    step: int
    epoch: int
    batch: int
    extra: dict[str, Any]


def rng_states(generator: torch.Generator | None = None) -> dict[str, Any]:
    states: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(),
                              "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    if generator is not None:
        states["generator"] = generator.get_state()
    return states


def restore_rng_states(states: dict[str, Any], generator: torch.Generator | None = None
                       ) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    if generator is not None:
        if "generator" not in states:
            raise CheckpointError("the checkpoint holds no noise-generator state")
        generator.set_state(states["generator"])


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes, hex: in the standard library, hardware-accelerated on
    current CPUs, and strong enough that no corruption goes unseen (measured in
    benchmarks/RESULTS.md, "checkpoint checksums")."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_tree(root: Path) -> dict[str, dict[str, Any]]:
    """Flush every file under ``root`` to disk; returns relative path -> its size and
    sha256 (what ``complete.json`` records and loading verifies)."""
    files = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        with open(path, "rb") as f:
            os.fsync(f.fileno())
        files[str(path.relative_to(root))] = {"bytes": path.stat().st_size,
                                               "sha256": file_digest(path)}
    return files


def verify_files(path: Path, files: dict[str, Any]) -> None:
    """Each file of ``complete.json`` has its recorded size and sha256 (checkpoints
    written before checksums record the size alone).

    Raises:
        CheckpointError: naming the first file that is missing, of another size or whose
            content changed.
    """
    for rel, expected in files.items():
        file = path / rel
        size, digest = ((expected, None) if isinstance(expected, int)
                        else (expected.get("bytes"), expected.get("sha256")))
        actual = file.stat().st_size if file.is_file() else None
        if actual != size:
            raise CheckpointError(f"{file}: expected {size} bytes, found "
                                  f"{'no file' if actual is None else f'{actual} bytes'}; the "
                                  f"checkpoint {path} is damaged")
        if digest is not None and file_digest(file) != digest:
            raise CheckpointError(f"{file}: its content changed since it was written (sha256 "
                                  f"differs from complete.json); the checkpoint {path} is "
                                  "damaged")


def save_training_state(output_dir: Path, state: TrainingState, reasoner,
                        optimizer: torch.optim.Optimizer,
                        scheduler: torch.optim.lr_scheduler.LRScheduler,
                        generator: torch.Generator | None = None, *,
                        whole_model: bool | None = None) -> Path:
    """Write one complete checkpoint atomically; prune older ones; return its folder.
    ``whole_model``: save the whole LatentReasoner (default: for SFT; RL with
    ``--rl-trainable all`` trains the LLM too) instead of LatentRATT alone."""
    root = Path(output_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    name = f"{state.stage}-{state.step:08d}"
    final = root / name
    tmp = root / f".tmp-{name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        if state.stage == "sft" if whole_model is None else whole_model:
            reasoner.save(tmp / MODEL_DIR)
        else:
            reasoner.save_ratt(tmp)
        torch.save({"state": state.__dict__, "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "rng": rng_states(generator)},
                   tmp / TRAINER_FILE)
        files = _fsync_tree(tmp)
        (tmp / COMPLETE_FILE).write_text(json.dumps(
            {"stage": state.stage, "step": state.step, "files": files}, indent=2) + "\n")
        _fsync_tree(tmp)
        if final.exists():  # the same step saved twice (e.g. a resumed run's first save)
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in complete_checkpoints(output_dir)[KEEP:]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoint folders, newest first (later stage, then higher step)."""
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _NAME.match(path.name)
        if match and (path / COMPLETE_FILE).is_file():
            found.append((STAGE_ORDER[match[1]], int(match[2]), path))
    return [path for *_, path in sorted(found, reverse=True)]


def remove_partial_checkpoints(output_dir: Path) -> list[Path]:
    """Delete temporary folders a crash left behind (checkpoints and reasoner saves)."""
    out = Path(output_dir)
    leftovers = [*(out / CHECKPOINTS).glob(".tmp-*"), *out.glob(".*.tmp-*"),
                 *out.glob(".*.old-*")]
    for path in leftovers:
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    return leftovers


@dataclass
class LoadedCheckpoint:
    path: Path
    state: TrainingState
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    rng: dict[str, Any]


def load_training_state(path: Path) -> LoadedCheckpoint:
    """Read and verify one checkpoint; any damage is a :class:`CheckpointError` naming the
    file."""
    path = Path(path)
    complete = path / COMPLETE_FILE
    try:
        manifest = json.loads(complete.read_text(encoding="utf-8"))
        files = manifest["files"]
        if not isinstance(files, dict):
            raise TypeError(f"'files' is a {type(files).__name__}")
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{complete}: unreadable ({err}); the checkpoint {path} is "
                              "incomplete or damaged") from None
    verify_files(path, files)
    trainer = path / TRAINER_FILE
    try:
        payload = torch.load(trainer, map_location="cpu", weights_only=False)
        state = TrainingState(**payload["state"])
    except Exception as err:  # torch.load raises many types for a damaged file
        raise CheckpointError(f"{trainer}: cannot be read ({type(err).__name__}: {err})"
                              ) from None
    return LoadedCheckpoint(path, state, payload["optimizer"], payload["scheduler"],
                            payload["rng"])


def newest_loadable(output_dir: Path, warn: Callable[[str], None]
                    ) -> LoadedCheckpoint | None:
    """The newest checkpoint that verifies; a damaged one is reported and the one before
    it is used (resuming from an earlier step replays the same steps)."""
    for path in complete_checkpoints(output_dir):
        try:
            return load_training_state(path)
        except CheckpointError as err:
            warn(f"warning: {err}; trying the checkpoint before it")
    return None


def checkpoint_after_step(output_dir: Path, state: TrainingState, reasoner,
                          optimizer: torch.optim.Optimizer,
                          scheduler: torch.optim.lr_scheduler.LRScheduler, *, save_every: int,
                          log, generator: torch.Generator | None = None,
                          final: bool = False, whole_model: bool | None = None) -> None:
    """After an optimiser step: save every ``save_every`` steps, at the end of a stage
    (``final``) and when a shutdown signal arrived (on any process: all stop after the
    same step), then raise :class:`~fastlatent.shutdown.Interrupted` for the signal.
    Only the main process writes; every process holds the same weights and states."""
    from fastlatent import distributed, shutdown

    signum = distributed.agreed_signal(shutdown.requested())
    due = final or signum is not None or (save_every > 0 and state.step % save_every == 0)
    if due and distributed.is_main():
        path = save_training_state(output_dir, state, reasoner, optimizer, scheduler,
                                   generator, whole_model=whole_model)
        log.write(state.stage, "checkpoint", step=state.step, path=str(path))
    if signum is not None:
        log.write(state.stage, "interrupted", step=state.step, signal=signum)
        raise shutdown.Interrupted(signum, f"after {state.stage.upper()} step {state.step} "
                                   f"(checkpoint saved)")


def restore_optimisation(loaded: LoadedCheckpoint, stage: str,
                         optimizer: torch.optim.Optimizer,
                         scheduler: torch.optim.lr_scheduler.LRScheduler,
                         generator: torch.Generator | None = None) -> TrainingState:
    """Put a loaded checkpoint's optimiser, schedule and RNG states back; return its
    position."""
    if loaded.state.stage != stage:
        raise CheckpointError(f"{loaded.path}: a {loaded.state.stage} checkpoint, expected "
                              f"{stage}")
    optimizer.load_state_dict(loaded.optimizer)
    scheduler.load_state_dict(loaded.scheduler)
    restore_rng_states(loaded.rng, generator)
    return loaded.state
