"""The records every data source produces: examples, the item catalogue, the splits."""

from __future__ import annotations

from dataclasses import dataclass, field

from fastlatent.errors import DataError


@dataclass(frozen=True)
class Example:
    """One next-item sample: the user's last <=10 item titles (oldest first) and the target.

    ``target_time`` orders samples for temporal splits; ``target_item`` is the catalogue id
    of the target when the source knows it (used for popularity statistics);
    ``history_items`` the catalogue ids of ``history``, one per title, when the source
    knows them (titles need not be unique: ID-based baselines need the ids).
    """

    user: str
    history: tuple[str, ...]
    target: str
    target_item: int | None = None
    target_time: int | None = None
    history_items: tuple[int, ...] | None = None


@dataclass(frozen=True)
class Catalogue:
    """The items a recommendation may name. Titles need not be unique (ids are)."""

    titles: tuple[str, ...]  # index = item id

    def __len__(self) -> int:
        return len(self.titles)

    @property
    def distinct_titles(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(self.titles))


@dataclass
class Dataset:
    """Named splits (any subset of train/valid/test) over one catalogue.

    ``domain`` is the plural noun the prompt uses ("movies", "music", "products").
    """

    name: str
    domain: str
    catalogue: Catalogue
    splits: dict[str, list[Example]] = field(default_factory=dict)

    def split(self, name: str) -> list[Example]:
        if name not in self.splits:
            raise DataError(
                f"dataset {self.name!r} has no split {name!r}; available: {sorted(self.splits)}"
                " (choose one with --train-split / --eval-split)")
        return self.splits[name]
