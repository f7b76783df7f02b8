"""``python -m fastlatent.data.amazon``: raw Amazon 2018 review + metadata files -> the CSV
layout, on small raw files written here (plain and gzipped, with malformed lines, missing
and HTML titles)."""

from __future__ import annotations

import ast
import csv
import datetime as dt
import gzip
import json

import pytest

from fastlatent.data.amazon import Review, clean_title, five_core, main, preprocess
from fastlatent.data.csv_layout import load_csv_dir


def ts(year, month_, day=15):
    return int(dt.datetime(year, month_, day, tzinfo=dt.timezone.utc).timestamp())


GOOD = [f"Album Number {i}" for i in range(30)]
BAD_META = [
    {"asin": "BAD1"},  # no title
    {"asin": "BAD2", "title": '<span class="a-size-medium">Junk</span>'},
    {"asin": "BAD3", "title": " x "},
    {"asin": "BAD4", "title": " ".join(["word"] * 21)},
]


def write_raw(folder, *, gz=False, recent_users=12, older_users=12):
    """30 good items; users in 2018 reviewing items 0-14, users in 2017-05..08 reviewing
    items 15-29 (so the default window holds 15 items and moving back 3 months twice
    reaches the rest); every user also reviews the bad items (dropped with them)."""
    meta = [{"asin": f"A{i:03d}", "title": t} for i, t in enumerate(GOOD)] + BAD_META
    meta[3]["title"] = "&quot;Kind of Blue&quot; &amp; More"
    reviews = []
    for u in range(recent_users + older_users):
        recent = u < recent_users
        base = 0 if recent else 15  # 8 consecutive items of 15, cyclic: 6-7 reviews each
        for j, i in enumerate(base + (u * 8 + k) % 15 for k in range(8)):
            when = ts(2018, 1 + j) if recent else ts(2017, 5 + j % 4, 1 + j)
            reviews.append({"reviewerID": f"U{u:02d}", "asin": f"A{i:03d}",
                            "unixReviewTime": when, "overall": float(1 + (u + j) % 5)})
        reviews.append({"reviewerID": f"U{u:02d}", "asin": "BAD2",
                        "unixReviewTime": ts(2018, 3), "overall": 5.0})
    reviews.append({"reviewerID": "U00", "asin": reviews[0]["asin"],  # a repeat, later
                    "unixReviewTime": reviews[0]["unixReviewTime"] + 99, "overall": 1.0})
    lines_r = [json.dumps(r) for r in reviews] + ["{not json", '["a list"]',
                                                  json.dumps({"asin": "A001"})]
    lines_m = [json.dumps(m) for m in meta] + ["garbage line"]
    opener, suffix = (gzip.open, ".json.gz") if gz else (open, ".json")
    paths = folder / f"Toys_5{suffix}", folder / f"meta_Toys{suffix}"
    for path, lines in zip(paths, (lines_r, lines_m), strict=True):
        with opener(path, "wt", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
    return paths


def read_split(out, name, split):
    with open(out / split / f"{name}.csv", encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture
def made(tmp_path):
    reviews, meta = write_raw(tmp_path)
    out = tmp_path / "out"
    return out, preprocess(reviews, meta, out, min_items=25, seed=3)


def test_titles_are_cleaned_as_specified():
    assert clean_title('  "Abbey Road"  ') == "Abbey Road"
    assert clean_title("&quot;Kind of Blue&quot; &amp; More") == "Kind of Blue\" & More"
    assert clean_title(None) is None and clean_title("x") is None and clean_title(' "" ') is None
    assert clean_title("<b>Bold</b>") is None and clean_title("a < b > c") == "a < b > c"
    assert clean_title(" ".join(["w"] * 20)) is not None
    assert clean_title(" ".join(["w"] * 21)) is None


def test_five_core_repeats_until_stable():
    """"weak" has 4 reviews, one of them of X, which has exactly 5; v0-v3 have 5 each, one
    of them of X. Pass 1 drops weak, pass 2 then X, pass 3 then v0-v3: only the 5x5 block
    of u* and i* is stable (one pass would keep X and v0-v3)."""
    reviews = []

    def add(user, item):
        reviews.append(Review(user, item, len(reviews), 5.0, len(reviews)))

    for u in range(5):
        for i in range(5):
            add(f"u{u}", f"i{i}")
    for item in ("X", "j0", "j1", "j2"):
        add("weak", item)
    for v in range(4):
        for item in ("X", "i0", "i1", "i2", "i3"):
            add(f"v{v}", item)
    kept = five_core(reviews)
    assert {r.user for r in kept} == {f"u{u}" for u in range(5)}
    assert {r.asin for r in kept} == {f"i{i}" for i in range(5)}


def test_the_layout_reads_back_and_follows_the_rules(made):
    out, summary = made
    name = summary["name"]
    assert name == f"Toys_5_{summary['start']}-2018-11"
    data = load_csv_dir(out)
    assert data.splits and set(data.splits) == {"train", "valid", "test"}
    info = (out / "info" / f"{name}.txt").read_text().splitlines()
    ids = [int(line.split("\t")[1]) for line in info]
    assert ids == list(range(len(ids))) == list(range(summary["items"]))
    titles = {line.split("\t")[0] for line in info}
    assert 'Kind of Blue" & More' in titles and not any("<" in t for t in titles)
    rows = [row for split in ("train", "valid", "test") for row in read_split(out, name, split)]
    n = len(rows)
    assert summary["samples"] == {"train": int(0.8 * n), "valid": int(0.1 * n),
                                  "test": n - int(0.8 * n) - int(0.1 * n)}
    times = [int(r["timestamp"]) for r in rows]
    assert times == sorted(times)  # sorted by target time across the splits
    by_user = {}
    for r in rows:
        hist = ast.literal_eval(r["history_item_id"])
        assert 1 <= len(hist) <= 10
        assert len(ast.literal_eval(r["history_item_title"])) == len(hist)
        by_user.setdefault(r["user_id"], []).append((int(r["timestamp"]), hist,
                                                     int(r["item_id"])))
    for seq in by_user.values():  # each history = that user's previous items in time order
        seq.sort(key=lambda s: s[0])
        items = seq[0][1] + [target for _, _, target in seq]  # first item, then the targets
        assert len(seq[0][1]) == 1
        for k, (_, hist, target) in enumerate(seq):
            assert hist == items[:k + 1][-10:] and target == items[k + 1]
    assert "BAD2" not in (out / "train" / f"{name}.csv").read_text()


def test_the_start_moves_back_until_enough_items(made, tmp_path):
    _, summary = made
    # 2018 users hold 15 items; the 2017-05..08 users the other 15: from 2017-10 back
    # 3 months at a time, 2017-04 is the first start that reaches 25 items.
    assert summary["requested_start"] == "2017-10" and summary["start"] == "2017-04"
    assert summary["items"] == 30 and summary["notes"] == []
    reviews, meta = tmp_path / "Toys_5.json", tmp_path / "meta_Toys.json"
    enough = preprocess(reviews, meta, tmp_path / "few", min_items=10)
    assert enough["start"] == "2017-10" and enough["items"] == 15


def test_stops_at_the_first_review_with_a_note(tmp_path):
    reviews, meta = write_raw(tmp_path)
    summary = preprocess(reviews, meta, tmp_path / "out", min_items=1000)
    assert summary["items"] == 30
    assert "before the first review" in summary["notes"][0]


def test_malformed_lines_and_dropped_items_are_counted(made):
    _, summary = made
    counts = summary["counts"]
    assert counts["reviews_malformed_lines"] == 3  # bad JSON, a list, no reviewer/time
    assert counts["meta_malformed_lines"] == 1
    assert counts["items_dropped_for_title"] == 4
    assert counts["reviews_of_dropped_items"] == 24
    assert counts["repeated_reviews_dropped"] == 1


def test_gzipped_files_give_the_same_output(tmp_path):
    plain_dir, gz_dir = tmp_path / "plain", tmp_path / "gz"
    plain_dir.mkdir(), gz_dir.mkdir()
    a = preprocess(*write_raw(plain_dir), plain_dir / "out", min_items=25)
    b = preprocess(*write_raw(gz_dir, gz=True), gz_dir / "out", min_items=25)
    assert a == b
    for split in ("train", "valid", "test"):
        assert read_split(plain_dir / "out", a["name"], split) == \
            read_split(gz_dir / "out", b["name"], split)


def test_item_ids_follow_the_seed(tmp_path):
    reviews, meta = write_raw(tmp_path)

    def info(seed, where):
        s = preprocess(reviews, meta, tmp_path / where, min_items=25, seed=seed)
        return (tmp_path / where / "info" / f"{s['name']}.txt").read_text()

    assert info(1, "a") == info(1, "b") != info(2, "c")


def test_cli(tmp_path, capsys):
    reviews, meta = write_raw(tmp_path, gz=True)
    out = tmp_path / "out"
    assert main(["--reviews", str(reviews), "--meta", str(meta), "--out", str(out),
                 "--min-items", "25"]) == 0
    assert f"use --data csv:{out}" in capsys.readouterr().out
    assert main(["--reviews", str(reviews), "--meta", str(meta), "--out", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["--reviews", str(tmp_path / "none.json"), "--meta", str(meta), "--out",
                 str(tmp_path / "o2")]) == 1
    assert "cannot be read" in capsys.readouterr().err
    assert main(["--reviews", str(reviews), "--meta", str(meta), "--out",
                 str(tmp_path / "o3"), "--start", "2017/10"]) == 1
    assert "YYYY-MM" in capsys.readouterr().err


def test_bytes_that_are_not_utf8_are_refused_or_counted(tmp_path, capsys):
    reviews, meta = write_raw(tmp_path)
    text = meta.read_bytes()
    assert text.count(b'"Album Number 5"') == 1
    meta.write_bytes(text.replace(b'"Album Number 5"', b'"Album Nu\xfcmber 5"') + b"\xe9\n")
    assert main(["--reviews", str(reviews), "--meta", str(meta), "--out", str(tmp_path / "a"),
                 "--min-items", "25"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: --meta {meta}: line 6 is not UTF-8 (byte 0xfc at byte ")
    assert "--encoding-errors replace" in err
    assert main(["--reviews", str(reviews), "--meta", str(meta), "--out", str(tmp_path / "b"),
                 "--min-items", "25", "--encoding-errors", "replace"]) == 0
    summary = json.loads((tmp_path / "b" / "preprocess.json").read_text())
    assert summary["encoding_errors"] == "replace"
    assert summary["counts"]["meta_undecodable_bytes"] == 2
    assert summary["counts"]["meta_lines_with_undecodable_bytes"] == 2
