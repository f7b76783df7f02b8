"""Data warnings a run reports before it trains (errors with ``--strict``): history titles
the catalogue lacks, empty histories, evaluation rows that are also training rows."""

from __future__ import annotations

from collections.abc import Sequence

from tqdm.auto import tqdm

from fastlatent.config import DataConfig
from fastlatent.data.csv_layout import DataError
from fastlatent.data.example import Dataset, Example


def data_warnings(dataset: Dataset, train: Sequence[Example], evaluation: Sequence[Example],
                  *, train_split: str, eval_split: str) -> list[str]:
    """One message per kind of problem, with counts and examples; [] when clean."""
    warnings = []
    known = frozenset(dataset.catalogue.titles)
    for split, rows in (("training", train), ("evaluation", evaluation)):
        missing = [t for ex in rows for t in ex.history if t not in known]
        if missing:
            affected = sum(any(t not in known for t in ex.history) for ex in rows)
            distinct = sorted(set(missing))
            warnings.append(
                f"{affected} of {len(rows)} {split} rows name history titles that are not in "
                f"the catalogue ({len(distinct)} distinct, e.g. {distinct[:3]}); the prompt "
                "shows them, but they cannot be recommended")
        empty = sum(not ex.history for ex in rows)
        if empty:
            warnings.append(f"{empty} of {len(rows)} {split} rows have an empty history "
                            "(the prompt lists no items)")
    trained = {(ex.user, ex.history, ex.target) for ex in train}
    overlap = sum((ex.user, ex.history, ex.target) in trained for ex in evaluation)
    if overlap:
        same = " (--train-split and --eval-split are both " + repr(eval_split) + ")" \
            if train_split == eval_split else ""
        warnings.append(f"{overlap} of {len(evaluation)} evaluation rows are also training "
                        f"rows{same}: the metrics measure memorisation, not recommendation")
    return warnings


def report_data(dataset: Dataset, train: Sequence[Example], evaluation: Sequence[Example],
                cfg: DataConfig, log) -> list[str]:
    """Print and log the warnings; with ``cfg.strict`` the first is a :class:`DataError`."""
    warnings = data_warnings(dataset, train, evaluation, train_split=cfg.train_split,
                             eval_split=cfg.eval_split)
    if warnings and cfg.strict:
        raise DataError(f"{cfg.data}: {warnings[0]} (--strict makes data warnings errors)")
    for message in warnings:
        tqdm.write(f"warning: {message}")
        log.write("data", "warning", message=message)
    return [f"data warning: {m}" for m in warnings]
