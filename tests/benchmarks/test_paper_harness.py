"""benchmarks/paper.py: the paper's experiments as one harness. The report builders on
hand-made variant folders (known ranks -> known HR and paired differences), bad input,
the failure of one variant, and the smoke budget end to end with resume."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from fastlatent.metrics import summarize

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "paper.py"
FIDELITY = SCRIPT.with_name("fidelity.py")
SMOKE = ["--data", "synthetic", "--train-split", "train", "--eval-split", "test",
         "--budget", "smoke", "--model", "tiny-random"]


@pytest.fixture(scope="module")
def paper():
    """benchmarks/paper.py as a module (registered while the tests use it)."""
    spec = importlib.util.spec_from_file_location("paper_harness", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def harness(paper, target: str, out: Path, *extra: str):
    args, chosen = paper.parse_args([target, "--data", "synthetic", "--train-split", "train",
                                     "--eval-split", "test", "--output-dir", str(out), *extra])
    return args, chosen, paper.all_variants(args)


USERS = [f"u{i}" for i in range(10)]


def fake_variant(out: Path, name: str, stages: dict[str, list[int | None]], *,
                 order: list[int] | None = None, popular: list[bool] | None = None,
                 users: list[str] = USERS, steps: list[tuple[int, float | None]] = (),
                 wall: float | None = None) -> None:
    """A finished variant folder: metrics.json and predictions.jsonl per stage (row i:
    user users[i], target t{i}, the given rank), RL step records, wall_seconds.txt."""
    folder = out / name
    folder.mkdir(parents=True)
    metrics = {"popular": summarize([0] * 2 + [None] * (len(users) - 2))}
    rows = []
    for stage, ranks in stages.items():
        metrics[stage] = {**summarize(ranks), "target_nll": 2.0}
        for i in order or range(len(ranks)):
            row = {"stage": stage, "user": users[i], "history": ["h"], "target": f"t{i}",
                   "rank": ranks[i], "predictions": [], "target_nll": 2.0 + i / 10}
            if popular is not None:
                row["popular"] = popular[i]
            rows.append(row)
    (folder / "metrics.json").write_text(json.dumps(metrics))
    (folder / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    log = [{"stage": "rl", "event": "step", "step": step, "reward_r0": -3.0, "grad_norm": 0.1,
            **({"seconds": seconds} if seconds is not None else {})} for step, seconds in steps]
    (folder / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    if wall is not None:
        (folder / "wall_seconds.txt").write_text(f"{wall}\n")


SFT_ONLY = [0, None, None, 4, None, None, None, None, None, None]  # HR@5 .2, HR@10 .2
RL_BATCH = [0, 1, None, 4, None, 7, None, None, None, 12]  # HR@5 .3, HR@10 .4
NDCG_GAIN = (1 / math.log2(3) + 1 / math.log2(9)) / 10  # rows 1 and 5 turn into hits


def table_rows(markdown: str) -> list[str]:
    return [line for line in markdown.splitlines() if line.startswith("| ")]


def test_table2_report_has_known_metrics_and_paired_differences(paper, tmp_path):
    fake_variant(tmp_path, "sft-only", {"sft": SFT_ONLY})
    order = [9, 3, 0, 1, 2, 4, 5, 6, 7, 8]  # rows in another order are aligned, not refused
    fake_variant(tmp_path, "rl-batch", {"rl": RL_BATCH}, order=order, steps=[(1, 1.0)])
    args, _, variants = harness(paper, "table2", tmp_path)
    report = paper.build_table2(args, tmp_path, variants)
    assert list(report["variants"]) == ["sft-only", "rl-batch"]
    assert report["missing"] == ["wo-reasoning", "wo-latentratt", "rl-group"]
    entry = report["variants"]["rl-batch"]
    assert entry["hr@10"] == pytest.approx(0.4) and entry["paper_cds_hr@10"] == .1160
    vs = entry["paired_vs_sft_only"]
    assert vs["hr@10"]["diff"] == pytest.approx(0.2)
    assert vs["hr@5"]["diff"] == pytest.approx(0.1)
    assert vs["ndcg@10"]["diff"] == pytest.approx(NDCG_GAIN)
    assert vs["target_nll"]["diff"] == pytest.approx(0.0)  # same rows, same per-row NLL
    assert vs["hr@10"]["lo"] <= 0.2 <= vs["hr@10"]["hi"]
    assert entry["rl"]["steps"] == 1 and entry["rows_for_80pct_power_at_paper_gain"] > 0
    assert report["git_commit"] is None or len(report["git_commit"]) == 40
    assert report["runs"]["rl-batch"]["done"] and report["runs"]["rl-batch"]["command"]
    table = paper.markdown_table2(report)
    assert len(table_rows(table)) == 4  # header, two variants, popularity
    assert "Not (yet) finished: wo-reasoning, wo-latentratt, rl-group" in table

    fake_variant(tmp_path, "rl-group", {"rl": RL_BATCH}, users=[f"v{i}" for i in range(10)])
    with pytest.raises(SystemExit, match="rl-group .* other rows than sft-only"):
        paper.build_table2(args, tmp_path, variants)


def write_baselines(out: Path, rows: list[dict], ranks: dict[str, list[int | None]]) -> None:
    """DIR/baselines as `python -m fastlatent.baselines` writes it, on ``rows``."""
    folder = out / "baselines"
    folder.mkdir(parents=True)
    metrics = {name: {**summarize(r), "epochs": 1, "seconds": 0.5} for name, r in ranks.items()}
    predictions = [{"stage": name, "user": row["user"], "history": row["history"],
                    "target": row["target"], "rank": rank, "predictions": []}
                   for name, r in ranks.items() for row, rank in zip(rows, r, strict=True)]
    (folder / "metrics.json").write_text(json.dumps(metrics))
    (folder / "predictions.jsonl").write_text("".join(json.dumps(p) + "\n" for p in predictions))


def test_table1_report_rows_and_paired_gains_over_their_bases(paper, tmp_path):
    fake_variant(tmp_path, "wo-reasoning", {"sft": SFT_ONLY})
    fake_variant(tmp_path, "rl-batch", {"rl": RL_BATCH})
    fake_variant(tmp_path, "d3", {"eval": RL_BATCH})
    fake_variant(tmp_path, "rl-batch-d3", {"eval": SFT_ONLY})
    rows = [{"user": u, "history": ["h"], "target": f"t{i}"} for i, u in enumerate(USERS)]
    hits = [0] * 5 + [None] * 5
    write_baselines(tmp_path, rows, {"sasrec": hits, "gru4rec": hits[::-1], "caser": hits,
                                     "popular": hits})
    args, chosen, variants = harness(paper, "table1", tmp_path)
    assert [v.name for v in chosen] == ["wo-reasoning", "sft-only", "rl-batch", "d3",
                                        "rl-batch-d3", "baselines"]
    report = paper.build_table1(args, tmp_path, variants)
    assert [r["label"] for r in report["rows"]] == [
        "Caser", "GRU4Rec", "SASRec", "popularity (top-10 training targets)", "BIGRec",
        "+LatentR³", "D³", "+LatentR³ (D³ decoding)"]
    by_key = {r["key"]: r for r in report["rows"]}
    assert by_key["sasrec"]["hr@10"] == pytest.approx(0.5)
    assert by_key["sasrec"]["paper_cds"] == {"hr@10": .1054, "ndcg@10": .0691}
    assert by_key["caser"]["paper_cds"] is None
    assert by_key["rl-batch"]["paired_vs_base"]["hr@10"]["diff"] == pytest.approx(0.2)
    assert by_key["rl-batch-d3"]["paired_vs_base"]["hr@10"]["diff"] == pytest.approx(-0.2)
    assert "paired_vs_base" not in by_key["d3"]
    assert report["baseline_budget_flags"] == []  # the cpu budget: the baselines' defaults
    assert report["runs"]["baselines"]["command"][1:4] == ["-m", "fastlatent.baselines",
                                                            "--data"]
    table = paper.markdown_table1(report)
    assert len(table_rows(table)) == 9 and "paper (CDs)" in table

    write_baselines(tmp_path / "other", rows[::-1][:5], {"sasrec": hits[:5]})
    (tmp_path / "baselines" / "predictions.jsonl").write_text(
        (tmp_path / "other" / "baselines" / "predictions.jsonl").read_text())
    with pytest.raises(SystemExit, match="baselines \\(caser\\) was evaluated on other rows"):
        paper.build_table1(args, tmp_path, variants)


def test_fig2_fig3_fig4_reports_from_fake_folders(paper, tmp_path):
    popular = [True] * 4 + [False] * 6
    fake_variant(tmp_path, "wo-reasoning", {"sft": SFT_ONLY}, popular=popular)
    fake_variant(tmp_path, "sft-only", {"sft": SFT_ONLY})
    # a resumed run logs step 2 twice: the last record counts, once
    fake_variant(tmp_path, "rl-batch", {"rl": RL_BATCH}, popular=popular,
                 steps=[(1, 1.0), (2, 9.0), (2, 1.5)], wall=60.0)
    fake_variant(tmp_path, "rl-exact-match", {"rl": SFT_ONLY}, steps=[(1, 5.0), (2, 5.0)])
    fake_variant(tmp_path, "n2", {"sft": SFT_ONLY, "rl": [0] * 10})
    args, _, variants = harness(paper, "fig2", tmp_path)

    fig2 = paper.build_fig2(args, tmp_path, variants)
    pop, unpop = fig2["groups"]["popular"], fig2["groups"]["unpopular"]
    assert (pop["n"], unpop["n"]) == (4, 6)
    assert pop["hr@10"]["bigrec"] == pytest.approx(0.5)  # ranks 0, -, -, 4
    assert pop["hr@10"]["gain"]["diff"] == pytest.approx(0.25)  # row 1 turns into a hit
    assert unpop["hr@10"]["gain"]["diff"] == pytest.approx(1 / 6)  # row 5 (row 9: rank 12)
    assert pop["hr@10"]["relative_gain"] == pytest.approx(0.5)
    assert len(table_rows(paper.markdown_fig2(fig2))) == 3

    fig3 = paper.build_fig3(args, tmp_path, variants)
    assert [p["num_latents"] for p in fig3["points"]] == [1, 2]
    n1, n2 = fig3["points"]
    assert n1["sft"]["hr@10"] == pytest.approx(0.2) and n1["rl"]["hr@10"] == pytest.approx(0.4)
    assert n2["paired_rl_vs_n1"]["hr@10"]["diff"] == pytest.approx(0.6)
    assert "paired_rl_vs_n1" not in n1 and fig3["missing"] == ["n4", "n8"]

    fig4 = paper.build_fig4(args, tmp_path, variants)
    mod, orig = fig4["variants"]["rl-batch"], fig4["variants"]["rl-exact-match"]
    assert mod["rl_seconds"] == pytest.approx(2.5) and orig["rl_seconds"] == pytest.approx(10)
    assert fig4["cost_ratio_modified_over_original"] == pytest.approx(0.25)
    assert orig["paired_vs_rl_batch"]["hr@10"]["diff"] == pytest.approx(-0.2)
    assert mod["rl_seconds_source"] == "log.jsonl RL step seconds" and "cost_note" not in fig4

    (tmp_path / "rl-batch" / "log.jsonl").write_text(json.dumps(
        {"stage": "rl", "event": "step", "step": 1, "reward_r0": -3.0, "grad_norm": 0.1}) + "\n")
    fig4 = paper.build_fig4(args, tmp_path, variants)  # no per-step seconds: the wall time
    assert fig4["variants"]["rl-batch"]["rl_seconds"] == 60.0
    assert "wall_seconds.txt" in fig4["variants"]["rl-batch"]["rl_seconds_source"]
    assert fig4["cost_note"] and "wall_seconds.txt" in paper.markdown_fig4(fig4)

    pytest.importorskip("matplotlib")
    for target, report in (("fig2", fig2), ("fig3", fig3), ("fig4", fig4)):
        assert paper.chart(target, report, tmp_path / f"{target}.png")
        assert (tmp_path / f"{target}.png").stat().st_size > 1000


def test_all_runs_every_variant_once_after_the_ones_it_starts_from(paper, tmp_path):
    _, chosen, _ = harness(paper, "all", tmp_path, "--sigma-variants", "0.5")
    names = [v.name for v in chosen]
    assert len(names) == len(set(names)) == 13
    for i, v in enumerate(chosen):
        assert v.after is None or names.index(v.after) < i
    _, chosen, _ = harness(paper, "fig4", tmp_path, "--only", "rl-exact-match")
    assert [v.name for v in chosen] == ["sft-only", "rl-exact-match"]  # its SFT is added


def test_rl_variants_train_longer_on_as_many_new_prompts(paper, tmp_path):
    from fastlatent.train import parse_config

    args, chosen, _ = harness(paper, "table2", tmp_path, "--budget", "cpu",
                              "--rl-variant", "steps=80,sigma=0.32",
                              "--rl-variant", "lr=1e-4,steps=160,sigma=0.32",
                              "--only", "rl-batch-steps160-sigma0.32-lr1e-4")
    assert [v.name for v in chosen] == ["sft-only", "rl-batch-steps160-sigma0.32-lr1e-4"]
    v = chosen[1]
    assert v.after == "sft-only" and v.stage == "rl"
    assert v.label == "+RL (batch adv., 160 steps, σ=0.32, lr 1e-4)"
    cmd = paper.variant_command(v, args, tmp_path)
    # the variant's flags come after the budget's, so they are the ones that count
    cfg = parse_config(cmd[cmd.index("fastlatent.train") + 1:])
    assert (cfg.rl.rl_max_steps, cfg.data.rl_limit, cfg.rl.sigma, cfg.rl.rl_lr) == (
        160, 160 * 8, 0.32, 1e-4)
    assert "rl-batch-steps80-sigma0.32" in paper.target_variants("table2", args)
    # --sigma-variants 0.5 and --rl-variant sigma=0.5 are one variant
    _, _, variants = harness(paper, "table2", tmp_path, "--sigma-variants", "0.5",
                             "--rl-variant", "sigma=0.5")
    assert [v.name for v in variants].count("rl-batch-sigma0.5") == 1


@pytest.mark.parametrize("spec", ["steps=0", "steps=x", "noise=1", "sigma=", "lr=1,lr=2"])
def test_a_bad_rl_variant_is_one_line(paper, tmp_path, capsys, spec):
    with pytest.raises(SystemExit) as e:
        harness(paper, "table2", tmp_path, "--rl-variant", spec)
    assert e.value.code == 2
    assert f"--rl-variant {spec!r}" in capsys.readouterr().err


def test_a_failed_variant_is_one_line_and_its_dependents_are_skipped(paper, tmp_path,
                                                                     monkeypatch):
    def failing(v, args, out):
        return [sys.executable, "-c", "import sys; print('error: no such flag'); sys.exit(3)"]

    monkeypatch.setattr(paper, "variant_command", failing)
    args, chosen, _ = harness(paper, "fig4", tmp_path)
    problems = paper.run_variants(args, tmp_path, chosen)
    log = tmp_path / "logs" / "sft-only.log"
    assert problems[0] == (f"error: variant sft-only failed (exit 3) in {tmp_path / 'sft-only'}; "
                           f"log {log}: error: no such flag")
    assert problems[1:] == [
        "skipped rl-batch: it starts from sft-only's model, which failed",
        "skipped rl-exact-match: it starts from sft-only's model, which failed"]
    assert "error: no such flag" in log.read_text()
    assert not (tmp_path / "sft-only").exists()  # nothing written where the run never started


@pytest.mark.parametrize("argv, message", [
    (["table9", "--data", "synthetic"], "unknown target 'table9'"),
    (["fig2", "--data", "synthetic", "--only", "rl-batch,n4"], "--only: n4 not a variant of fig2"),
    (["table1", "--data", "csv:/nonexistent/cds"], "no such directory /nonexistent/cds"),
    (["table2", "--data", "synthetic", "--budget", "huge"], "invalid choice: 'huge'"),
])
def test_bad_input_is_one_line_and_exit_2_before_anything_runs(tmp_path, argv, message):
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, str(SCRIPT), *argv, "--output-dir", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert message in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_fidelity_alias_takes_table2s_variants(tmp_path):
    done = subprocess.run([sys.executable, str(FIDELITY), "--data", "synthetic", "--only", "d3",
                           "--output-dir", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "fidelity.py: error: --only: d3 not a variant of table2" \
        in done.stderr


def run_paper(*argv: str) -> str:
    done = subprocess.run([sys.executable, str(SCRIPT), *argv], capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done.stdout


def launched(stdout: str) -> list[str]:
    """The variants a harness run started (not the ones done already)."""
    return [line.split()[1] for line in stdout.splitlines()
            if line.startswith("[") and " so far): " in line]


@pytest.mark.slow
def test_smoke_harness_shares_variants_across_targets_and_resumes(tmp_path):
    out = tmp_path / "paper"
    common = [*SMOKE, "--output-dir", str(out)]

    # fig2: BIGRec and +LatentR³ (and the SFT model RL starts from)
    stdout = run_paper("fig2", *common)
    assert launched(stdout) == ["wo-reasoning", "sft-only", "rl-batch"]
    fig2 = json.loads((out / "fig2.json").read_text())
    metrics = json.loads((out / "rl-batch" / "metrics.json").read_text())["rl"]
    groups = fig2["groups"]
    assert groups["popular"]["n"] + groups["unpopular"]["n"] == 12
    for group in ("popular", "unpopular"):  # the trainer's own popular split, recomputed
        if groups[group]["n"]:
            assert groups[group]["hr@10"]["latentr3"] == pytest.approx(
                metrics[f"hr@10_{group}"])
    assert fig2["runs"]["rl-batch"]["wall_seconds"] > 0 and fig2["missing"] == []

    # table1: the traditional models (RecBole, one epoch) and the two D³ decodings run
    stdout = run_paper("table1", *common)
    assert launched(stdout) == ["d3", "rl-batch-d3", "baselines"]
    assert stdout.count("done already") == 3
    table1 = json.loads((out / "table1.json").read_text())
    by_key = {r["key"]: r for r in table1["rows"]}
    assert list(by_key) == ["caser", "gru4rec", "sasrec", "popular", "wo-reasoning",
                            "rl-batch", "d3", "rl-batch-d3"]
    assert all(by_key[k]["n"] == 12 and 0.0 <= by_key[k]["hr@10"] <= 1.0 for k in by_key)
    for name, base in (("rl-batch", "wo-reasoning"), ("rl-batch-d3", "d3")):
        diff = by_key[name]["paired_vs_base"]["hr@10"]
        assert diff["diff"] == pytest.approx(by_key[name]["hr@10"] - by_key[base]["hr@10"])
    d3_config = json.loads((out / "d3" / "run.json").read_text())["config"]
    assert d3_config["eval"]["length_penalty"] == 0.0
    assert d3_config["run"]["checkpoint"] == str(out / "wo-reasoning" / "sft")
    assert table1["runs"]["baselines"]["command"][-2:] == ["--epochs", "1"]
    assert "--eval-limit" in table1["runs"]["baselines"]["command"]

    # fig3 at N = 1 and 2
    stdout = run_paper("fig3", *common, "--only", "n2")
    assert launched(stdout) == ["n2"]
    fig3 = json.loads((out / "fig3.json").read_text())
    assert [p["num_latents"] for p in fig3["points"]] == [1, 2]
    assert set(fig3["points"][1]) >= {"sft", "rl", "paired_rl_vs_n1"}
    assert fig3["missing"] == ["n4", "n8"]

    # fig4: the original GRPO (exact-match reward, whole model) from the same SFT model
    stdout = run_paper("fig4", *common)
    assert launched(stdout) == ["rl-exact-match"]
    fig4 = json.loads((out / "fig4.json").read_text())
    assert fig4["variants"]["rl-exact-match"]["rl_seconds_source"] == "log.jsonl RL step seconds"
    assert fig4["cost_ratio_modified_over_original"] > 0
    assert "paired_vs_rl_batch" in fig4["variants"]["rl-exact-match"]

    # table2 over what is there: nothing reruns
    stdout = run_paper("table2", *common, "--only", "wo-reasoning,sft-only,rl-batch")
    assert launched(stdout) == [] and stdout.count("done already") == 3
    table2 = json.loads((out / "table2.json").read_text())
    assert list(table2["variants"]) == ["wo-reasoning", "sft-only", "rl-batch"]
    assert table2["variants"]["rl-batch"]["paired_vs_sft_only"]["hr@10"]["lo"] <= \
        table2["variants"]["rl-batch"]["paired_vs_sft_only"]["hr@10"]["hi"]

    for target in ("fig2", "table1", "fig3", "fig4", "table2"):
        report = json.loads((out / f"{target}.json").read_text())
        assert report["budget_flags"] == ["--preset", "smoke", "--rl-max-steps", "2"]
        assert "git_commit" in report and (out / f"{target}.md").is_file()
        assert (out / f"{target}.png").stat().st_size > 1000
