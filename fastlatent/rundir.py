"""One run per output folder: a lock that keeps a second process out, the rule that a
non-empty folder is continued (``--resume``) or replaced (``--overwrite``) but never
silently mixed, and the run id every log record carries."""

from __future__ import annotations

import json
import os
import shutil
import socket
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastlatent.errors import RunFolderError

LOCK_FILE = ".fastlatent.lock"
MANIFEST = "run.json"
# What a run writes into its folder; --overwrite deletes these and nothing else.
ARTEFACTS = (MANIFEST, "config.yaml", "log.jsonl", "metrics.json", "predictions.jsonl",
             "progress.json", "sft", "rl", "base", "checkpoints", "plots", "tensorboard")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def acquire_lock(out: Path) -> Path:
    """Create ``out/.fastlatent.lock`` (O_EXCL) holding this process's pid and host. A lock
    left by a dead process on this host (a crash, ``kill -9``) is taken over."""
    lock = out / LOCK_FILE
    me = {"pid": os.getpid(), "host": socket.gethostname()}
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder = json.loads(lock.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                holder = {}
            pid, host = holder.get("pid"), holder.get("host")
            if isinstance(pid, int) and host == me["host"] and not _alive(pid):
                lock.unlink(missing_ok=True)  # stale: its process is gone
                continue
            raise RunFolderError(
                f"{out}: another fastlatent process (pid {pid} on {host}) is writing to this "
                f"folder; wait for it, or use another --output-dir (if that process is gone "
                f"from another machine, delete {lock})") from None
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(me, f)
        return lock
    raise RunFolderError(f"{out}: could not take the lock {lock}")


def release_lock(lock: Path) -> None:
    """Remove the lock; in a folder that has become unwritable it stays (a later run sees
    its process gone and takes the folder)."""
    try:
        lock.unlink(missing_ok=True)
    except OSError:
        pass


def read_manifest(out: Path) -> dict[str, Any]:
    """The run.json of the run in ``out`` (for ``--resume``)."""
    path = Path(out) / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunFolderError(f"--resume: {path} does not exist, so there is no run to "
                             "continue in --output-dir; drop --resume to start one") from None
    except (OSError, ValueError) as err:
        raise RunFolderError(f"--resume: {path} is unreadable ({err})") from None
    if not isinstance(manifest, dict) or "config" not in manifest:
        raise RunFolderError(f"--resume: {path} has no configuration; it was not written "
                             "by fastlatent.train")
    return manifest


def prepare_folder(out: Path, *, resume: bool, overwrite: bool) -> dict[str, Any] | None:
    """Check (and for ``overwrite`` clear) the folder, under the lock the caller holds.
    Returns the earlier run's manifest when resuming."""
    manifest_path = out / MANIFEST
    if resume:
        return read_manifest(out)
    present = sorted(p.name for p in out.iterdir() if p.name != LOCK_FILE)
    if present and not overwrite:
        what = "an earlier run" if manifest_path.exists() else f"files ({present[:5]})"
        raise RunFolderError(
            f"{out} already holds {what}; pass --resume to continue it, --overwrite to "
            "replace it, or choose another --output-dir")
    for name in ARTEFACTS:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    return None


@dataclass
class RunFolder:
    """An output folder this process holds the lock of (use as a context manager)."""

    path: Path
    run_id: str
    earlier: dict[str, Any] | None
    lock: Path | None  # None in the processes of a torchrun that do not write

    @classmethod
    def open(cls, out: Path, *, resume: bool, overwrite: bool) -> RunFolder:
        out.mkdir(parents=True, exist_ok=True)
        lock = acquire_lock(out)
        try:
            earlier = prepare_folder(out, resume=resume, overwrite=overwrite)
        except BaseException:
            release_lock(lock)
            raise
        run_id = earlier["run_id"] if earlier and "run_id" in earlier else uuid.uuid4().hex[:12]
        return cls(out, run_id, earlier, lock)

    def __enter__(self) -> RunFolder:
        return self

    def __exit__(self, *exc) -> None:
        if self.lock is not None:
            release_lock(self.lock)
