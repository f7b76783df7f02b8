"""The paper's experiments as one harness: Table 1, Table 2 (the ablation), Figures 2-4.

    python benchmarks/paper.py TARGET --data csv:../shared/data/amazon-cds \
        --train-split valid --eval-split test --budget cpu --output-dir runs/paper-cds

TARGET is one of table1, table2, fig2, fig3, fig4 or all. Each target writes
DIR/<target>.json, DIR/<target>.md and DIR/<target>.png (with matplotlib).

| target | the paper's                       | variants (one folder each under DIR) |
|--------|-----------------------------------|--------------------------------------|
| table1 | Table 1: SASRec, GRU4Rec, Caser,  | baselines, wo-reasoning, rl-batch,   |
|        | BIGRec, D³, each +LatentR³        | d3, rl-batch-d3                      |
| table2 | the ablation                      | wo-reasoning, wo-latentratt,         |
|        |                                   | sft-only, rl-batch, rl-group         |
| fig2   | Fig. 2: gain over BIGRec on       | wo-reasoning, rl-batch               |
|        | popular / unpopular targets       |                                      |
| fig3   | Fig. 3: reasoning length N        | sft-only, rl-batch (N = 1), n2, n4,  |
|        | in {1, 2, 4, 8}                   | n8                                   |
| fig4   | Fig. 4: original GRPO (exact-     | sft-only, rl-batch, rl-exact-match   |
|        | match reward) vs the modified one |                                      |
| all    | every target                      | the union, each once, dependencies   |
|        |                                   | first                                |

Variants: `wo-reasoning` (= BIGRec: --latent none, length penalty 1), `wo-latentratt`
(--latent last-hidden), `sft-only` (LatentR³ SFT), `rl-batch` (+ latent GRPO from
sft-only's model, batch advantage: +LatentR³), `rl-group` (group advantage),
`rl-exact-match` (original GRPO from the same SFT model: exact-match reward, group
advantage, the LLM trained too), `d3` (wo-reasoning's model decoded with length penalty 0:
D³ without its ensemble, which the paper omits too), `rl-batch-d3` (rl-batch's model, length
penalty 0), `n2`/`n4`/`n8` (LatentR³ with N latent tokens, SFT + RL in one run), and
`baselines` (`python -m fastlatent.baselines`: SASRec, GRU4Rec, Caser and popularity on the
same rows). table2's studies of RL: `--sigma-variants 0.1,0.3` adds `rl-batch-sigma0.1`, ...
(rl-batch at that noise scale); `--rl-variant steps=160,sigma=0.32,lr=1e-4` adds
`rl-batch-steps160-sigma0.32-lr1e-4` (160 RL steps on 160 x --rl-batch-size new prompts).
Every LLM variant is one `python -m fastlatent.train` process in its own folder
with one seed, data and evaluation-row budget, so every variant is evaluated on the same
seeded rows (checked: a report refuses variants whose rows differ) and every comparison
is paired (rows resampled together).

Resumable: a variant whose metrics.json holds its evaluation is not rerun ("done
already"); an interrupted one continues with --resume from its newest checkpoint. A
variant that fails is named on one line with its folder and log (DIR/logs/NAME.log);
the variants that start from its model are skipped, the others still run, the reports
cover what finished, and the exit code is 1. --only runs a subset of a target's
variants (those they start from are added when missing).

Estimated time with --budget cpu (SmolLM2-135M on Amazon CDs, 2 CPU cores, from the
per-variant times of benchmarks/FIDELITY.md: SFT variants 21-23 min, an RL variant
17-23 min, an evaluation-only variant ~5 min): table2 1.7 h (measured), fig2 1.0 h,
table1 1.2 h plus the baselines' own time, fig4 ~1.5 h (rl-exact-match decodes K answers
per prompt and trains the LLM: the paper's ~5x RL cost; not measured), fig3 ~2.6 h (four
SFT + RL runs: over the 2 h the other targets fit in), all ~4.7 h plus the baselines.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

METRICS = ("hr@5", "hr@10", "ndcg@5", "ndcg@10")
REFERENCE = "sft-only"  # table2's paired reference, and the SFT model RL starts from
TARGETS = ("table1", "table2", "fig2", "fig3", "fig4")
REPO = Path(__file__).resolve().parents[1]

# The paper's Amazon CDs numbers (H@10, N@10): Table 1 and the ablation
# (../shared/reference/LATENTR3.md). Caser and GRU4Rec are not in the reference.
PAPER_CDS: dict[str, tuple[float, float]] = {
    "sasrec": (.1054, .0691), "wo-reasoning": (.0929, .0672), "rl-batch": (.1160, .0826),
    "d3": (.1272, .0955), "rl-batch-d3": (.1327, .0977), "wo-latentratt": (.0875, .0624),
    "sft-only": (.1005, .0719), "rl-group": (.1002, .0718)}
PAPER_GRPO_COST_RATIO = 0.2  # modified GRPO's training time / the original's, about 1/5

# Flags of each budget (everything else: fastlatent's defaults).
BUDGETS: dict[str, list[str]] = {
    # ~1.5-2 h on 2 CPU cores with SmolLM2-135M: 512 SFT rows (16 steps of 32), 40 RL
    # steps of 8 prompts x K = 8, 200 test users. RL takes the top of the release's lr grid
    # {1e-5, 5e-5, 1e-4, 5e-4}: 40 steps are ~1/40 of the release's RL run.
    "cpu": ["--preset", "cpu", "--sft-limit", "512", "--sft-batch-size", "32",
            "--sft-micro-batch", "8", "--sft-epochs", "1", "--sft-warmup-steps", "1",
            "--sft-lr", "3e-4", "--valid-limit", "64", "--rl-limit", "320",
            "--rl-batch-size", "8", "--rl-max-steps", "40", "--rl-warmup-steps", "200",
            "--rl-lr", "5e-4", "--eval-limit", "200", "--eval-batch-size", "8"],
    # The paper's setting (a GPU job): the release's hyper-parameters on all rows.
    "full": ["--preset", "paper"],
    # Seconds: the tiny random model on synthetic data (the tests of this script).
    "smoke": ["--preset", "smoke", "--rl-max-steps", "2"],
}
# Flags of `python -m fastlatent.baselines` per budget (its evaluation rows: --eval-limit
# of the budget above, so that they are the LLM variants' rows).
BASELINE_BUDGETS: dict[str, list[str]] = {"cpu": [], "full": [], "smoke": ["--epochs", "1"]}
BASELINE_MODELS = ("sasrec", "gru4rec", "caser")
BASELINE_LABELS = {"caser": "Caser", "gru4rec": "GRU4Rec", "sasrec": "SASRec"}


@dataclass
class Variant:
    name: str
    label: str
    stage: str  # the metrics.json key of its (last) evaluation
    flags: list[str]
    after: str | None = None  # the variant whose saved model it starts from
    model_dir: str = "sft"  # which of that variant's saved models: sft/ or rl/
    kind: str = "train"  # "train": python -m fastlatent.train; "baselines"


# In run order: every variant comes after the one it starts from.
VARIANTS = [
    Variant("wo-reasoning", "w/o reasoning", "sft", ["--latent", "none", "--stage", "sft"]),
    Variant("wo-latentratt", "w/o LatentRATT", "sft",
            ["--latent", "last-hidden", "--stage", "sft"]),
    Variant(REFERENCE, "SFT only", "sft", ["--latent", "ratt", "--stage", "sft"]),
    Variant("rl-batch", "+RL (batch adv.)", "rl", ["--stage", "rl", "--advantage", "batch"],
            after=REFERENCE),
    Variant("rl-group", "+RL (group adv.)", "rl", ["--stage", "rl", "--advantage", "group"],
            after=REFERENCE),
    Variant("rl-exact-match", "original GRPO (exact-match reward)", "rl",
            ["--stage", "rl", "--reward", "exact-match", "--advantage", "group",
             "--rl-trainable", "all"], after=REFERENCE),
    Variant("d3", "D³ (length penalty 0)", "eval",
            ["--stage", "eval", "--length-penalty", "0"], after="wo-reasoning"),
    Variant("rl-batch-d3", "+LatentR³, length penalty 0", "eval",
            ["--stage", "eval", "--length-penalty", "0"], after="rl-batch", model_dir="rl"),
    *(Variant(f"n{n}", f"N = {n}", "rl",
              ["--latent", "ratt", "--num-latents", str(n), "--stage", "all"])
      for n in (2, 4, 8)),
    Variant("baselines", "SASRec, GRU4Rec, Caser, popularity", "", [], kind="baselines"),
]
TARGET_VARIANTS: dict[str, list[str]] = {
    "table1": ["baselines", "wo-reasoning", "rl-batch", "d3", "rl-batch-d3"],
    "table2": ["wo-reasoning", "wo-latentratt", REFERENCE, "rl-batch", "rl-group"],
    "fig2": ["wo-reasoning", "rl-batch"],
    "fig3": [REFERENCE, "rl-batch", "n2", "n4", "n8"],
    "fig4": [REFERENCE, "rl-batch", "rl-exact-match"],
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not the usage block
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def build_parser(prog: str | None = None, *, target: str | None = None,
                 default_output: str = "runs/paper") -> argparse.ArgumentParser:
    """The harness's flags; ``target`` fixes the target (the fidelity.py alias)."""
    p = _Parser(prog=prog, description=__doc__.split("\n\n")[0])
    if target is None:
        p.add_argument("target", help=f"one of {', '.join(TARGETS)}, all")
    p.add_argument("--data", required=True, help="fastlatent data spec, e.g. csv:DIR")
    p.add_argument("--train-split", default="valid", help="split to train on")
    p.add_argument("--eval-split", default="test", help="split to evaluate on")
    p.add_argument("--budget", choices=sorted(BUDGETS), default="cpu",
                   help="cpu: sized for 2 CPU cores (1-2.6 h per target); full: the paper's "
                   "setting (GPU); smoke: tiny random model, seconds per variant (tests)")
    p.add_argument("--model", default="smollm2-135m", help="fastlatent --model")
    p.add_argument("--seed", type=int, default=42, help="one seed for every variant")
    p.add_argument("--output-dir", default=default_output,
                   help="one folder per variant plus the reports <target>.{json,md,png}")
    p.add_argument("--only", default="", help="comma-separated variants of the target to "
                   "run (the ones they start from are added when missing)")
    p.add_argument("--sigma-variants", default="",
                   help="comma-separated extra sigmas (table2): each adds a '+RL (batch adv.)' "
                   "variant with that noise scale (sigma is absolute, and the paper's 1.5 was "
                   "set for Qwen2.5's scale)")
    p.add_argument("--rl-variant", action="append", default=[], metavar="KEY=VALUE,...",
                   help="an extra table2 '+RL (batch adv.)' variant from the same SFT model, "
                   "with any of steps=N (N RL steps on N x the budget's --rl-batch-size new "
                   "prompts, each once), sigma=S, lr=L; repeat the flag for more (e.g. "
                   "steps=160,sigma=0.32,lr=1e-4 runs rl-batch-steps160-sigma0.32-lr1e-4)")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                   help="further fastlatent.train flags for every LLM variant (after --extra)")
    if target is not None:
        p.set_defaults(target=target)
    return p


def budget_config(args: argparse.Namespace):
    """The budget's flags (and --extra) as fastlatent.train resolves them."""
    from fastlatent.train import parse_config

    return parse_config([*BUDGETS[args.budget], *args.extra])


RL_VARIANT_KEYS = {"steps": "--rl-max-steps", "sigma": "--sigma", "lr": "--rl-lr"}


def rl_variant(spec: str, args: argparse.Namespace) -> Variant:
    """One --rl-variant: 'steps=160,sigma=0.32,lr=1e-4' -> rl-batch-steps160-sigma0.32-lr1e-4."""
    settings: dict[str, str] = {}
    for part in spec.split(","):
        key, _, value = part.partition("=")
        if key not in RL_VARIANT_KEYS or not value or key in settings:
            raise ValueError(f"--rl-variant {spec!r}: expected KEY=VALUE pairs with the keys "
                             f"{', '.join(RL_VARIANT_KEYS)}, each at most once")
        settings[key] = value
    steps = settings.get("steps")
    if steps is not None and (not steps.isdigit() or int(steps) < 1):
        raise ValueError(f"--rl-variant {spec!r}: steps={steps} is not a positive step count")
    flags = ["--stage", "rl", "--advantage", "batch"]
    for key in RL_VARIANT_KEYS:  # the name and flags in one order, whatever the spec's
        if key in settings:
            flags += [RL_VARIANT_KEYS[key], settings[key]]
    if steps is not None:
        flags += ["--rl-limit", str(int(steps) * budget_config(args).rl.rl_batch_size)]
    name = "rl-batch" + "".join(f"-{k}{settings[k]}" for k in RL_VARIANT_KEYS if k in settings)
    words = {"steps": "{} steps", "sigma": "σ={}", "lr": "lr {}"}
    label = ", ".join(words[k].format(settings[k]) for k in RL_VARIANT_KEYS if k in settings)
    return Variant(name, f"+RL (batch adv., {label})", "rl", flags, after=REFERENCE)


def study_variants(args: argparse.Namespace) -> list[Variant]:
    """Table 2's extra '+RL (batch adv.)' variants, each from the SFT-only model: one per
    --sigma-variants value and one per --rl-variant (the same name once)."""
    specs = [f"sigma={s}" for s in args.sigma_variants.split(",") if s] + args.rl_variant
    variants = {v.name: v for v in (rl_variant(spec, args) for spec in specs)}
    return list(variants.values())


def all_variants(args: argparse.Namespace) -> list[Variant]:
    """Every variant in run order, with table 2's sigma and RL-length variants."""
    at = [v.name for v in VARIANTS].index("rl-group") + 1
    return VARIANTS[:at] + study_variants(args) + VARIANTS[at:]


def target_variants(target: str, args: argparse.Namespace) -> list[str]:
    names = TARGET_VARIANTS[target]
    if target == "table2":
        names = names + [v.name for v in study_variants(args)]
    return names


def with_dependencies(names: list[str], variants: list[Variant]) -> list[Variant]:
    """``names`` and the variants they start from (transitively), in run order."""
    by_name = {v.name: v for v in variants}
    wanted, todo = set(), list(names)
    while todo:
        name = todo.pop()
        if name not in wanted:
            wanted.add(name)
            if by_name[name].after:
                todo.append(by_name[name].after)
    return [v for v in variants if v.name in wanted]


def check_data(args: argparse.Namespace) -> str | None:
    """Why the dataset spec and splits cannot be read, or None."""
    spec = args.data
    if spec.startswith("csv:") and len(spec) > len("csv:"):
        root = Path(spec[len("csv:"):])
        if not root.is_dir():
            return f"--data {spec}: no such directory {root}"
        for split in dict.fromkeys((args.train_split, args.eval_split)):
            if not (root / split).is_dir():
                return f"--data {spec}: no split folder {root / split}"
        return None
    if spec not in ("movielens-100k", "synthetic"):
        return f"--data {spec!r}: expected movielens-100k, synthetic or csv:DIR"
    for split in (args.train_split, args.eval_split):
        if split not in ("train", "valid", "test"):
            return f"--data {spec}: no split {split!r} (train, valid, test)"
    return None


def parse_args(argv: list[str] | None, **parser_kwargs: Any) -> tuple[argparse.Namespace,
                                                                      list[Variant]]:
    """The flags and the variants to run; bad input is one line on stderr and exit 2."""
    parser = build_parser(**parser_kwargs)
    args = parser.parse_args(argv)
    if args.target not in (*TARGETS, "all"):
        parser.error(f"unknown target {args.target!r}; choose from {', '.join(TARGETS)}, all")
    if (problem := check_data(args)) is not None:
        parser.error(problem)
    try:
        variants = all_variants(args)
    except ValueError as e:
        parser.error(str(e))
    names = ([v.name for v in variants] if args.target == "all"
             else target_variants(args.target, args))
    allowed = [v.name for v in with_dependencies(names, variants)]
    only = [n for n in args.only.split(",") if n]
    unknown = [n for n in only if n not in allowed]
    if unknown:
        parser.error(f"--only: {', '.join(unknown)} not a variant of {args.target}; "
                     f"choose from {', '.join(allowed)}")
    return args, with_dependencies(only or names, variants)


# ---- running the variants --------------------------------------------------------------
def variant_command(v: Variant, args: argparse.Namespace, out: Path) -> list[str]:
    if v.kind == "baselines":
        return [sys.executable, "-m", "fastlatent.baselines", "--data", args.data,
                "--train-split", args.train_split, "--eval-split", args.eval_split,
                "--models", ",".join(BASELINE_MODELS), "--output-dir", str(out / v.name),
                "--seed", str(args.seed), "--eval-limit", str(budget_config(args).data.eval_limit),
                *BASELINE_BUDGETS[args.budget]]
    # --baselines none: the traditional models are the harness's own `baselines` variant
    cmd = [sys.executable, "-m", "fastlatent.train", *budget_flags(args.budget, v.flags),
           "--data", args.data, "--train-split", args.train_split,
           "--eval-split", args.eval_split, "--seed", str(args.seed),
           "--output-dir", str(out / v.name), "--baselines", "none", *v.flags]
    if v.after:  # the checkpoint fixes the model
        cmd += ["--checkpoint", str(out / v.after / v.model_dir)]
    else:
        cmd += ["--model", args.model]
    if (out / v.name / "run.json").is_file():  # an interrupted variant continues
        cmd.append("--resume")
    return cmd + list(args.extra)


def budget_flags(budget: str, variant_flags: list[str]) -> list[str]:
    """The budget's flags that act on a variant: fastlatent.train refuses a flag with no
    effect (an SFT setting for an RL or evaluation run, RL settings for an SFT run or
    without a latent), so those are left out (every budget flag takes one value)."""
    from fastlatent.config import unused_fields
    from fastlatent.train import parse_args

    flags = BUDGETS[budget]
    pairs = [(flags[i].lstrip("-").replace("-", "_"), flags[i:i + 2])
             for i in range(0, len(flags), 2)]
    cfg, _ = parse_args([*flags, *variant_flags])
    unused = {name for name, _ in unused_fields(cfg, [name for name, _ in pairs])}
    return [part for name, pair in pairs if name not in unused for part in pair]


def is_done(v: Variant, out: Path) -> bool:
    path = out / v.name / "metrics.json"
    if not path.is_file():
        return False
    metrics = json.loads(path.read_text())
    if v.kind == "baselines":
        return all(name in metrics for name in BASELINE_MODELS)
    return v.stage in metrics


def wall_seconds(out: Path, name: str) -> float | None:
    path = out / name / "wall_seconds.txt"
    return float(path.read_text()) if path.is_file() else None


def run_logged(cmd: list[str], log_path: Path) -> int:
    """Run ``cmd``, its output both on screen and appended to ``log_path``; its exit code.
    Ctrl-C reaches the child too (same process group) and a SIGTERM to this process is
    passed on: the child saves a checkpoint and exits (130, 143)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        log.write(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} $ {' '.join(cmd)}\n".encode())
        with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as proc:
            previous = signal.signal(signal.SIGTERM, lambda signum, _: proc.send_signal(signum))
            try:
                for chunk in iter(lambda: proc.stdout.read1(65536), b""):
                    sys.stdout.buffer.write(chunk)
                    sys.stdout.buffer.flush()
                    log.write(chunk)
            except KeyboardInterrupt:
                rest, _ = proc.communicate()  # the child's checkpoint and resume message
                sys.stdout.buffer.write(rest)
                log.write(rest)
            finally:
                signal.signal(signal.SIGTERM, previous)
        return proc.returncode


def last_line(path: Path) -> str:
    lines = [line.strip() for line in
             path.read_text(encoding="utf-8", errors="replace").replace("\r", "\n").splitlines()]
    lines = [line for line in lines if line and not line.startswith("# ")]
    return lines[-1] if lines else ""


def run_variants(args: argparse.Namespace, out: Path, chosen: list[Variant]) -> list[str]:
    """Run what is not done yet, in order; returns one line per variant that failed or
    was skipped because the variant it starts from is not there (printed as it happens,
    and again on stderr at the end by :func:`main`)."""
    start, problems, failed = time.time(), [], set()
    for i, v in enumerate(chosen, 1):
        where = f"[{i}/{len(chosen)}] {v.name}"
        if is_done(v, out):
            print(f"{where}: done already ({out / v.name})", flush=True)
            continue
        if v.after in failed:
            problems.append(f"skipped {v.name}: it starts from {v.after}'s model, which failed")
            failed.add(v.name)
            print(problems[-1], flush=True)
            continue
        if v.after and not (out / v.after / v.model_dir / "fastlatent.json").is_file():
            problems.append(f"skipped {v.name}: it starts from {v.after}'s model, missing in "
                            f"{out / v.after / v.model_dir}; run {v.after} first")
            failed.add(v.name)
            print(problems[-1], flush=True)
            continue
        log_path = out / "logs" / f"{v.name}.log"
        if v.kind == "baselines" and importlib.util.find_spec("fastlatent.baselines") is None:
            problems.append(f"error: variant {v.name} cannot run: fastlatent.baselines is not "
                            f"installed (folder {out / v.name})")
            failed.add(v.name)
            print(problems[-1], flush=True)
            continue
        cmd = variant_command(v, args, out)
        print(f"{where} ({time.time() - start:.0f} s so far): " + " ".join(cmd[1:]), flush=True)
        t0 = time.time()
        code = run_logged(cmd, log_path)
        started = out / v.name / ("metrics.json" if v.kind == "baselines" else "run.json")
        if started.is_file():  # wall time over every segment of an interrupted run
            seconds = (wall_seconds(out, v.name) or 0.0) + time.time() - t0
            (out / v.name / "wall_seconds.txt").write_text(f"{seconds:.1f}\n")
        if code in (130, 143):  # stopped by Ctrl-C / SIGTERM: resumable, stop here
            raise SystemExit(f"{v.name} stopped (exit {code}); run the same command again to "
                             f"continue it ({out / v.name})")
        if code != 0 or not is_done(v, out):
            problems.append(f"error: variant {v.name} failed (exit {code}) in {out / v.name}; "
                            f"log {log_path}: {last_line(log_path)}")
            failed.add(v.name)
            print(problems[-1], flush=True)
    return problems


# ---- reading finished variants ---------------------------------------------------------
def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def per_row(rows: list[dict[str, Any]]) -> dict[str, list[float]]:
    from fastlatent.metrics import hr_at, ndcg_at

    values = {f"hr@{k}": [hr_at(r["rank"], k) for r in rows] for k in (5, 10)}
    values.update({f"ndcg@{k}": [ndcg_at(r["rank"], k) for r in rows] for k in (5, 10)})
    if rows and all(r.get("target_nll") is not None for r in rows):
        values["target_nll"] = [float(r["target_nll"]) for r in rows]
    return values


class SameRows:
    """Per-row values of evaluated stages, all on the same evaluation rows: the first one
    read fixes the rows; a later one on other rows stops the report (rows in another
    order are put in the first one's order)."""

    def __init__(self, out: Path) -> None:
        self.out, self.keys, self.origin = out, None, ""
        self._rows: dict[tuple[str, str], list[dict[str, Any]]] = {}

    def rows(self, name: str, stage: str) -> list[dict[str, Any]]:
        if (name, stage) in self._rows:
            return self._rows[name, stage]
        rows = [r for r in read_jsonl(self.out / name / "predictions.jsonl")
                if r["stage"] == stage]
        keys = [(r["user"], r["target"]) for r in rows]
        if self.keys is None:
            self.keys, self.origin = keys, f"{name} ({stage})"
        elif keys != self.keys:
            if Counter(keys) != Counter(self.keys):
                raise SystemExit(f"{name} ({stage}) was evaluated on other rows than "
                                 f"{self.origin}: the variants must share seed, data and "
                                 "--eval-limit")
            position: dict[tuple, list[int]] = defaultdict(list)
            for i, key in enumerate(keys):
                position[key].append(i)
            rows = [rows[position[key].pop(0)] for key in self.keys]
        self._rows[name, stage] = rows
        return rows

    def values(self, name: str, stage: str) -> dict[str, list[float]]:
        return per_row(self.rows(name, stage))


def stage_metrics(out: Path, name: str, stage: str) -> dict[str, Any]:
    return json.loads((out / name / "metrics.json").read_text())[stage]


def summary(metrics: dict[str, Any]) -> dict[str, Any]:
    """The reported subset of a stage's metrics: n, HR/NDCG@5/10, their intervals, NLL."""
    keys = ("n", *METRICS, *(f"{k}_ci" for k in METRICS), "target_nll")
    return {k: metrics[k] for k in keys if k in metrics}


def paired(a: dict[str, list[float]], b: dict[str, list[float]], seed: int,
           keys: tuple[str, ...] = (*METRICS, "target_nll")) -> dict[str, dict[str, float]]:
    """Paired bootstrap difference a - b per metric (rows resampled together)."""
    from fastlatent.metrics import paired_bootstrap_difference

    return {k: paired_bootstrap_difference(a[k], b[k], seed=seed)
            for k in keys if k in a and k in b}


def git_commit() -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def saved_config(folder: Path):
    """The configuration a variant ran with (its run.json), as a fastlatent Config."""
    from fastlatent.config import build_config, field_owner

    saved = json.loads((folder / "run.json").read_text())["config"]
    owner = field_owner()
    return build_config(saved["run"]["preset"], {
        name: value for section in saved.values() for name, value in section.items()
        if name in owner and name != "preset"})


def run_record(v: Variant, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """What ran for a variant: its command (from its run.json when it has one), wall
    seconds over all its segments, and whether it finished."""
    manifest = out / v.name / "run.json"
    if v.kind == "train" and manifest.is_file():
        cmd = [sys.executable, "-m", "fastlatent.train",
               *json.loads(manifest.read_text())["argv"]]
    else:
        cmd = [c for c in variant_command(v, args, out) if c != "--resume"]
    return {"command": cmd, "wall_seconds": wall_seconds(out, v.name),
            "done": is_done(v, out)}


def report_header(target: str, args: argparse.Namespace, out: Path,
                  variants: list[Variant]) -> dict[str, Any]:
    names = target_variants(target, args)
    runs = with_dependencies(names, variants)
    return {"target": target, "data": args.data, "train_split": args.train_split,
            "eval_split": args.eval_split, "budget": args.budget,
            "budget_flags": BUDGETS[args.budget],
            **({"baseline_budget_flags": BASELINE_BUDGETS[args.budget]}
               if target == "table1" else {}),
            "extra_flags": list(args.extra), "model": args.model, "seed": args.seed,
            "git_commit": git_commit(),
            "runs": {v.name: run_record(v, args, out) for v in runs},
            "missing": [v.name for v in runs if not is_done(v, out)]}


# ---- table2: the ablation --------------------------------------------------------------
def rl_diagnostics(out: Path, name: str) -> dict[str, Any]:
    """From the RL log: reward spread within groups, how often the noisy rows won."""
    steps = [s for s in read_jsonl(out / name / "log.jsonl")
             if s["stage"] == "rl" and s["event"] == "step"]
    if not steps:
        return {}
    spread = [s["reward_std_within"] for s in steps if "reward_std_within" in s]
    noisy = [s["mean_noisy_advantage"] for s in steps if "mean_noisy_advantage" in s]
    return {"steps": len(steps), "reward_r0_first": steps[0]["reward_r0"],
            "reward_r0_last": steps[-1]["reward_r0"],
            "reward_std_within_mean": sum(spread) / len(spread) if spread else None,
            "steps_with_positive_mean_noisy_advantage":
                sum(a > 0 for a in noisy) / len(noisy) if noisy else None,
            "grad_norm_mean": sum(s["grad_norm"] for s in steps) / len(steps)}


def latent_scale(checkpoint: Path, args: argparse.Namespace, rows: int = 32) -> dict[str, float]:
    """||r^0|| on training prompts against the LLM's input-embedding scale: sigma is
    absolute, so what it means depends on both."""
    import torch

    from fastlatent.data.batch import collate
    from fastlatent.data.prompt import PromptBuilder
    from fastlatent.data.sampling import seeded_sample
    from fastlatent.data.sources import load_dataset
    from fastlatent.model.reasoner import LatentReasoner

    reasoner = LatentReasoner.load(checkpoint).eval()
    dataset = load_dataset(args.data, seed=args.seed)
    data_cfg = json.loads((checkpoint.parent / "run.json").read_text())["config"]["data"]
    builder = PromptBuilder(reasoner.tokenizer, template=data_cfg["template"],
                            domain=dataset.domain, release_domain=data_cfg["release_domain"])
    sample = seeded_sample(dataset.split(args.train_split), rows, args.seed)
    batch = collate([builder.encode(ex) for ex in sample], reasoner.tokenizer.pad_token_id)
    with torch.no_grad():
        r = reasoner.latent(batch.prompt_ids, batch.prompt_mask).float()
        emb = reasoner.llm.get_input_embeddings().weight.detach().float()
    d = emb.shape[1]
    return {"hidden_size": d, "r_norm_mean": float(r.norm(dim=-1).mean()),
            "embedding_norm_mean": float(emb.norm(dim=-1).mean()),
            "embedding_rms": float(emb.pow(2).mean().sqrt()),
            "noise_norm_at_sigma_1": math.sqrt(d)}


def power_rows(diff_values: list[float], effect: float) -> int | None:
    """Rows a paired test needs to detect a mean difference ``effect`` at 80% power,
    two-sided alpha 0.05, given the per-row paired differences measured here."""
    import numpy as np

    sd = float(np.std(np.asarray(diff_values), ddof=1)) if len(diff_values) > 1 else 0.0
    if effect <= 0 or sd == 0:
        return None
    return math.ceil(((1.959964 + 0.841621) * sd / effect) ** 2)


def build_table2(args: argparse.Namespace, out: Path, variants: list[Variant]
                 ) -> dict[str, Any]:
    from fastlatent.metrics import BASELINE

    by_name = {v.name: v for v in variants}
    done = [by_name[n] for n in target_variants("table2", args) if is_done(by_name[n], out)]
    rows = SameRows(out)
    values = {v.name: rows.values(v.name, v.stage) for v in done}
    report = {**report_header("table2", args, out, variants), "variants": {}}
    for v in done:
        metrics = json.loads((out / v.name / "metrics.json").read_text())
        paper = PAPER_CDS.get(v.name, (None, None))
        entry: dict[str, Any] = {"label": v.label, **metrics[v.stage],
                                 "paper_cds_hr@10": paper[0], "paper_cds_ndcg@10": paper[1],
                                 "wall_seconds": wall_seconds(out, v.name)}
        if REFERENCE in values and v.name != REFERENCE:
            entry["paired_vs_sft_only"] = paired(values[v.name], values[REFERENCE], args.seed)
        if v.stage == "rl":
            entry["rl"] = rl_diagnostics(out, v.name)
            if REFERENCE in values:
                diffs = [a - b for a, b in zip(values[v.name]["hr@10"],
                                               values[REFERENCE]["hr@10"], strict=True)]
                gain = PAPER_CDS["rl-batch"][0] - PAPER_CDS[REFERENCE][0]
                entry["rows_for_80pct_power_at_paper_gain"] = power_rows(diffs, gain)
        report["variants"][v.name] = entry
        report[BASELINE] = metrics.get(BASELINE)
    if (out / REFERENCE / "sft" / "fastlatent.json").is_file():
        report["latent_scale"] = latent_scale(out / REFERENCE / "sft", args)
    return report


# ---- table1: against traditional models, BIGRec and D³ ---------------------------------
TABLE1_ROWS = [("wo-reasoning", "BIGRec", None), ("rl-batch", "+LatentR³", "wo-reasoning"),
               ("d3", "D³", None), ("rl-batch-d3", "+LatentR³ (D³ decoding)", "d3")]


def baseline_rows(out: Path, rows: SameRows, seed: int
                  ) -> tuple[list[dict[str, Any]], list[str]]:
    """The traditional models' rows from DIR/baselines (metrics.json; missing intervals
    from predictions.jsonl), and notes."""
    from fastlatent.metrics import summarize

    folder, notes = out / "baselines", []
    metrics = json.loads((folder / "metrics.json").read_text())
    have_rows = (folder / "predictions.jsonl").is_file()
    if not have_rows:
        notes.append("baselines/predictions.jsonl is missing: the baselines' rows were not "
                     "checked against the LLM variants'")
    found = []
    for name in ("caser", "gru4rec", "sasrec"):
        if name not in metrics:
            continue
        entry = {"key": name, "label": BASELINE_LABELS[name], "variant": "baselines",
                 **{k: v for k, v in metrics[name].items()}}
        if have_rows:
            ranks = [r["rank"] for r in rows.rows("baselines", name)]
            entry = {**summarize(ranks, seed=seed), **entry}
        found.append(entry)
    return found, notes


def build_table1(args: argparse.Namespace, out: Path, variants: list[Variant]
                 ) -> dict[str, Any]:
    from fastlatent.metrics import BASELINE

    by_name = {v.name: v for v in variants}
    rows = SameRows(out)
    report = {**report_header("table1", args, out, variants), "rows": [], "notes": []}
    llm: list[dict[str, Any]] = []
    popular = None
    for name, label, base in TABLE1_ROWS:
        v = by_name[name]
        if not is_done(v, out):
            continue
        metrics = json.loads((out / name / "metrics.json").read_text())
        popular = popular or metrics.get(BASELINE)
        entry = {"key": name, "label": label, "variant": name, **summary(metrics[v.stage])}
        if base and is_done(by_name[base], out):
            entry["base"] = base
            entry["paired_vs_base"] = paired(rows.values(name, v.stage),
                                             rows.values(base, by_name[base].stage), args.seed)
        else:
            rows.values(name, v.stage)  # the row check
        llm.append(entry)
    traditional: list[dict[str, Any]] = []
    if is_done(by_name["baselines"], out):
        traditional, notes = baseline_rows(out, rows, args.seed)
        report["notes"] += notes
        if popular is None:
            popular = json.loads((out / "baselines" / "metrics.json").read_text()).get(BASELINE)
    if popular is not None:
        traditional.append({"key": BASELINE, "label": "popularity (top-10 training targets)",
                            "variant": "", **summary(popular)})
    for entry in traditional + llm:
        paper = PAPER_CDS.get(entry["key"])
        entry["paper_cds"] = {"hr@10": paper[0], "ndcg@10": paper[1]} if paper else None
        report["rows"].append(entry)
    if "cds" not in args.data.lower():
        report["notes"].append(f"the paper column is the paper's Amazon CDs result "
                               f"(Qwen2.5-1.5B); this data is {args.data}")
    return report


# ---- fig2: popular vs unpopular targets ------------------------------------------------
def popular_flags(out: Path, name: str, rows: list[dict[str, Any]]) -> list[bool]:
    """Per evaluation row, is its target popular (the top 20% of the catalogue by frequency as a
    training target, over the rows the variant trained on)? From the rows' own flag when
    predictions.jsonl has one, else recomputed from the variant's configuration."""
    if rows and all("popular" in r for r in rows):
        return [bool(r["popular"]) for r in rows]
    from fastlatent.data.sources import catalogue_frequencies, item_key, load_dataset
    from fastlatent.metrics import popular_items
    from fastlatent.pipeline import choose_splits

    cfg = saved_config(out / name)
    dataset = load_dataset(cfg.data.data, seed=cfg.run.seed)
    splits = choose_splits(dataset, cfg)
    popular = popular_items(catalogue_frequencies(splits.train, dataset.catalogue))
    by_key: dict[tuple[str, str], list[bool]] = defaultdict(list)
    for ex in splits.eval:
        by_key[ex.user, ex.target].append(item_key(ex) in popular)
    try:
        return [by_key[r["user"], r["target"]].pop(0) for r in rows]
    except IndexError:
        raise SystemExit(f"{name}: its predictions are not the evaluation rows its "
                         "configuration selects; cannot tell popular targets") from None


def build_fig2(args: argparse.Namespace, out: Path, variants: list[Variant]
               ) -> dict[str, Any]:
    from fastlatent.metrics import bootstrap_interval, paired_bootstrap_difference

    by_name = {v.name: v for v in variants}
    report = {**report_header("fig2", args, out, variants), "groups": {}}
    base, model = by_name["wo-reasoning"], by_name["rl-batch"]
    if not (is_done(base, out) and is_done(model, out)):
        return report
    rows = SameRows(out)
    flags = popular_flags(out, base.name, rows.rows(base.name, base.stage))
    values = {v.name: rows.values(v.name, v.stage) for v in (base, model)}
    report["popular_definition"] = ("top 20% of the catalogue by frequency as a training target "
                                    "(fastlatent.metrics.popular_items)")
    for group, wanted in (("popular", True), ("unpopular", False)):
        index = [i for i, flag in enumerate(flags) if flag == wanted]
        entry: dict[str, Any] = {"n": len(index)}
        for key in ("hr@10", "ndcg@10"):
            if not index:
                continue
            a = [values[model.name][key][i] for i in index]
            b = [values[base.name][key][i] for i in index]
            diff = paired_bootstrap_difference(a, b, seed=args.seed)
            mean_b = sum(b) / len(b)
            entry[key] = {
                "bigrec": mean_b, "bigrec_ci": list(bootstrap_interval(b, seed=args.seed)),
                "latentr3": sum(a) / len(a),
                "latentr3_ci": list(bootstrap_interval(a, seed=args.seed)),
                "gain": diff, "relative_gain": diff["diff"] / mean_b if mean_b else None}
        report["groups"][group] = entry
    return report


# ---- fig3: reasoning length ------------------------------------------------------------
FIG3_POINTS = [(1, REFERENCE, "rl-batch"), (2, "n2", "n2"), (4, "n4", "n4"), (8, "n8", "n8")]


def build_fig3(args: argparse.Namespace, out: Path, variants: list[Variant]
               ) -> dict[str, Any]:
    by_name = {v.name: v for v in variants}
    rows = SameRows(out)
    report = {**report_header("fig3", args, out, variants), "points": []}
    n1 = rows.values("rl-batch", "rl") if is_done(by_name["rl-batch"], out) else None
    for n, sft_name, rl_name in FIG3_POINTS:
        point: dict[str, Any] = {"num_latents": n, "sft_variant": sft_name,
                                 "rl_variant": rl_name}
        sft_folder = out / sft_name / "metrics.json"
        if sft_folder.is_file() and "sft" in json.loads(sft_folder.read_text()):
            point["sft"] = summary(stage_metrics(out, sft_name, "sft"))
            rows.values(sft_name, "sft")
        if is_done(by_name[rl_name], out):
            point["rl"] = summary(stage_metrics(out, rl_name, "rl"))
            if n1 is not None and n != 1:
                point["paired_rl_vs_n1"] = paired(rows.values(rl_name, "rl"), n1, args.seed)
        if "sft" in point or "rl" in point:
            report["points"].append(point)
    return report


# ---- fig4: original vs modified GRPO ---------------------------------------------------
def rl_seconds(out: Path, name: str) -> tuple[float | None, str]:
    """RL training time of a variant and where it comes from: the sum of the RL step
    records' ``seconds`` in log.jsonl (a step redone after a resume counts once), else the
    variant's whole wall time."""
    steps = {s["step"]: s for s in read_jsonl(out / name / "log.jsonl")
             if s.get("stage") == "rl" and s.get("event") == "step"}
    if steps and all(s.get("seconds") is not None for s in steps.values()):
        return sum(float(s["seconds"]) for s in steps.values()), "log.jsonl RL step seconds"
    return (wall_seconds(out, name),
            "wall_seconds.txt: the whole run, evaluation included (the RL step records have "
            "no seconds field)")


def build_fig4(args: argparse.Namespace, out: Path, variants: list[Variant]
               ) -> dict[str, Any]:
    by_name = {v.name: v for v in variants}
    rows = SameRows(out)
    report = {**report_header("fig4", args, out, variants), "variants": {}}
    labels = {"rl-batch": "modified GRPO (PPL reward, batch adv.)",
              "rl-exact-match": "original GRPO (exact-match reward, group adv., LLM trained)"}
    for name, label in labels.items():
        if not is_done(by_name[name], out):
            continue
        seconds, source = rl_seconds(out, name)
        entry = {"label": label, **summary(stage_metrics(out, name, "rl")),
                 "rl_seconds": seconds, "rl_seconds_source": source,
                 "rl_steps": rl_diagnostics(out, name).get("steps")}
        rows.values(name, "rl")
        report["variants"][name] = entry
    done = report["variants"]
    if len(done) == 2:
        done["rl-exact-match"]["paired_vs_rl_batch"] = paired(
            rows.values("rl-exact-match", "rl"), rows.values("rl-batch", "rl"), args.seed)
        mod, orig = done["rl-batch"]["rl_seconds"], done["rl-exact-match"]["rl_seconds"]
        report["cost_ratio_modified_over_original"] = mod / orig if mod and orig else None
        report["paper_cost_ratio"] = PAPER_GRPO_COST_RATIO
        if done["rl-batch"]["rl_seconds_source"] != done["rl-exact-match"]["rl_seconds_source"]:
            report["cost_note"] = "the two RL times come from different sources"
    return report


BUILDERS = {"table1": build_table1, "table2": build_table2, "fig2": build_fig2,
            "fig3": build_fig3, "fig4": build_fig4}


# ---- markdown --------------------------------------------------------------------------
def _ci(m: dict[str, Any] | None, key: str) -> str:
    if not m or m.get(key) is None:
        return "—"
    if not m.get(f"{key}_ci"):
        return f"{m[key]:.4f}"
    lo, hi = m[f"{key}_ci"]
    return f"{m[key]:.4f} [{lo:.3f}, {hi:.3f}]"


def _diff(d: dict[str, float] | None, digits: int = 4) -> str:
    if not d:
        return "—"
    mark = " *" if d["lo"] > 0 or d["hi"] < 0 else ""
    return f"{d['diff']:+.{digits}f} [{d['lo']:+.{digits}f}, {d['hi']:+.{digits}f}]{mark}"


def _paper(p: tuple[float | None, float | None] | None) -> str:
    return f"{p[0]:.4f} / {p[1]:.4f}" if p and p[0] is not None else "—"


FOOTNOTE = ("Intervals: 95% percentile bootstrap over the evaluation rows (1000 resamples); "
            "Δ columns are paired (rows resampled together), `*` = the interval excludes 0.")


def _tail(report: dict[str, Any]) -> list[str]:
    lines = ["", FOOTNOTE]
    if report.get("missing"):
        lines.append(f"Not (yet) finished: {', '.join(report['missing'])}.")
    lines += [f"Note: {n}" for n in report.get("notes", [])]
    return lines


def markdown_table2(report: dict[str, Any]) -> str:
    lines = ["| variant | HR@5 | HR@10 | NDCG@5 | NDCG@10 | target NLL (r⁰) | "
             "ΔHR@10 vs SFT only | ΔNDCG@10 vs SFT only | ΔNLL vs SFT only | "
             "paper (CDs) H@10 / N@10 |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for entry in report["variants"].values():
        nll = f"{entry['target_nll']:.4f}" if entry.get("target_nll") is not None else "—"
        vs = entry.get("paired_vs_sft_only", {})
        lines.append(f"| {entry['label']} | " + " | ".join(_ci(entry, k) for k in METRICS)
                     + f" | {nll} | {_diff(vs.get('hr@10'))} | {_diff(vs.get('ndcg@10'))} | "
                     f"{_diff(vs.get('target_nll'))} | "
                     f"{_paper((entry.get('paper_cds_hr@10'), entry.get('paper_cds_ndcg@10')))} |")
    base = report.get("popular")
    if base:
        lines.append("| popularity (top-10 training targets) | " +
                     " | ".join(_ci(base, k) for k in METRICS) + " | — | — | — | — | — |")
    return "\n".join(lines + _tail(report) + ["Lower NLL is better."]) + "\n"


def markdown_table1(report: dict[str, Any]) -> str:
    lines = ["| model | HR@5 | HR@10 | NDCG@5 | NDCG@10 | ΔHR@10 vs BIGRec / D³ | "
             "ΔNDCG@10 vs BIGRec / D³ | "
             "paper (CDs) H@10 / N@10 |", "|---|---|---|---|---|---|---|---|"]
    for entry in report["rows"]:
        vs = entry.get("paired_vs_base", {})
        paper = entry.get("paper_cds")
        lines.append(f"| {entry['label']} | " + " | ".join(_ci(entry, k) for k in METRICS)
                     + f" | {_diff(vs.get('hr@10'))} | {_diff(vs.get('ndcg@10'))} | "
                     f"{_paper((paper['hr@10'], paper['ndcg@10']) if paper else None)} |")
    lines += ["", "BIGRec = `wo-reasoning` (length penalty 1); D³ = the same model decoded "
              "with length penalty 0 (its ensemble with a traditional model omitted, as in the "
              "paper); +LatentR³ = `rl-batch` (SFT + latent GRPO) decoded each way."]
    return "\n".join(lines + _tail(report)) + "\n"


def markdown_fig2(report: dict[str, Any]) -> str:
    lines = ["| targets | rows | HR@10 BIGRec | HR@10 +LatentR³ | ΔHR@10 | NDCG@10 BIGRec | "
             "NDCG@10 +LatentR³ | ΔNDCG@10 |", "|---|---|---|---|---|---|---|---|"]
    for group, entry in report["groups"].items():
        cells = []
        for key in ("hr@10", "ndcg@10"):
            m = entry.get(key)
            if not m:
                cells += ["—"] * 3
                continue
            cells += [_ci({"v": m["bigrec"], "v_ci": m["bigrec_ci"]}, "v"),
                      _ci({"v": m["latentr3"], "v_ci": m["latentr3_ci"]}, "v"),
                      _diff(m["gain"])]
        lines.append(f"| {group} | {entry['n']} | " + " | ".join(cells) + " |")
    lines += ["", "Popular = the top 20% of the catalogue by frequency as a training target; "
              "Δ = +LatentR³ (rl-batch) − BIGRec (wo-reasoning) on the group's rows."]
    return "\n".join(lines + _tail(report)) + "\n"


def markdown_fig3(report: dict[str, Any]) -> str:
    lines = ["| N | HR@10 (SFT) | NDCG@10 (SFT) | HR@10 (SFT + RL) | NDCG@10 (SFT + RL) | "
             "ΔHR@10 vs N = 1 | ΔNDCG@10 vs N = 1 |", "|---|---|---|---|---|---|---|"]
    for p in report["points"]:
        vs = p.get("paired_rl_vs_n1", {})
        lines.append(f"| {p['num_latents']} | {_ci(p.get('sft'), 'hr@10')} | "
                     f"{_ci(p.get('sft'), 'ndcg@10')} | {_ci(p.get('rl'), 'hr@10')} | "
                     f"{_ci(p.get('rl'), 'ndcg@10')} | {_diff(vs.get('hr@10'))} | "
                     f"{_diff(vs.get('ndcg@10'))} |")
    lines += ["", "N = 1 is `sft-only` → `rl-batch`; N = 2, 4, 8 are `n2`, `n4`, `n8` "
              "(SFT then RL in one run). The paper found N = 1 best."]
    return "\n".join(lines + _tail(report)) + "\n"


def markdown_fig4(report: dict[str, Any]) -> str:
    lines = ["| GRPO | HR@10 | NDCG@10 | ΔHR@10 vs modified | ΔNDCG@10 vs modified | "
             "RL steps | RL seconds |", "|---|---|---|---|---|---|---|"]
    for entry in report["variants"].values():
        vs = entry.get("paired_vs_rl_batch", {})
        secs = entry["rl_seconds"]
        lines.append(f"| {entry['label']} | {_ci(entry, 'hr@10')} | {_ci(entry, 'ndcg@10')} | "
                     f"{_diff(vs.get('hr@10'))} | {_diff(vs.get('ndcg@10'))} | "
                     f"{entry.get('rl_steps') or '—'} | "
                     f"{f'{secs:.1f}' if secs is not None else '—'} |")
    ratio = report.get("cost_ratio_modified_over_original")
    lines.append("")
    if ratio is not None:
        lines.append(f"RL time, modified / original: {ratio:.3f} (the paper: about "
                     f"{PAPER_GRPO_COST_RATIO:.1f}, i.e. 1/5).")
    sources = {e["rl_seconds_source"] for e in report["variants"].values()}
    lines += [f"RL seconds: {s}." for s in sorted(sources)]
    if report.get("cost_note"):
        lines.append(f"Note: {report['cost_note']}.")
    lines.append("Both start from the same SFT model (`sft-only`).")
    return "\n".join(lines + _tail(report)) + "\n"


MARKDOWN = {"table1": markdown_table1, "table2": markdown_table2, "fig2": markdown_fig2,
            "fig3": markdown_fig3, "fig4": markdown_fig4}


# ---- charts ----------------------------------------------------------------------------
def _pyplot():
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no chart (pip install 'fastlatent[plots]')")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _err(entries: list[dict[str, Any]], key: str) -> list[list[float]]:
    return [[e[key] - e[f"{key}_ci"][0] if e.get(f"{key}_ci") else 0.0 for e in entries],
            [e[f"{key}_ci"][1] - e[key] if e.get(f"{key}_ci") else 0.0 for e in entries]]


def _bars(plt, entries: list[dict[str, Any]], title: str, grey: set[str]):
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key in zip(axes, ("hr@10", "ndcg@10"), strict=True):
        xs = list(range(len(entries)))
        ax.bar(xs, [e[key] for e in entries], yerr=_err(entries, key), capsize=4,
               color=["#888" if e["label"] in grey else "#3572a5" for e in entries])
        ax.set_xticks(xs, [e["label"] for e in entries], rotation=30, ha="right")
        ax.set_title(f"{key.upper()} (95% bootstrap)")
    fig.suptitle(title)
    return fig


def _title(report: dict[str, Any], what: str) -> str:
    return f"{what} — {report['data']}, {report['model']}, budget {report['budget']}"


def chart(target: str, report: dict[str, Any], path: Path) -> bool:
    plt = _pyplot()
    if plt is None:
        return False
    if target == "table2":
        entries = list(report["variants"].values())
        if report.get("popular"):
            entries.append({"label": "popularity", **report["popular"]})
        fig = _bars(plt, entries, _title(report, "LatentR³ ablation"), {"popularity"})
    elif target == "table1":
        entries = report["rows"]
        fig = _bars(plt, entries, _title(report, "Table 1"),
                    {e["label"] for e in entries if not e["key"].startswith(("wo-", "rl-", "d3"))})
    elif target == "fig2":
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        groups = [g for g, e in report["groups"].items() if e.get("hr@10")]
        for ax, key in zip(axes, ("hr@10", "ndcg@10"), strict=True):
            for j, (who, color) in enumerate((("bigrec", "#888"), ("latentr3", "#3572a5"))):
                ms = [report["groups"][g][key] for g in groups]
                vals = [m[who] for m in ms]
                errs = [[m[who] - m[f"{who}_ci"][0] for m in ms],
                        [m[f"{who}_ci"][1] - m[who] for m in ms]]
                ax.bar([i + (j - 0.5) * 0.38 for i in range(len(groups))], vals, 0.38,
                       yerr=errs, capsize=4, color=color,
                       label="BIGRec" if who == "bigrec" else "+LatentR³")
            for i, g in enumerate(groups):
                d = report["groups"][g][key]["gain"]["diff"]
                ax.annotate(f"Δ {d:+.3f}", (i, 0), xytext=(0, -28), textcoords="offset points",
                            ha="center", fontsize=8)
            ax.set_xticks(range(len(groups)), groups)
            ax.set_title(f"{key.upper()} by target popularity")
            ax.legend()
        fig.suptitle(_title(report, "Popular vs unpopular targets"))
    elif target == "fig3":
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for ax, key in zip(axes, ("hr@10", "ndcg@10"), strict=True):
            for stage, style in (("sft", "--o"), ("rl", "-o")):
                pts = [p for p in report["points"] if stage in p]
                if not pts:
                    continue
                ms = [p[stage] for p in pts]
                ax.errorbar([p["num_latents"] for p in pts], [m[key] for m in ms],
                            yerr=_err(ms, key), fmt=style, capsize=4,
                            label="SFT" if stage == "sft" else "SFT + RL")
            ax.set_xscale("log", base=2)
            ax.set_xticks([1, 2, 4, 8], ["1", "2", "4", "8"])
            ax.set_xlabel("reasoning length N (latent tokens)")
            ax.set_title(f"{key.upper()} (95% bootstrap)")
            ax.legend()
        fig.suptitle(_title(report, "Reasoning length"))
    else:  # fig4
        entries = list(report["variants"].values())
        fig, axes = plt.subplots(1, 3, figsize=(13, 4))
        labels = [e["label"].split(" (")[0] for e in entries]
        for ax, key in zip(axes[:2], ("hr@10", "ndcg@10"), strict=True):
            ax.bar(labels, [e[key] for e in entries], yerr=_err(entries, key), capsize=4,
                   color="#3572a5")
            ax.set_title(f"{key.upper()} (95% bootstrap)")
        axes[2].bar(labels, [e["rl_seconds"] or 0.0 for e in entries], color="#888")
        axes[2].set_title("RL training seconds")
        fig.suptitle(_title(report, "Original vs modified GRPO"))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ---- main ------------------------------------------------------------------------------
def write_report(target: str, args: argparse.Namespace, out: Path, variants: list[Variant],
                 stem: str | None = None) -> str:
    """Build, write and return one target's markdown table (DIR/<stem>.{json,md,png})."""
    from fastlatent.runlog import write_json_atomic, write_text_atomic

    stem = stem or target
    report = BUILDERS[target](args, out, variants)
    write_json_atomic(out / f"{stem}.json", report)
    table = MARKDOWN[target](report)
    write_text_atomic(out / f"{stem}.md", table)
    chart(target, report, out / f"{stem}.png")
    return table


def main(argv: list[str] | None = None, *, report_stem: str | None = None,
         **parser_kwargs: Any) -> int:
    """Exit codes: 0 every variant done, 1 a variant failed (the reports cover the rest),
    2 bad input (nothing ran)."""
    args, chosen = parse_args(argv, **parser_kwargs)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    problems = run_variants(args, out, chosen)
    variants = all_variants(args)
    targets = TARGETS if args.target == "all" else (args.target,)
    written = []
    for target in targets:
        table = write_report(target, args, out, variants, report_stem)
        print(f"\n## {target}\n\n{table}")
        written.append(f"{out / (report_stem or target)}.json/.md")
    print(f"wrote {', '.join(written)}")
    if problems:
        print("\n".join(problems), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
