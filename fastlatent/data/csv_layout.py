"""The CSV layout of BIGRec, D³ and LatentR³: ``DIR/{train,valid,test}/NAME.csv`` plus
``DIR/info/NAME.txt`` (one ``title<TAB>id`` line per item, ids 0..N-1).

Only ``history_item_title`` and ``item_title`` are required; ``user_id``, ``item_id`` and
``timestamp`` are used when present. Column names are matched case-insensitively. List
columns are Python list literals, parsed with ``ast.literal_eval`` (never ``eval``).
"""

from __future__ import annotations

import ast
import csv
import io
import re
import tokenize
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from fastlatent.data.example import Catalogue, Dataset, Example
from fastlatent.errors import DataError

__all__ = ["DataError", "load_csv_dir", "read_info_file", "read_split_csv"]

SPLIT_NAMES = ("train", "valid", "test")
REQUIRED_COLUMNS = ("history_item_title", "item_title")
MAX_HISTORY = 10
_CSV_FIELD_LIMIT = 2**31 - 1  # the largest value csv accepts on every platform
_MAYBE_JOINED = re.compile(r"['\"]\s*['\"]")  # a quote, maybe spaces, a quote


@dataclass(frozen=True)
class _Columns:
    """A CSV header: lower-cased column name -> position, and the number of columns."""

    index: dict[str, int]
    width: int


def load_csv_dir(path: str | Path, *, splits: Iterable[str] | None = None) -> Dataset:
    """Read a CSV-layout directory into a :class:`Dataset`.

    ``splits`` picks which of train/valid/test to read (each must then exist); by default
    every split folder present is read. Every split folder holds exactly one ``NAME.csv``,
    all with the same NAME, and ``info/NAME.txt`` is the catalogue. The domain is "movies"
    when NAME contains "Movie", "music" when it contains "CDs" or "Music" (any case), else
    "products".

    Raises:
        DataError: anything malformed or missing, naming the file (and row) to fix.
    """
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"{root}: expected a directory in the CSV layout "
                        f"({_expected_layout(root)}), got no such directory")
    present = _split_dirs(root, splits)
    csv_files = {split: _split_csv(root / split) for split in present}
    names = sorted({file.stem for file in csv_files.values()})
    if len(names) != 1:
        raise DataError(f"{root}: expected the split CSVs to share one NAME, got "
                        f"{[str(file) for file in csv_files.values()]}")
    name = names[0]
    info_path = _info_file(root, name)
    catalogue = read_info_file(info_path)
    data = {split: read_split_csv(file, catalogue, info_path=info_path)
            for split, file in csv_files.items()}
    return Dataset(name=f"csv:{root.resolve().name}", domain=domain_for(name),
                   catalogue=catalogue, splits=data)


def domain_for(name: str) -> str:
    """The plural noun a prompt uses for the items of the dataset file ``name``."""
    lowered = name.lower()
    if "movie" in lowered:
        return "movies"
    if "cds" in lowered or "music" in lowered:
        return "music"
    return "products"


def read_info_file(path: Path) -> Catalogue:
    """Parse ``title<TAB>id`` lines (ids exactly 0..N-1, any order); blank lines are skipped."""
    titles_by_id: dict[int, str] = {}
    for line_no, text in enumerate(read_utf8(path).split("\n"), start=1):
        text = text.rstrip("\r")
        if not text:
            continue
        title, tab, id_text = text.rpartition("\t")
        where = f"{path}, line {line_no}"
        if not tab:
            raise DataError(f"{where}: expected 'title<TAB>id', got {text!r}")
        item = _parse_int(id_text, where, "item id")
        if item < 0 or item in titles_by_id:
            raise DataError(f"{where}: expected a new item id >= 0, got {item} "
                            f"(ids must be unique and cover 0..N-1)")
        titles_by_id[item] = title
    if not titles_by_id:
        raise DataError(f"{path}: no items; expected one 'title<TAB>id' line per item")
    absent = [i for i in range(len(titles_by_id)) if i not in titles_by_id]
    if absent:
        raise DataError(f"{path}: expected ids 0..{len(titles_by_id) - 1}, missing {absent[:10]}")
    return Catalogue(tuple(titles_by_id[i] for i in range(len(titles_by_id))))


def read_split_csv(path: Path, catalogue: Catalogue, *, info_path: Path) -> list[Example]:
    """Parse one split's CSV into examples; every target must be a catalogue title.

    ``user`` is "" when there is no ``user_id`` column; ``target_item`` / ``target_time`` /
    ``history_items`` are None without ``item_id`` / ``timestamp`` / ``history_item_id``.
    Histories keep their last 10 titles (and ids).

    Rows are reported as "data row R (line L)": R counts records after the header from 1,
    L is the file line the record ends on.
    """
    csv.field_size_limit(max(csv.field_size_limit(), _CSV_FIELD_LIMIT))
    titles = frozenset(catalogue.titles)
    examples = []
    with io.StringIO(read_utf8(path, csv_rows=True), newline="") as f:
        reader = csv.reader(f)
        try:
            columns = _header(next(reader, None), path)
            for row_no, row in enumerate(reader, start=1):
                if not row:
                    continue
                where = f"{path}, data row {row_no} (line {reader.line_num})"
                examples.append(_example(row, columns, where, catalogue, titles, info_path))
        except csv.Error as err:
            raise DataError(f"{path}, line {reader.line_num}: malformed CSV ({err})") from None
    if not examples:
        raise DataError(f"{path}: no data rows; expected at least one sample below the header")
    return examples


def read_utf8(path: Path, *, csv_rows: bool = False) -> str:
    """The file's text (a UTF-8 BOM dropped); bytes that are not UTF-8 are a
    :class:`DataError` naming the line (and, for a CSV, the data row)."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise DataError(f"{path}: cannot be read ({err.strerror})") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        where = f"{path}, line {line}"
        if csv_rows:
            before = data[:data.rfind(b"\n", 0, err.start) + 1].decode("utf-8-sig")
            records = sum(1 for row in csv.reader(io.StringIO(before, newline="")) if row)
            where = f"{path}, data row {max(records, 1)} (line {line})"
        raise DataError(f"{where}: bytes {data[err.start:err.start + 4]!r} are not UTF-8 "
                        "(the file is in another encoding); re-save it as UTF-8, e.g. "
                        "iconv -f latin1 -t utf-8") from None


def _expected_layout(root: Path) -> str:
    return (", ".join(str(root / split / "NAME.csv") for split in SPLIT_NAMES)
            + f" (any subset), and {root / 'info' / 'NAME.txt'}")


def _split_dirs(root: Path, splits: Iterable[str] | None) -> list[str]:
    if splits is None:
        present = [split for split in SPLIT_NAMES if (root / split).is_dir()]
        if not present:
            raise DataError(f"{root}: no split folders; expected {_expected_layout(root)}")
        return present
    wanted = list(splits)
    unknown = [split for split in wanted if split not in SPLIT_NAMES]
    if unknown or not wanted:
        raise ValueError(f"expected splits among {list(SPLIT_NAMES)}, got {wanted}")
    missing = [split for split in wanted if not (root / split).is_dir()]
    if missing:
        raise DataError(f"{root}: requested splits {missing} have no folder; "
                        f"expected {_expected_layout(root)}")
    return wanted


def _split_csv(folder: Path) -> Path:
    files = sorted(folder.glob("*.csv"))
    if len(files) != 1:
        raise DataError(f"{folder}: expected exactly one .csv file, got "
                        f"{[file.name for file in files] or 'none'}")
    return files[0]


def _info_file(root: Path, name: str) -> Path:
    info_dir = root / "info"
    if not info_dir.is_dir():
        raise DataError(f"{root}: missing the info folder; expected {info_dir / name}.txt "
                        "with one 'title<TAB>id' line per item")
    path = info_dir / f"{name}.txt"
    if not path.is_file():
        found = sorted(file.name for file in info_dir.iterdir())
        raise DataError(f"{info_dir}: missing {name}.txt (the catalogue of {name}.csv); "
                        f"found {found or 'nothing'}")
    return path


def _header(header: list[str] | None, path: Path) -> _Columns:
    if header is None:
        raise DataError(f"{path}: empty file; expected a header row with columns "
                        f"{list(REQUIRED_COLUMNS)}")
    index = {name.strip().lower(): i for i, name in enumerate(header)}
    missing = [name for name in REQUIRED_COLUMNS if name not in index]
    if missing:
        raise DataError(f"{path}, line 1 (header): missing required columns {missing}; "
                        f"found {header}")
    return _Columns(index=index, width=len(header))


def _example(row: list[str], header: _Columns, where: str, catalogue: Catalogue,
             titles: frozenset[str], info_path: Path) -> Example:
    if len(row) != header.width:
        raise DataError(f"{where}: expected {header.width} columns as in the header, "
                        f"got {len(row)}")
    columns = header.index
    history = _title_list(row[columns["history_item_title"]], where)
    ids = None
    if "history_item_id" in columns:
        ids = _literal_list(row[columns["history_item_id"]], where, "history_item_id", int,
                            "[12, 7]")
        if len(ids) != len(history):
            raise DataError(f"{where}: history_item_id has {len(ids)} ids but "
                            f"history_item_title has {len(history)} titles; the two lists "
                            "must describe the same items, one id per title")
    target = row[columns["item_title"]]
    if target not in titles:
        raise DataError(f"{where}: item_title {target!r} is not in the catalogue {info_path}; "
                        "add it there or drop the row")
    item = None
    if "item_id" in columns:
        item = _parse_int(row[columns["item_id"]], where, "item_id")
        if not 0 <= item < len(catalogue) or catalogue.titles[item] != target:
            known = catalogue.titles[item] if 0 <= item < len(catalogue) else "no item"
            raise DataError(f"{where}: item_id {item} is {known!r} in {info_path}, but "
                            f"item_title is {target!r}; make them agree")
    time = None
    if "timestamp" in columns:
        time = _parse_int(row[columns["timestamp"]], where, "timestamp")
    user = row[columns["user_id"]] if "user_id" in columns else ""
    return Example(user=user, history=tuple(history)[-MAX_HISTORY:], target=target,
                   target_item=item, target_time=time,
                   history_items=None if ids is None else tuple(ids)[-MAX_HISTORY:])


def _title_list(text: str, where: str) -> list[str]:
    """A ``history_item_title`` cell: a Python list literal of strings."""
    return _literal_list(text, where, "history_item_title", str, "['A', 'B']")


def _literal_list(text: str, where: str, column: str, kind: type, example: str) -> list:
    """A list-literal cell whose elements are all ``kind`` (ints for ids: not bools)."""
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        value = None
    if not isinstance(value, list) or not all(
            isinstance(v, kind) and not isinstance(v, bool) for v in value):
        shown = text if len(text) <= 80 else text[:77] + "..."
        noun = {str: "strings", int: "integers"}[kind]
        raise DataError(f"{where}: {column} must be a Python list literal of {noun} such "
                        f"as {example}, got {shown!r}")
    if kind is str and _MAYBE_JOINED.search(text):  # a cheap filter before tokenizing
        _refuse_joined_strings(text, where, column)
    return value


def _refuse_joined_strings(text: str, where: str, column: str) -> None:
    """``['a' 'b']`` parses as ``['ab']`` (Python joins adjacent strings): refuse it."""
    previous = None
    for token in tokenize.generate_tokens(io.StringIO(text).readline):
        if token.type in (tokenize.NL, tokenize.NEWLINE, tokenize.COMMENT):
            continue
        if token.type == tokenize.STRING and previous is not None \
                and previous.type == tokenize.STRING:
            raise DataError(f"{where}: {column} has two strings with no comma between them "
                            f"({previous.string} {token.string}), which Python would join "
                            "into one title; add the comma")
        previous = token


def _parse_int(text: str, where: str, what: str) -> int:
    """An integer cell; integral floats such as ``"1504656000.0"`` are accepted."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value.is_integer():
        raise DataError(f"{where}: expected an integer {what}, got {text!r}")
    return int(value)
