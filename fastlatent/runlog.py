"""Run outputs: the JSONL step log and atomic JSON writes."""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write to a temporary sibling and rename it into place (never half-written)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def write_json_atomic(path: str | os.PathLike, payload: Any) -> Path:
    return write_text_atomic(path, json.dumps(json_safe(payload), indent=2, default=str,
                                              allow_nan=False) + "\n")


def write_jsonl_atomic(path: str | os.PathLike, rows: Iterable[dict]) -> Path:
    """One JSON object per line (non-ASCII kept as is)."""
    return write_text_atomic(path, "".join(
        json.dumps(json_safe(r), ensure_ascii=False, allow_nan=False) + "\n" for r in rows))


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None (JSON has no NaN/Infinity),
    tensors and NumPy scalars turned into Python numbers."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def logged_steps(path: str | os.PathLike) -> dict[str, int]:
    """The highest step of each stage's "step" records in an existing log.jsonl (empty when
    there is none): a resumed run redoes the steps after its checkpoint, and those records
    are marked ``replayed``."""
    highest: dict[str, int] = {}
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return highest
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:  # a line cut short by a kill
            continue
        if record.get("event") == "step" and isinstance(record.get("step"), int):
            stage = record.get("stage")
            highest[stage] = max(highest.get(stage, 0), record["step"])
    return highest


def _ends_mid_line(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            if f.tell() == 0:
                return False
            f.seek(-1, os.SEEK_END)
            return f.read(1) != b"\n"
    except (FileNotFoundError, OSError):
        return False


class StepLog:
    """Appends one JSON object per line (flushed each time, so a crash loses nothing).
    Every record carries the run id; non-finite numbers are written as null. A "step"
    record at or below ``replay_until[stage]`` (the steps an earlier segment of a resumed
    run already logged) carries ``"replayed": true``: readers keep the last record of a
    step."""

    def __init__(self, path: str | os.PathLike, run_id: str | None = None, tracker=None,
                 replay_until: dict[str, int] | None = None):
        self.path = Path(path)
        self.run_id = run_id
        self.tracker = tracker  # a fastlatent.tracking.Tracker: gets every record too
        self.replay_until = dict(replay_until or {})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        cut_short = _ends_mid_line(self.path)
        self._file = self.path.open("a", encoding="utf-8")
        if cut_short:  # a kill mid-write: the next record starts on its own line
            self._file.write("\n")

    def write(self, stage: str, event: str, **values: Any) -> None:
        record = {"time": round(time.time(), 3), "run_id": self.run_id, "stage": stage,
                  "event": event, **values}
        if event == "step" and values.get("step", math.inf) <= self.replay_until.get(stage, 0):
            record["replayed"] = True
        self._file.write(json.dumps(json_safe(record), default=str, allow_nan=False) + "\n")
        self._file.flush()
        if self.tracker is not None:
            self.tracker.record(stage, event, values)

    def close(self) -> None:
        self._file.close()
        if self.tracker is not None:
            self.tracker.close()
