"""Data sources: the sequential pipeline, MovieLens files, the CSV layout, synthetic data,
and the helpers in sources.py."""

from __future__ import annotations

import collections
import csv
from pathlib import Path

import pytest

from fastlatent.data.csv_layout import DataError, domain_for, load_csv_dir
from fastlatent.data.example import Example
from fastlatent.data.movielens import (
    Interaction,
    build_sequential_splits,
    load_movielens_100k,
    movielens_from_files,
    sequential_samples,
    temporal_split,
)
from fastlatent.data.sources import holdout_slice, item_frequencies, load_dataset
from fastlatent.data.synthetic import make_synthetic

AMAZON_CDS = Path(__file__).resolve().parents[3] / "shared" / "data" / "amazon-cds"
TITLES = ["A", "B", "C", "D", "E", "F"]


# ---------------------------------------------------------------- sequential pipeline


def test_sequential_samples_order_ties_and_history():
    events = [
        Interaction("u1", 2, 30), Interaction("u2", 0, 5), Interaction("u1", 0, 10),
        Interaction("u1", 1, 10),  # same time as item 0: file order decides
        Interaction("u2", 3, 30), Interaction("u1", 4, 40),
    ]
    samples = sequential_samples(events, TITLES)
    assert samples == [
        Example("u1", ("A",), "B", 1, 10, (0,)),
        Example("u1", ("A", "B"), "C", 2, 30, (0, 1)),
        Example("u2", ("A",), "D", 3, 30, (0,)),  # tie at t=30: u1 came first in the input
        Example("u1", ("A", "B", "C"), "E", 4, 40, (0, 1, 2)),
    ]


def test_history_keeps_the_last_items():
    events = [Interaction("u", i % 6, t) for t, i in enumerate(range(13))]
    samples = sequential_samples(events, TITLES)
    assert len(samples) == 12
    assert samples[-1].history == tuple(TITLES[i % 6] for i in range(2, 12))
    assert samples[3].history == ("A", "B", "C", "D")
    assert sequential_samples(events, TITLES, max_history=2)[-1].history == ("E", "F")


def test_unknown_item_id_is_rejected():
    with pytest.raises(ValueError, match=r"item ids in \[0, 6\), got 6"):
        sequential_samples([Interaction("u", 6, 0)], TITLES)


@pytest.mark.parametrize("n, sizes", [(10, (8, 1, 1)), (9, (7, 1, 1)), (7, (5, 1, 1)),
                                      (99057, (79245, 9906, 9906))])
def test_temporal_split_boundaries(n, sizes):
    samples = [Example("u", ("A",), "B", 1, t) for t in range(n)]
    splits = temporal_split(samples)
    assert tuple(len(splits[s]) for s in ("train", "valid", "test")) == sizes
    assert splits["train"] + splits["valid"] + splits["test"] == samples


def test_build_sequential_splits_makes_a_dataset():
    events = [Interaction(f"u{u}", (u + k) % 6, 10 * k + u) for u in range(3) for k in range(5)]
    ds = build_sequential_splits(events, TITLES, name="toy", domain="things")
    assert (ds.name, ds.domain, ds.catalogue.titles) == ("toy", "things", tuple(TITLES))
    assert [len(ds.split(s)) for s in ("train", "valid", "test")] == [9, 1, 2]
    times = [ex.target_time for s in ("train", "valid", "test") for ex in ds.split(s)]
    assert times == sorted(times)


# ---------------------------------------------------------------- MovieLens files


def write_movielens(folder: Path) -> tuple[Path, Path]:
    item = folder / "ml.item"
    item.write_text(
        "release_year:token\titem_id:token\tmovie_title:token_seq\tclass:token_seq\n"
        "1995\t1\tToy Story\tAnimation\n"
        "1997\t7\tChasing Amy\tDrama\n"
        "\t3\tunknown\t\n"
        "1997\t9\tChasing Amy\tComedy\n", encoding="utf-8")
    inter = folder / "ml.inter"
    inter.write_text(
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
        "10\t1\t3\t500\n20\t9\t4\t100\n10\t7\t5\t400\n10\t3\t1\t400\n20\t1\t2\t200\n",
        encoding="utf-8")
    return inter, item


def test_movielens_from_files_parses_by_header_names(tmp_path):
    ds = movielens_from_files(*write_movielens(tmp_path))
    assert ds.name == "movielens-100k" and ds.domain == "movies"
    assert ds.catalogue.titles == ("Toy Story (1995)", "Chasing Amy (1997)", "unknown",
                                   "Chasing Amy (1997)")
    samples = [ex for s in ("train", "valid", "test") for ex in ds.split(s)]
    assert samples == [
        Example("20", ("Chasing Amy (1997)",), "Toy Story (1995)", 0, 200, (3,)),
        Example("10", ("Chasing Amy (1997)",), "unknown", 2, 400, (1,)),
        Example("10", ("Chasing Amy (1997)", "unknown"), "Toy Story (1995)", 0, 500, (1, 2)),
    ]
    assert samples[0].history == ("Chasing Amy (1997)",)  # item 9 -> id 3, same title as id 1


@pytest.mark.parametrize("inter_text, message", [
    ("user_id:token\titem_id:token\n1\t1\n", r"line 1: header lacks fields \['timestamp'\]"),
    ("user_id:token\titem_id:token\ttimestamp:float\n1\t1\t5\n2\t1\n",
     "line 3: expected 3 tab-separated fields, got 2"),
    ("user_id:token\titem_id:token\ttimestamp:float\n1\t1\t5\n1\t42\t6\n",
     "line 3: item_id '42' is not in the .item file"),
    ("user_id:token\titem_id:token\ttimestamp:float\n1\t1\tlate\n",
     "line 2: expected a numeric timestamp, got 'late'"),
])
def test_movielens_bad_files(tmp_path, inter_text, message):
    _, item = write_movielens(tmp_path)
    inter = tmp_path / "bad.inter"
    inter.write_text(inter_text, encoding="utf-8")
    with pytest.raises(DataError, match=message) as err:
        movielens_from_files(inter, item)
    assert "bad.inter" in str(err.value)


def test_movielens_repeated_item_id(tmp_path):
    inter, item = write_movielens(tmp_path)
    item.write_text("item_id:token\tmovie_title:token_seq\trelease_year:token\n"
                    "1\tA\t1990\n1\tB\t1991\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"ml.item, line 3: item_id '1' is repeated"):
        movielens_from_files(inter, item)


@pytest.mark.slow
def test_real_movielens_100k():
    ds = load_movielens_100k()
    titles = ds.catalogue.titles
    assert len(titles) == 1682 and titles[0] == "Toy Story (1995)"
    repeated = [t for t, n in collections.Counter(titles).items() if n > 1]
    assert len(repeated) == 18 and "Chasing Amy (1997)" in repeated
    sizes = [len(ds.split(s)) for s in ("train", "valid", "test")]
    assert sizes == [79245, 9906, 9906]  # 100000 ratings - 943 first interactions
    samples = [ex for s in ("train", "valid", "test") for ex in ds.split(s)]
    assert len({ex.user for ex in samples}) == 943
    times = [ex.target_time for ex in samples]
    assert times == sorted(times)
    assert all(1 <= len(ex.history) <= 10 for ex in samples)
    assert all(titles[ex.target_item] == ex.target for ex in samples)


# ---------------------------------------------------------------- CSV layout

HEADER = ["user_id", "item_asins", "item_asin", "history_item_id", "item_id",
          "history_item_title", "item_title", "history_rating", "rating",
          "history_timestamp", "timestamp"]
NAME = "CDs_and_Vinyl_5_test"
INFO = ["Greatest Hits", "Kansas", "Monolith", "Greatest Hits", 'Don\'t "Stop"']


def row(user, hist_ids, item, time):
    return [user, "[]", "X", str(hist_ids), str(item), str([INFO[i] for i in hist_ids]),
            INFO[item], "[]", "5.0", "[]", str(time)]


GOOD_ROWS = {
    "valid": [row("u1", [1], 2, 100), row("u2", [0, 1, 2], 4, 101)],
    "test": [row("u1", [1, 2], 3, 200)],
}


def write_csv_dir(root: Path, splits=None, info=None, header=HEADER, name=NAME) -> Path:
    splits = GOOD_ROWS if splits is None else splits
    for split, rows in splits.items():
        (root / split).mkdir(parents=True, exist_ok=True)
        with open(root / split / f"{name}.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            writer.writerows(rows)
    (root / "info").mkdir(parents=True, exist_ok=True)
    lines = info if info is not None else [f"{t}\t{i}" for i, t in enumerate(INFO)]
    (root / "info" / f"{name}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def test_load_csv_dir(tmp_path):
    ds = load_csv_dir(write_csv_dir(tmp_path / "cds"))
    assert (ds.name, ds.domain) == ("csv:cds", "music")
    assert ds.catalogue.titles == tuple(INFO)
    assert sorted(ds.splits) == ["test", "valid"]
    assert ds.split("valid") == [
        Example("u1", ("Kansas",), "Monolith", 2, 100, (1,)),
        Example("u2", ("Greatest Hits", "Kansas", "Monolith"), 'Don\'t "Stop"', 4, 101,
                (0, 1, 2)),
    ]
    assert ds.split("test") == [Example("u1", ("Kansas", "Monolith"), "Greatest Hits", 3, 200,
                                        (1, 2))]


def test_load_csv_dir_picks_splits(tmp_path):
    root = write_csv_dir(tmp_path / "cds")
    assert sorted(load_csv_dir(root, splits=["test"]).splits) == ["test"]
    with pytest.raises(DataError, match=r"requested splits \['train'\] have no folder"):
        load_csv_dir(root, splits=["train", "test"])
    with pytest.raises(ValueError, match="expected splits among"):
        load_csv_dir(root, splits=["dev"])


def test_minimal_columns_any_case_and_long_history(tmp_path):
    long_history = [INFO[i % 5] for i in range(12)]
    rows = {"train": [[str(long_history), "Monolith"]]}
    root = write_csv_dir(tmp_path / "d", rows, header=["History_Item_Title", "ITEM_TITLE"],
                         name="Toys_and_Games")
    ds = load_csv_dir(root)
    assert ds.domain == "products"
    assert ds.split("train") == [Example("", tuple(long_history[-10:]), "Monolith", None, None)]


def test_bom_and_integral_float_timestamp(tmp_path):
    root = write_csv_dir(tmp_path / "d", {"test": [row("u1", [1], 2, "1504656000.0")]})
    path = root / "test" / f"{NAME}.csv"
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    assert load_csv_dir(root).split("test")[0].target_time == 1504656000


@pytest.mark.parametrize("name, domain", [
    ("CDs_and_Vinyl_5", "music"), ("Digital_music", "music"), ("Movies_and_TV", "movies"),
    ("Toys_and_Games", "products"), ("Video_Games", "products"),
])
def test_domain_for(name, domain):
    assert domain_for(name) == domain


def bad_row(column: str, value: str) -> list[str]:
    cells = row("u9", [1], 2, 300)
    cells[HEADER.index(column)] = value
    return cells


@pytest.mark.parametrize("cells, message", [
    (row("u9", [1], 2, 300)[:-1], "expected 11 columns as in the header, got 10"),
    (bad_row("history_item_title", "['Kansas', "), "must be a Python list literal of strings"),
    (bad_row("history_item_title", "[1, 2]"), "must be a Python list literal of strings"),
    (bad_row("history_item_title", "'Kansas'"), "must be a Python list literal of strings"),
    (bad_row("history_item_title", "__import__('os')"), "must be a Python list literal"),
    (bad_row("item_title", "Nowhere Man"), "item_title 'Nowhere Man' is not in the catalogue"),
    (bad_row("item_id", "0"), "item_id 0 is 'Greatest Hits' in .*but item_title is 'Monolith'"),
    (bad_row("item_id", "99"), "item_id 99 is 'no item'"),
    (bad_row("item_id", "two"), "expected an integer item_id, got 'two'"),
    (bad_row("timestamp", "noon"), "expected an integer timestamp, got 'noon'"),
    (bad_row("history_item_title", "['Kansas' 'Monolith']"),
     r"two strings with no comma between them \('Kansas' 'Monolith'\).*add the comma"),
    (bad_row("history_item_title", "['Kansas', 'Monolith'  \"Kansas\"]"),
     "two strings with no comma"),
    (bad_row("history_item_id", "[1, 2]"),
     "history_item_id has 2 ids but history_item_title has 1 titles"),
    (bad_row("history_item_id", "['1']"), "history_item_id must be a Python list literal "
                                          "of integers"),
    (bad_row("history_item_id", "[True]"), "must be a Python list literal of integers"),
])
def test_bad_row_names_file_and_row(tmp_path, cells, message):
    rows = {"valid": [row("u1", [1], 2, 100), row("u1", [2], 1, 101), cells]}
    root = write_csv_dir(tmp_path / "d", rows)
    with pytest.raises(DataError, match=message) as err:
        load_csv_dir(root)
    assert f"valid/{NAME}.csv, data row 3 (line 4)" in str(err.value)


def test_empty_strings_and_quotes_in_titles_are_not_joined_strings(tmp_path):
    titles = ["", "It's", 'Say "Hi"']
    rows = {"test": [[str(titles), "Kansas"]]}
    root = write_csv_dir(tmp_path / "d", rows, header=["history_item_title", "item_title"])
    assert load_csv_dir(root).split("test")[0].history == tuple(titles)


@pytest.mark.parametrize("where", ["csv", "info"])
def test_non_utf8_bytes_name_file_line_and_row(tmp_path, where):
    rows = {"valid": [row("u1", [1], 2, 100), row("u1", [2], 1, 101), row("u2", [0], 1, 102)]}
    root = write_csv_dir(tmp_path / "d", rows)
    path = root / "valid" / f"{NAME}.csv" if where == "csv" else root / "info" / f"{NAME}.txt"
    lines = path.read_bytes().split(b"\n")
    lines[2] = "é".encode("latin-1") + lines[2]
    path.write_bytes(b"\n".join(lines))
    with pytest.raises(DataError, match="not UTF-8.*iconv") as err:
        load_csv_dir(root)
    expected = (f"valid/{NAME}.csv, data row 2 (line 3)" if where == "csv"
                else f"info/{NAME}.txt, line 3")
    assert expected in str(err.value)


def test_missing_required_column(tmp_path):
    header = [c if c != "item_title" else "title" for c in HEADER]
    root = write_csv_dir(tmp_path / "d", {"test": [row("u", [1], 2, 1)]}, header=header)
    with pytest.raises(DataError, match=r"line 1 \(header\): missing required columns "
                                        r"\['item_title'\]") as err:
        load_csv_dir(root)
    assert f"test/{NAME}.csv" in str(err.value)


def test_empty_split(tmp_path):
    root = write_csv_dir(tmp_path / "d", {"valid": GOOD_ROWS["valid"], "test": []})
    with pytest.raises(DataError, match=f"test/{NAME}.csv: no data rows"):
        load_csv_dir(root)


def test_headerless_empty_file(tmp_path):
    root = write_csv_dir(tmp_path / "d")
    (root / "test" / f"{NAME}.csv").write_text("", encoding="utf-8")
    with pytest.raises(DataError, match=f"test/{NAME}.csv: empty file"):
        load_csv_dir(root)


@pytest.mark.parametrize("info, message", [
    (["Greatest Hits\t0", "Kansas 1"], r"line 2: expected 'title<TAB>id', got 'Kansas 1'"),
    (["Greatest Hits\t0", "Kansas\tone"], "line 2: expected an integer item id, got 'one'"),
    (["Greatest Hits\t0", "Kansas\t0"], "line 2: expected a new item id >= 0, got 0"),
    (["Greatest Hits\t0", "Kansas\t2"], r"expected ids 0..1, missing \[1\]"),
    ([], "no items"),
])
def test_bad_info_file(tmp_path, info, message):
    root = write_csv_dir(tmp_path / "d", info=info)
    with pytest.raises(DataError, match=message) as err:
        load_csv_dir(root)
    assert f"info/{NAME}.txt" in str(err.value)


def test_missing_info_dir_and_file(tmp_path):
    root = write_csv_dir(tmp_path / "d")
    (root / "info" / f"{NAME}.txt").rename(root / "info" / "other.txt")
    with pytest.raises(DataError, match=f"missing {NAME}.txt .*found \\['other.txt'\\]"):
        load_csv_dir(root)
    (root / "info" / "other.txt").unlink()
    (root / "info").rmdir()
    with pytest.raises(DataError, match=f"missing the info folder; expected .*info/{NAME}.txt"):
        load_csv_dir(root)


def test_no_split_folders(tmp_path):
    (tmp_path / "d" / "info").mkdir(parents=True)
    with pytest.raises(DataError, match="no split folders; expected .*train/NAME.csv, "
                                        ".*valid/NAME.csv, .*test/NAME.csv"):
        load_csv_dir(tmp_path / "d")
    with pytest.raises(DataError, match="got no such directory"):
        load_csv_dir(tmp_path / "absent")


def test_split_folder_needs_exactly_one_csv(tmp_path):
    root = write_csv_dir(tmp_path / "d")
    (root / "test" / "extra.csv").write_text("x\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"test: expected exactly one .csv file, got \["):
        load_csv_dir(root)
    for file in (root / "test").iterdir():
        file.unlink()
    with pytest.raises(DataError, match="test: expected exactly one .csv file, got none"):
        load_csv_dir(root)


def test_split_csvs_must_share_a_name(tmp_path):
    root = write_csv_dir(tmp_path / "d")
    (root / "test" / f"{NAME}.csv").rename(root / "test" / "Other.csv")
    with pytest.raises(DataError, match="share one NAME"):
        load_csv_dir(root)


@pytest.mark.skipif(not AMAZON_CDS.is_dir(), reason="../shared/data/amazon-cds is absent")
def test_real_amazon_cds():
    ds = load_csv_dir(AMAZON_CDS)
    assert (ds.name, ds.domain) == ("csv:amazon-cds", "music")
    assert sorted(ds.splits) == ["test", "valid"]
    assert (len(ds.split("valid")), len(ds.split("test"))) == (6156, 6157)
    assert len(ds.catalogue) == 5841 and len(ds.catalogue.distinct_titles) == 5377
    assert collections.Counter(ds.catalogue.titles)["Greatest Hits"] == 54
    first = ds.split("valid")[0]
    assert first == Example("A3KWI8FRECW7QE", ("Freaks of Nature", "Kansas"),
                            "Point of Know Return", 1381, 1504656000, (5198, 3227))
    rows = ds.split("valid") + ds.split("test")
    assert all(1 <= len(ex.history) <= 10 for ex in rows)
    assert all(ds.catalogue.titles[ex.target_item] == ex.target for ex in rows)
    assert all(tuple(ds.catalogue.titles[i] for i in ex.history_items) == ex.history
               for ex in rows)
    times = [ex.target_time for ex in rows]
    assert times == sorted(times)


# ---------------------------------------------------------------- synthetic


def test_synthetic_is_deterministic_and_seeded():
    assert make_synthetic(seed=3) == make_synthetic(seed=3)
    assert make_synthetic(seed=3).splits != make_synthetic(seed=4).splits


def test_synthetic_shape():
    ds = make_synthetic(num_users=64, num_items=40)
    assert (ds.name, ds.domain, len(ds.catalogue)) == ("synthetic", "products", 40)
    assert len(ds.catalogue.distinct_titles) == 39
    assert ds.catalogue.titles[0] == ds.catalogue.titles[-1]
    samples = [ex for s in ("train", "valid", "test") for ex in ds.split(s)]
    n = len(samples)
    assert [len(ds.split(s)) for s in ("train", "valid", "test")] == [
        n * 8 // 10, n * 9 // 10 - n * 8 // 10, n - n * 9 // 10]
    assert 64 * 3 <= n <= 64 * 11
    times = [ex.target_time for ex in samples]
    assert times == sorted(times)
    assert len({ex.user for ex in samples}) == 64


def test_synthetic_numbered_titles_beyond_word_pairs():
    titles = make_synthetic(num_users=2, num_items=300).catalogue.titles
    assert any(t.endswith(" (2)") for t in titles)
    assert len(set(titles)) == 299


def test_synthetic_is_learnable():
    ds = make_synthetic(num_users=200)
    follows = collections.defaultdict(collections.Counter)
    for ex in ds.split("train"):
        follows[ex.history[-1]][ex.target] += 1
    test = ds.split("test")
    bigram = sum(follows[ex.history[-1]].most_common(1)[0][0] == ex.target
                 for ex in test if follows[ex.history[-1]])
    popular = collections.Counter(ex.target for ex in ds.split("train")).most_common(1)[0][0]
    assert bigram / len(test) > 0.6
    assert sum(ex.target == popular for ex in test) / len(test) < 0.15


@pytest.mark.parametrize("kwargs", [{"num_users": 0}, {"num_items": 1},
                                    {"min_len": 1}, {"min_len": 5, "max_len": 4}])
def test_synthetic_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError, match="expected"):
        make_synthetic(**kwargs)


# ---------------------------------------------------------------- sources


def test_load_dataset_dispatch(tmp_path, monkeypatch):
    assert load_dataset("synthetic", seed=5) == make_synthetic(seed=5)
    write_csv_dir(tmp_path / "cds")
    monkeypatch.chdir(tmp_path)
    assert load_dataset("csv:cds").split("test") == load_csv_dir(tmp_path / "cds").split("test")


@pytest.mark.parametrize("spec", ["movielens", "csv:", "CSV:x", ""])
def test_load_dataset_unknown_spec(spec):
    with pytest.raises(ValueError, match=r"\['movielens-100k', 'synthetic', 'csv:DIR'\]"):
        load_dataset(spec)


def examples(n: int) -> list[Example]:
    return [Example(f"u{i}", ("A",), TITLES[i % 6], i % 6, i) for i in range(n)]


def test_holdout_slice():
    data = examples(100)
    kept, held = holdout_slice(data, fraction=0.05, seed=1)
    assert (len(kept), len(held)) == (95, 5)
    assert sorted(kept + held, key=lambda ex: ex.target_time) == data
    assert kept == sorted(kept, key=lambda ex: ex.target_time)
    assert held == sorted(held, key=lambda ex: ex.target_time)
    assert holdout_slice(data, fraction=0.05, seed=1) == (kept, held)
    assert holdout_slice(data, fraction=0.05, seed=2)[1] != held


def test_holdout_slice_keeps_at_least_one_each_side():
    assert [len(part) for part in holdout_slice(examples(3), fraction=0.01)] == [2, 1]
    assert [len(part) for part in holdout_slice(examples(2), fraction=0.9)] == [1, 1]
    with pytest.raises(ValueError, match="at least 2 examples"):
        holdout_slice(examples(1))
    with pytest.raises(ValueError, match="0 < fraction < 1"):
        holdout_slice(examples(10), fraction=1.0)


def test_item_frequencies():
    data = examples(8) + [Example("u", ("A",), "Z", None, 9), Example("v", (), "Z", None, 10)]
    assert item_frequencies(data) == collections.Counter({0: 2, 1: 2, 2: 1, 3: 1, 4: 1, 5: 1,
                                                          "Z": 2})
