"""Clean shutdown on SIGTERM/SIGINT: the training loops finish their current step, write a
checkpoint and raise :class:`Interrupted`; the CLI says how to resume and exits 128+signal.

A second SIGINT while the first is being handled stops at once (KeyboardInterrupt).
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_requested: int | None = None


class Interrupted(Exception):
    """Raised by a loop that stopped on a signal (after saving what it could)."""

    def __init__(self, signum: int, where: str):
        self.signum = signum
        super().__init__(f"stopped by {signal.Signals(signum).name} {where}")


def requested() -> int | None:
    """The signal received since :func:`handle_signals` began, if any."""
    return _requested


def check(where: str) -> None:
    """Raise :class:`Interrupted` if a signal arrived (for loops with nothing to save)."""
    if _requested is not None:
        raise Interrupted(_requested, where)


def _on_signal(signum: int, frame) -> None:
    global _requested
    if _requested is not None and signum == signal.SIGINT:
        raise KeyboardInterrupt
    _requested = signum
    print(f"\nfastlatent: {signal.Signals(signum).name} received; stopping after the current "
          "step with a checkpoint" + (" (Ctrl-C again stops at once, unsaved)"
                                       if signum == signal.SIGINT else ""), file=sys.stderr)


@contextmanager
def handle_signals() -> Iterator[None]:
    """Within the block SIGTERM/SIGINT set a flag instead of killing the process (only
    the main thread may install signal handlers; elsewhere the block changes nothing)."""
    global _requested
    _requested = None
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _on_signal) for s in _SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        _requested = None
