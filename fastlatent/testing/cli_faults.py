"""A fault injected into a ``python -m fastlatent.train`` subprocess: the source of a
script that wraps one function of a fastlatent module so that, right after its N-th call
(optionally only on one torchrun rank), a statement runs (a signal to itself, a raise),
and then runs the CLI with the script's arguments. Run it with ``python -c`` or save it
and hand it to torchrun."""

from __future__ import annotations

import textwrap

_TEMPLATE = textwrap.dedent("""
    import os, signal, sys
    import fastlatent.{module} as module
    real = module.{function}
    calls = 0
    def with_fault(*args, **kwargs):
        global calls
        result = real(*args, **kwargs)
        calls += 1
        if calls == {at} and {on_this_rank}:
            {action}
        return result
    module.{function} = with_fault
    from fastlatent.train import main
    sys.exit(main(sys.argv[1:]))
""")


def cli_with_fault(module: str, function: str, at: int, action: str,
                   rank: int | None = None) -> str:
    """``action``: one Python statement, e.g. ``os.kill(os.getpid(), signal.SIGKILL)``
    or ``raise RuntimeError("...")``; ``rank``: only on that torchrun rank."""
    on_this_rank = "True" if rank is None else f"os.environ.get('RANK') == '{rank}'"
    return _TEMPLATE.format(module=module, function=function, at=at, action=action,
                            on_this_rank=on_this_rank)


def signal_self(name: str) -> str:
    return f"os.kill(os.getpid(), signal.{name})"
