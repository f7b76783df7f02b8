"""A toy dataset in the paper's CSV layout, written to disk for tests of the command line."""

from __future__ import annotations

import csv


def write_csv_dir(root, splits, titles, rows_per_split=24):
    """``rows_per_split`` rows per split in ``root/<split>/Toy_Music.csv`` (three history
    items, then the target, cycling through ``titles``) and the catalogue in
    ``root/info/Toy_Music.txt``."""
    (root / "info").mkdir(parents=True)
    (root / "info" / "Toy_Music.txt").write_text(
        "".join(f"{t}\t{i}\n" for i, t in enumerate(titles)))
    header = ["user_id", "item_asins", "item_asin", "history_item_id", "item_id",
              "history_item_title", "item_title", "history_rating", "rating",
              "history_timestamp", "timestamp"]
    for split in splits:
        (root / split).mkdir()
        with (root / split / "Toy_Music.csv").open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(header)
            for n in range(rows_per_split):
                hist = [(n + j) % len(titles) for j in range(3)]
                tgt = (n + 3) % len(titles)
                w.writerow([f"u{n}", "[]", "x", str(hist), tgt, str([titles[h] for h in hist]),
                            titles[tgt], "[]", 5.0, "[]", 1000 + n])
