"""benchmarks/advantage_split.py on the tiny model: the within-prompt share of Eq. 7's
centred rewards is 0 without noise and grows with sigma."""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_within_prompt_share_is_zero_without_noise_and_grows_with_it(tiny_reasoner, tmp_path,
                                                                     capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import advantage_split

    tiny_reasoner.save(tmp_path / "model")
    assert advantage_split.main(["--checkpoint", str(tmp_path / "model"), "--data",
                                 "synthetic", "--train-split", "train", "--sigmas", "0,0.5,5",
                                 "--prompts", "3", "--num-samples", "3", "--batches", "2",
                                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    share = {s: v["within_prompt_share"] for s, v in out["sigmas"].items()}
    assert share["0"] == 0.0 and out["sigmas"]["0"]["noisy_rows_beating_r0"] == 0.0
    assert 0.0 < share["0.5"] < share["5"] <= 1.0
