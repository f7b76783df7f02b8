"""Raw Amazon review 2018 files -> the CSV layout (LATENTR3.md "Data", paper App. A).

    python -m fastlatent.data.amazon --reviews CDs_and_Vinyl_5.json.gz \\
        --meta meta_CDs_and_Vinyl.json.gz --out data/cds

Inputs are the category's review file and metadata file from the Amazon review data
(2018), one JSON object per line, plain or gzipped. Reviews need ``reviewerID``, ``asin``,
``unixReviewTime`` (``overall`` is the rating); metadata needs ``asin`` and ``title``.

What is done, in order:
1. Titles: ``&quot;`` and ``&amp;`` unescaped, then surrounding quotes and spaces stripped.
   An item is dropped when its title is missing, is an HTML fragment (holds a tag such as
   ``<span ...>``), has at most 1 character or more than 20 words.
2. Reviews of dropped or unknown items are dropped; a user's repeated review of the same
   item keeps the earliest. Lines that are not JSON objects with those fields are skipped
   and counted (reported on screen and in ``DIR/preprocess.json``).
3. Window ``[start, end)`` (default 2017-10 to 2018-11, i.e. before 2018-11-01): the
   reviews in it are 5-core filtered (users and items with >= 5 reviews) until nothing
   changes; while fewer than ``--min-items`` items remain, the start moves back 3 months
   and the window is redone, stopping once the start is before the first review (the data
   then has no more to give, and the result is kept with a note).
4. Item ids 0..N-1 from a seeded shuffle of the remaining items.
5. Each user's reviews sorted by time (ties by the reviews' order in the file); every
   position i >= 1 is a sample whose history is the previous <= 10 items.
6. All samples sorted by target time (stable), split 80/10/10 into train/valid/test
   (``int(0.8 n)``, ``int(0.1 n)``, the rest).

Writes ``OUT/{train,valid,test}/NAME.csv``, ``OUT/info/NAME.txt`` (``title<TAB>id``) with
NAME = ``<reviews file stem>_<start>-<end>`` (e.g. ``CDs_and_Vinyl_5_2015-10-2018-11``, the
paper's CDs name), and ``OUT/preprocess.json`` (the settings, counts and notes), which
``--data csv:OUT`` reads.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import gzip
import json
import random
import re
import sys
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from fastlatent.errors import DataError, UserError

COLUMNS = ("user_id", "item_asins", "item_asin", "history_item_id", "item_id",
           "history_item_title", "item_title", "history_rating", "rating",
           "history_timestamp", "timestamp")
HTML_TAG = re.compile(r"</?[a-zA-Z][a-zA-Z0-9]*(\s[^<>]*)?/?>")  # <b>, </span>, <br/>
MAX_HISTORY, MAX_TITLE_WORDS, CORE = 10, 20, 5


def clean_title(raw) -> str | None:
    """The title as the CSV holds it, or None when the item is to be dropped."""
    if not isinstance(raw, str) or HTML_TAG.search(raw):
        return None
    title = raw.replace("&quot;", '"').replace("&amp;", "&").strip().strip('"').strip()
    if len(title) <= 1 or len(title.split()) > MAX_TITLE_WORDS:
        return None
    return title


@dataclass
class Report:
    """Counts of what was read and dropped, and notes, for preprocess.json."""

    counts: Counter = field(default_factory=Counter)
    notes: list[str] = field(default_factory=list)


ENCODING_ERRORS = ("strict", "replace")


def decode_counting(raw: bytes) -> tuple[str, int, int]:
    """``raw`` decoded as UTF-8 with each undecodable run of bytes replaced by U+FFFD, the
    number of bytes replaced, and the position of the first (-1 when none)."""
    parts, bad, pos, first = [], 0, 0, -1
    while True:
        try:
            parts.append(raw[pos:].decode("utf-8"))
            return "".join(parts), bad, first
        except UnicodeDecodeError as err:
            first = pos + err.start if first < 0 else first
            parts.append(raw[pos:pos + err.start].decode("utf-8"))
            parts.append("\ufffd")
            bad += err.end - err.start
            pos += err.end


def json_lines(path: Path, what: str, report: Report, encoding_errors: str = "strict"
               ) -> Iterator[dict]:
    """The JSON objects of a (gzipped) JSON-lines file; malformed lines are counted. A line
    that is not UTF-8 is an error naming the line and byte (``encoding_errors="strict"``)
    or is read with U+FFFD for its bad bytes, which are counted (``"replace"``)."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            for number, raw in enumerate(f, start=1):
                line, bad, first = decode_counting(raw)
                if bad and encoding_errors == "strict":
                    raise DataError(
                        f"--{what} {path}: line {number} is not UTF-8 (byte "
                        f"0x{raw[first]:02x} at byte {first + 1}); fix the file, or pass "
                        "--encoding-errors replace to read such bytes as U+FFFD (counted in "
                        "preprocess.json)")
                if bad:
                    report.counts[f"{what}_undecodable_bytes"] += bad
                    report.counts[f"{what}_lines_with_undecodable_bytes"] += 1
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError:
                    report.counts[f"{what}_malformed_lines"] += 1
                    continue
                if not isinstance(row, dict):
                    report.counts[f"{what}_malformed_lines"] += 1
                    continue
                yield row
    except (OSError, EOFError) as err:
        raise DataError(f"--{what} {path}: cannot be read ({err})") from None


def read_titles(meta: Path, report: Report, encoding_errors: str = "strict"
                ) -> dict[str, str]:
    titles: dict[str, str] = {}
    for row in json_lines(meta, "meta", report, encoding_errors):
        asin = row.get("asin")
        if not isinstance(asin, str):
            report.counts["meta_malformed_lines"] += 1
            continue
        title = clean_title(row.get("title"))
        if title is None:
            report.counts["items_dropped_for_title"] += 1
        elif asin not in titles:
            titles[asin] = title
    return titles


@dataclass(frozen=True)
class Review:
    user: str
    asin: str
    time: int
    rating: float
    order: int  # position in the file (ties in time keep it)


def read_reviews(path: Path, titles: dict[str, str], report: Report,
                 encoding_errors: str = "strict") -> list[Review]:
    first: dict[tuple[str, str], Review] = {}
    for order, row in enumerate(json_lines(path, "reviews", report, encoding_errors)):
        user, asin, time = row.get("reviewerID"), row.get("asin"), row.get("unixReviewTime")
        if not (isinstance(user, str) and isinstance(asin, str) and isinstance(time, int)):
            report.counts["reviews_malformed_lines"] += 1
            continue
        if asin not in titles:
            report.counts["reviews_of_dropped_items"] += 1
            continue
        rating = row.get("overall")
        review = Review(user, asin, time, float(rating) if isinstance(rating, (int, float))
                        else 0.0, order)
        key = (user, asin)
        if key in first:
            report.counts["repeated_reviews_dropped"] += 1
            if (time, order) >= (first[key].time, first[key].order):
                continue
        first[key] = review
    return sorted(first.values(), key=lambda r: r.order)


def month(text: str) -> _dt.datetime:
    try:
        return _dt.datetime.strptime(text, "%Y-%m").replace(tzinfo=_dt.timezone.utc)
    except ValueError:
        raise UserError(f"expected a month as YYYY-MM, got {text!r}") from None


def months_back(start: _dt.datetime, n: int) -> _dt.datetime:
    index = start.year * 12 + start.month - 1 - n
    return start.replace(year=index // 12, month=index % 12 + 1)


def five_core(reviews: list[Review]) -> list[Review]:
    """Drop users and items with fewer than 5 reviews until nothing changes."""
    while True:
        users = Counter(r.user for r in reviews)
        items = Counter(r.asin for r in reviews)
        kept = [r for r in reviews if users[r.user] >= CORE and items[r.asin] >= CORE]
        if len(kept) == len(reviews):
            return kept
        reviews = kept


def windowed(reviews: list[Review], start: _dt.datetime, end: _dt.datetime,
             min_items: int, report: Report) -> tuple[list[Review], _dt.datetime]:
    """The 5-core reviews of [start, end), the start moved back 3 months at a time while
    fewer than ``min_items`` items remain and the start is not before the first review."""
    if not reviews:
        raise DataError("no review of an item with a usable title; check --reviews/--meta "
                        "(they must be the same category)")
    first = min(r.time for r in reviews)
    while True:
        lo, hi = start.timestamp(), end.timestamp()
        kept = five_core([r for r in reviews if lo <= r.time < hi])
        items = len({r.asin for r in kept})
        if items >= min_items:
            return kept, start
        if start.timestamp() <= first:
            report.notes.append(f"{items} items after 5-core filtering from "
                                f"{start:%Y-%m}, fewer than --min-items {min_items}, and the "
                                f"start is already before the first review; kept")
            if not kept:
                raise DataError(f"no user and item have {CORE} reviews each in "
                                f"[{start:%Y-%m}, {end:%Y-%m}); nothing to write")
            return kept, start
        start = months_back(start, 3)


def samples(reviews: list[Review], ids: dict[str, int], titles: dict[str, str]
            ) -> list[dict]:
    by_user: dict[str, list[Review]] = defaultdict(list)
    for r in reviews:
        by_user[r.user].append(r)
    rows = []
    for user, seq in by_user.items():
        seq.sort(key=lambda r: (r.time, r.order))
        for i in range(1, len(seq)):
            hist, target = seq[max(0, i - MAX_HISTORY):i], seq[i]
            rows.append({
                "user_id": user, "item_asins": [h.asin for h in hist],
                "item_asin": target.asin, "history_item_id": [ids[h.asin] for h in hist],
                "item_id": ids[target.asin],
                "history_item_title": [titles[h.asin] for h in hist],
                "item_title": titles[target.asin],
                "history_rating": [h.rating for h in hist], "rating": target.rating,
                "history_timestamp": [h.time for h in hist], "timestamp": target.time,
                "_order": (target.time, target.order)})
    rows.sort(key=lambda row: row["_order"])
    return rows


def write_layout(out: Path, name: str, rows: list[dict], ids: dict[str, int],
                 titles: dict[str, str]) -> dict[str, int]:
    n = len(rows)
    n_train, n_valid = int(0.8 * n), int(0.1 * n)
    parts = {"train": rows[:n_train], "valid": rows[n_train:n_train + n_valid],
             "test": rows[n_train + n_valid:]}
    for split, part in parts.items():
        folder = out / split
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / f"{name}.csv", "w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(COLUMNS)
            for row in part:
                writer.writerow([repr(row[c]) if isinstance(row[c], list) else row[c]
                                 for c in COLUMNS])
    (out / "info").mkdir(parents=True, exist_ok=True)
    by_id = sorted(ids.items(), key=lambda kv: kv[1])
    (out / "info" / f"{name}.txt").write_text(
        "".join(f"{titles[asin]}\t{i}\n" for asin, i in by_id), encoding="utf-8")
    return {split: len(part) for split, part in parts.items()}


def preprocess(reviews: Path, meta: Path, out: Path, *, start: str = "2017-10",
               end: str = "2018-11", min_items: int = 5000, seed: int = 42,
               name: str | None = None, encoding_errors: str = "strict") -> dict:
    """Run steps 1-6 of the module docstring; returns what preprocess.json holds."""
    if encoding_errors not in ENCODING_ERRORS:
        raise ValueError(f"expected encoding_errors in {ENCODING_ERRORS}, got "
                         f"{encoding_errors!r}")
    report = Report()
    titles = read_titles(Path(meta), report, encoding_errors)
    kept, first_month = windowed(read_reviews(Path(reviews), titles, report, encoding_errors),
                                 month(start), month(end), min_items, report)
    items = sorted({r.asin for r in kept})
    random.Random(seed).shuffle(items)
    ids = {asin: i for i, asin in enumerate(items)}
    stem = Path(reviews).name.removesuffix(".gz").removesuffix(".json")
    name = name or f"{stem}_{first_month:%Y-%m}-{month(end):%Y-%m}"
    rows = samples(kept, ids, titles)
    sizes = write_layout(Path(out), name, rows, ids, titles)
    summary = {"name": name, "start": f"{first_month:%Y-%m}", "end": f"{month(end):%Y-%m}",
               "requested_start": start, "min_items": min_items, "seed": seed,
               "encoding_errors": encoding_errors,
               "items": len(ids), "users": len({r.user for r in kept}),
               "reviews": len(kept), "samples": sizes, "counts": dict(report.counts),
               "notes": report.notes}
    (Path(out) / "preprocess.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastlatent.data.amazon",
                                description=__doc__.splitlines()[0])
    p.add_argument("--reviews", required=True, help="the category's reviews (.json[.gz])")
    p.add_argument("--meta", required=True, help="the category's metadata (.json[.gz])")
    p.add_argument("--out", required=True, help="output folder (CSV layout)")
    p.add_argument("--start", default="2017-10", help="window start YYYY-MM (default 2017-10)")
    p.add_argument("--end", default="2018-11", help="window end YYYY-MM, exclusive "
                   "(default 2018-11)")
    p.add_argument("--min-items", type=int, default=5000,
                   help="move the start back 3 months while fewer items remain (5000)")
    p.add_argument("--seed", type=int, default=42, help="seed of the item-id shuffle")
    p.add_argument("--name", default=None, help="NAME of the files (default from --reviews)")
    p.add_argument("--encoding-errors", choices=ENCODING_ERRORS, default="strict",
                   help="a line that is not UTF-8: strict (an error naming it) | replace "
                   "(its bad bytes read as U+FFFD and counted in preprocess.json) "
                   "(default strict, as the CSV reader)")
    args = p.parse_args(argv)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        print(f"error: {out} is not empty; choose a new --out", file=sys.stderr)
        return 2
    try:
        summary = preprocess(Path(args.reviews), Path(args.meta), out, start=args.start,
                             end=args.end, min_items=args.min_items, seed=args.seed,
                             name=args.name, encoding_errors=args.encoding_errors)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    for note in summary["notes"]:
        print(f"note: {note}")
    skipped = {k: v for k, v in summary["counts"].items() if v}
    print(f"{summary['name']}: {summary['items']} items, {summary['users']} users, samples "
          f"{summary['samples']}; window {summary['start']}..{summary['end']}; dropped/"
          f"skipped {skipped}; wrote {out} (use --data csv:{out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
