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


class StepLog:
    """Appends one JSON object per line (flushed each time, so a crash loses nothing).
    Every record carries the run id; non-finite numbers are written as null."""

    def __init__(self, path: str | os.PathLike, run_id: str | None = None, tracker=None):
        self.path = Path(path)
        self.run_id = run_id
        self.tracker = tracker  # a fastlatent.tracking.Tracker: gets every record too
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", encoding="utf-8")

    def write(self, stage: str, event: str, **values: Any) -> None:
        record = {"time": round(time.time(), 3), "run_id": self.run_id, "stage": stage,
                  "event": event, **values}
        self._file.write(json.dumps(json_safe(record), default=str, allow_nan=False) + "\n")
        self._file.flush()
        if self.tracker is not None:
            self.tracker.record(stage, event, values)

    def close(self) -> None:
        self._file.close()
        if self.tracker is not None:
            self.tracker.close()
