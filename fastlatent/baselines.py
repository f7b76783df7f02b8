"""``python -m fastlatent.baselines``: traditional sequential recommenders (RecBole's SASRec,
GRU4Rec, Caser) trained and scored on exactly the rows the LLM trains and is scored on.

- Rows: :func:`fastlatent.pipeline.choose_splits`, as the trainer chooses them (same
  ``--data``, splits, ``--eval-limit``, ``--seed``). Each training row (history ids ->
  target id) is one RecBole training sequence; the early-stopping rows (the validation
  split, or the trainer's seeded 5% slice when training on ``valid``) are RecBole's
  valid file; the evaluation rows, in order, its test file.
- Evaluation: full ranking over the whole catalogue (every catalogue item is in RecBole's
  item vocabulary, padding excluded); a row's prediction is the first 10 distinct titles
  of the ranked items (the LLM's beams are distinct titles), scored by fastlatent's own
  metric code (a title match counts, so duplicate titles are treated alike for every
  method), with the same bootstrap intervals and popular/unpopular split.
- Training: RecBole's defaults for each model (loss CE without negative sampling,
  Adam 1e-3, batch 2048, at most 300 epochs), early stopping on NDCG@10 of the
  early-stopping rows (patience 10); histories at most 10 items long.

Outputs in ``--output-dir``: metrics.json (one entry per model and "popular", written
after each model; a model already there is not retrained), predictions.jsonl (the
trainer's schema, ``stage`` = model name), and recbole/ (atomic files, RecBole's log).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastlatent.data.example import Catalogue, Example
from fastlatent.errors import DataError, UserError
from fastlatent.metrics import normalize_title, rank_of_first_hit, summarize

# The three the paper compares with (tested), then RecBole sequential models that need
# nothing but the item sequence (and user id), checked by hand to train and rank here.
MODELS = {"sasrec": "SASRec", "gru4rec": "GRU4Rec", "caser": "Caser",
          "bert4rec": "BERT4Rec", "narm": "NARM", "stamp": "STAMP", "nextitnet": "NextItNet",
          "srgnn": "SRGNN", "gcsan": "GCSAN", "lightsans": "LightSANs", "core": "CORE"}
DEFAULT_MODELS = "sasrec,gru4rec,caser"
TOP_K = 10
MAX_HISTORY = 10
DATASET_NAME = "fastlatent"  # RecBole's dataset token: DIR/recbole/data/fastlatent/
BENCHMARK = ("train", "valid", "test")
DEFAULT_EPOCHS = 300  # RecBole's default epochs
DEFAULT_STOPPING_STEP = 10  # RecBole's default patience
VALID_METRIC = "NDCG@10"
PREDICT_BATCH = 512
DEFAULT_SEED = 42  # the trainer's default --seed, so the same rows are chosen
# Training and evaluation settings recorded beside each model's own hyper-parameters.
RECORDED_SETTINGS = ("epochs", "stopping_step", "eval_step", "train_batch_size", "learner",
                     "learning_rate", "weight_decay", "clip_grad_norm", "loss_type",
                     "train_neg_sample_args", "MAX_ITEM_LIST_LENGTH", "valid_metric",
                     "metrics", "topk", "eval_batch_size", "seed", "reproducibility")


@dataclass
class BaselineArgs:
    data: str = "movielens-100k"
    train_split: str = "train"
    eval_split: str = "test"
    models: tuple[str, ...] = ("sasrec", "gru4rec", "caser")
    output_dir: str = ""
    epochs: int = DEFAULT_EPOCHS
    stopping_step: int = DEFAULT_STOPPING_STEP
    seed: int = DEFAULT_SEED
    eval_limit: int = 0
    valid_limit: int = 0
    device: str = "cpu"
    overwrite: bool = False

    def settings(self) -> dict[str, Any]:
        """What decides the rows: an entry made with other settings is not reused."""
        return {"data": self.data, "train_split": self.train_split,
                "eval_split": self.eval_split, "eval_limit": self.eval_limit,
                "valid_limit": self.valid_limit, "seed": self.seed}


@dataclass(frozen=True)
class SequenceRow:
    """One RecBole row: a user token, the history's catalogue ids (oldest first), the
    target's catalogue id."""

    user: str
    items: tuple[int, ...]
    target: int


@dataclass
class SequenceRows:
    """The three benchmark files; ``test_rows[i]`` is the position in the evaluation rows
    of ``test[i]`` (rows with an empty history are not in ``test``: they are ranked by
    popularity). ``notes`` say what was dropped and why."""

    train: list[SequenceRow]
    valid: list[SequenceRow]
    test: list[SequenceRow]
    test_rows: list[int]
    notes: list[str] = field(default_factory=list)

    @property
    def longest_history(self) -> int:
        return max(len(row.items) for rows in (self.train, self.valid, self.test)
                   for row in rows)


class BaselineError(UserError, ValueError):
    """A flag or an input the baselines cannot use; the message names the fix."""


# ---------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    d = BaselineArgs()
    p = argparse.ArgumentParser(
        prog="python -m fastlatent.baselines",
        description="Train RecBole's sequential recommenders on the LLM's training rows and "
                    "score them on its evaluation rows with fastlatent's metrics.")
    p.add_argument("--data", default=d.data, help="data source, as for fastlatent.train: "
                   f"movielens-100k | synthetic | csv:DIR (default: {d.data})")
    p.add_argument("--train-split", default=d.train_split, help="split to train on, as for "
                   f"fastlatent.train ('valid' for amazon-cds) (default: {d.train_split})")
    p.add_argument("--eval-split", default=d.eval_split,
                   help=f"split to evaluate on (default: {d.eval_split})")
    p.add_argument("--models", default=DEFAULT_MODELS,
                   help=f"comma-separated models among {', '.join(MODELS)} "
                        f"(default: {DEFAULT_MODELS})")
    p.add_argument("--output-dir", required=True,
                   help="folder for metrics.json, predictions.jsonl and recbole/ (a rerun "
                        "there skips the models already in metrics.json)")
    p.add_argument("--epochs", type=int, default=d.epochs,
                   help=f"most training epochs per model (default: {d.epochs}, RecBole's)")
    p.add_argument("--stopping-step", type=int, default=d.stopping_step,
                   help="early stopping: epochs without a better validation NDCG@10 before "
                        f"training stops (default: {d.stopping_step}, RecBole's)")
    p.add_argument("--seed", type=int, default=d.seed,
                   help="seed of the row choice (as fastlatent.train's --seed) and of "
                        f"RecBole (default: {d.seed}, the trainer's)")
    p.add_argument("--eval-limit", type=int, default=d.eval_limit,
                   help="score a seeded sample of this many evaluation rows, as the "
                        "trainer's --eval-limit (0 = all, the trainer's default outside the "
                        "cpu preset; the cpu preset uses 100) (default: 0)")
    p.add_argument("--valid-limit", type=int, default=d.valid_limit,
                   help="early-stop on a seeded sample of this many rows, as the trainer's "
                        "--valid-limit (0 = all) (default: 0)")
    p.add_argument("--device", default=d.device,
                   help=f"cpu | cuda | cuda:N (default: {d.device})")
    p.add_argument("--overwrite", action="store_true",
                   help="retrain the listed models even when metrics.json has them")
    return p


def parse_models(text: str) -> tuple[str, ...]:
    """``"SASRec, gru4rec"`` -> ``("sasrec", "gru4rec")``: known names, each once."""
    names = [name.strip().lower() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in MODELS]
    if unknown or not names:
        raise BaselineError(f"--models {text!r}: expected names among {', '.join(MODELS)}, "
                            f"got {', '.join(unknown) or 'none'}")
    return tuple(dict.fromkeys(names))


def check_device(spec: str) -> None:
    """``cpu``, ``cuda`` or ``cuda:N`` (an available GPU)."""
    if spec == "cpu":
        return
    import torch

    kind, _, index = spec.partition(":")
    if kind != "cuda" or (index and not index.isdigit()):
        raise BaselineError(f"--device {spec!r}: expected cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise BaselineError(f"--device {spec!r}: no CUDA device is available; use --device cpu")
    if index and int(index) >= torch.cuda.device_count():
        raise BaselineError(f"--device {spec!r}: only {torch.cuda.device_count()} CUDA "
                            "devices are visible")


def parse_args(argv: Sequence[str] | None) -> BaselineArgs:
    ns = build_parser().parse_args(argv)
    args = BaselineArgs(data=ns.data, train_split=ns.train_split, eval_split=ns.eval_split,
                        models=parse_models(ns.models), output_dir=ns.output_dir,
                        epochs=ns.epochs, stopping_step=ns.stopping_step, seed=ns.seed,
                        eval_limit=ns.eval_limit, valid_limit=ns.valid_limit,
                        device=ns.device, overwrite=ns.overwrite)
    if args.epochs < 1:
        raise BaselineError(f"--epochs {args.epochs}: expected a positive integer")
    if args.stopping_step < 1:
        raise BaselineError(f"--stopping-step {args.stopping_step}: expected a positive "
                            "integer")
    for name in ("eval_limit", "valid_limit"):
        if getattr(args, name) < 0:
            raise BaselineError(f"--{name.replace('_', '-')} {getattr(args, name)}: expected "
                                "an integer >= 0 (0 = all rows)")
    check_device(args.device)
    return args


# ---------------------------------------------------------------- rows


def title_ids(catalogue: Catalogue) -> dict[str, int | None]:
    """Each catalogue title -> its item id, or None when several items share the title."""
    ids: dict[str, int | None] = {}
    for item, title in enumerate(catalogue.titles):
        ids[title] = None if title in ids else item
    return ids


def _id_of_title(title: str, by_title: dict[str, int | None], what: str) -> int:
    if title not in by_title:
        raise DataError(f"{what} {title!r} is not a catalogue title")
    item = by_title[title]
    if item is None:
        raise DataError(f"{what} {title!r} names several catalogue items (the data has no "
                        "ids to tell them apart; add history_item_id / item_id columns)")
    return item


def example_ids(ex: Example, catalogue: Catalogue, by_title: dict[str, int | None]
                ) -> tuple[tuple[int, ...], int]:
    """``(history ids, target id)`` of ``ex``: its own ids where the source gave them
    (checked against the catalogue), else its titles mapped to ids when unambiguous.

    Raises:
        DataError: an id outside the catalogue or naming another title, or a title that is
            not in the catalogue or names several items.
    """
    if ex.history_items is None:
        history = tuple(_id_of_title(t, by_title, "history title") for t in ex.history)
    else:
        if len(ex.history_items) != len(ex.history):
            raise DataError(f"expected one history id per history title, got "
                            f"{len(ex.history_items)} ids for {len(ex.history)} titles")
        for item, title in zip(ex.history_items, ex.history, strict=True):
            if not 0 <= item < len(catalogue) or catalogue.titles[item] != title:
                known = (repr(catalogue.titles[item]) if 0 <= item < len(catalogue)
                         else "not in the catalogue")
                raise DataError(f"history id {item} is {known}, but its history title is "
                                f"{title!r}")
        history = tuple(ex.history_items)
    if ex.target_item is None:
        target = _id_of_title(ex.target, by_title, "target title")
    elif not 0 <= ex.target_item < len(catalogue):
        raise DataError(f"target id {ex.target_item} is not in the catalogue")
    else:
        target = ex.target_item
    return history[-MAX_HISTORY:], target


def sequence_rows(train: Sequence[Example], valid: Sequence[Example],
                  evaluation: Sequence[Example], catalogue: Catalogue) -> SequenceRows:
    """The three benchmark files' rows. Users become tokens ``u0, u1, ...`` in order of
    first appearance. A training or early-stopping row with an empty history cannot be a
    RecBole sequence and is dropped (counted in ``notes``); an evaluation row with one is
    left out of ``test`` and ranked by popularity (noted).

    Raises:
        DataError: a row whose ids cannot be resolved (naming the split and row), or no
            training, early-stopping or evaluation row with a history.
    """
    by_title = title_ids(catalogue)
    users: dict[str, str] = {}
    out: dict[str, list[SequenceRow]] = {"train": [], "valid": [], "test": []}
    test_rows, notes, by_titles = [], [], 0
    for split, rows in (("train", train), ("valid", valid), ("test", evaluation)):
        empty = []
        for i, ex in enumerate(rows):
            by_titles += (ex.history_items is None and bool(ex.history)) or ex.target_item is None
            try:
                history, target = example_ids(ex, catalogue, by_title)
            except DataError as err:
                raise DataError(f"{_describe(split)} row {i + 1} (user {ex.user!r}): {err}"
                                ) from None
            if not history:
                empty.append(i + 1)
                continue
            user = users.setdefault(ex.user, f"u{len(users)}")
            out[split].append(SequenceRow(user=user, items=history, target=target))
            if split == "test":
                test_rows.append(i)
        if empty and len(empty) == len(rows):
            raise DataError(f"every {_describe(split)} row has an empty history; RecBole's "
                            "models need at least one history item")
        if empty:
            fate = ("ranked by popularity (the 10 most frequent training targets), since "
                    "RecBole's models need a history" if split == "test" else
                    "dropped (a RecBole sequence needs at least one history item)")
            notes.append(f"{len(empty)} of {len(rows)} {_describe(split)} rows have an empty "
                         f"history (rows {_shorten(empty)}): {fate}")
    if by_titles:
        notes.append(f"{by_titles} rows carry no item ids: their titles were mapped to "
                     "catalogue ids (each such title names one catalogue item)")
    return SequenceRows(out["train"], out["valid"], out["test"], test_rows, notes)


def _describe(split: str) -> str:
    return {"train": "training", "valid": "early-stopping", "test": "evaluation"}[split]


def _shorten(numbers: list[int], n: int = 5) -> str:
    shown = ", ".join(map(str, numbers[:n]))
    return shown + (f", ... ({len(numbers)} in all)" if len(numbers) > n else "")


def write_atomic_files(rows: SequenceRows, folder: Path, num_items: int) -> None:
    """RecBole's benchmark files ``NAME.{train,valid,test}.inter`` (user, history ids,
    target id) and ``NAME.item`` listing every catalogue id, so that the full ranking
    covers the whole catalogue (items no row names too)."""
    folder.mkdir(parents=True, exist_ok=True)
    for split in BENCHMARK:
        lines = ["user_id:token\titem_id_list:token_seq\titem_id:token\n"]
        lines += [f"{r.user}\t{' '.join(map(str, r.items))}\t{r.target}\n"
                  for r in getattr(rows, split)]
        (folder / f"{DATASET_NAME}.{split}.inter").write_text("".join(lines), encoding="utf-8")
    (folder / f"{DATASET_NAME}.item").write_text(
        "item_id:token\n" + "".join(f"{i}\n" for i in range(num_items)), encoding="utf-8")


# ---------------------------------------------------------------- ranking and metrics


def distinct_top_titles(ranked_items: Iterable[int], titles: Sequence[str],
                        k: int = TOP_K) -> list[str]:
    """The first ``k`` distinct titles (by :func:`normalize_title`) of catalogue items in
    rank order: as the LLM's beams, a list of distinct titles (fewer when the items run
    out). ``ranked_items`` is read only as far as needed."""
    seen, out = set(), []
    for item in ranked_items:
        key = normalize_title(titles[item])
        if key not in seen:
            seen.add(key)
            out.append(titles[item])
            if len(out) == k:
                break
    return out


def top_titles(scores, id_tokens: Sequence[str], titles: Sequence[str],
               k: int = TOP_K) -> list[list[str]]:
    """Each row's prediction from ``full_sort_predict`` scores ``[rows, items]`` over
    RecBole's internal ids: items by descending score (ties: the lower internal id first),
    RecBole's padding id 0 left out, the others mapped back to catalogue ids through
    ``id_tokens`` (``dataset.field2id_token["item_id"]``: internal id -> our id as text),
    then the first ``k`` distinct titles."""
    import torch

    order = torch.argsort(torch.as_tensor(scores), dim=1, descending=True, stable=True)
    return [distinct_top_titles((int(id_tokens[i]) for i in row if i != 0), titles, k)
            for row in order.tolist()]


def score_predictions(stage: str, examples: Sequence[Example],
                      predictions: Sequence[Sequence[str]], popular: set, *, seed: int
                      ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Metrics (:func:`fastlatent.metrics.summarize`, with the popular/unpopular split)
    and prediction rows in the trainer's schema for one method's title lists."""
    from fastlatent.data.sources import item_key

    if len(predictions) != len(examples):
        raise ValueError(f"expected one prediction list per row ({len(examples)}), got "
                         f"{len(predictions)}")
    ranks = [rank_of_first_hit(titles, ex.target)
             for ex, titles in zip(examples, predictions, strict=True)]
    metrics = summarize(ranks, [item_key(ex) in popular for ex in examples], seed=seed)
    rows = [{"stage": stage, "user": ex.user, "history": list(ex.history), "target": ex.target,
             "rank": rank, "predictions": list(titles)}
            for ex, rank, titles in zip(examples, ranks, predictions, strict=True)]
    return metrics, rows


# ---------------------------------------------------------------- RecBole


def recbole_config_dict(args: BaselineArgs, work: Path, max_len: int) -> dict[str, Any]:
    """What we set in RecBole's config; everything else is RecBole's default."""
    return {
        "data_path": str(work / "data"), "checkpoint_dir": str(work / "saved"),
        "benchmark_filename": list(BENCHMARK), "alias_of_item_id": ["item_id_list"],
        "load_col": {"inter": ["user_id", "item_id_list", "item_id"], "item": ["item_id"]},
        "MAX_ITEM_LIST_LENGTH": max_len, "train_neg_sample_args": None,
        "eval_args": {"mode": "full", "order": "TO", "split": None, "group_by": None},
        "repeatable": True, "metrics": ["Hit", "NDCG"], "topk": [TOP_K],
        "valid_metric": VALID_METRIC, "epochs": args.epochs,
        "stopping_step": args.stopping_step, "seed": args.seed, "reproducibility": True,
        "use_gpu": args.device != "cpu", "show_progress": False, "save_dataset": False,
        "save_dataloaders": False, "log_wandb": False,
    }


def resolved_hyperparameters(config, class_name: str) -> dict[str, Any]:
    """The model's own hyper-parameters (the keys of RecBole's properties/model/NAME.yaml)
    and the training settings, as RecBole resolved them."""
    import recbole
    import yaml

    path = Path(recbole.__file__).parent / "properties" / "model" / f"{class_name}.yaml"
    keys = list(yaml.safe_load(path.read_text(encoding="utf-8")) or {})
    return {key: config[key] for key in dict.fromkeys(keys + list(RECORDED_SETTINGS))}


def train_and_rank(name: str, args: BaselineArgs, rows: SequenceRows, work: Path,
                   titles: Sequence[str]) -> tuple[list[list[str]], dict[str, Any]]:
    """Train ``name`` with early stopping, reload its best epoch and rank the test file.
    Returns a title list per test row and the entry's training facts."""
    import torch

    from fastlatent.recbole_compat import (
        import_recbole,
        in_memory_trainer,
        make_recbole_config,
        recbole_session,
    )

    start = time.time()
    with recbole_session(work):
        recbole = import_recbole()
        model_class = getattr(recbole["sequential_models"], MODELS[name])
        max_len = min(MAX_HISTORY, rows.longest_history)
        config = make_recbole_config(recbole["Config"], model_class, DATASET_NAME,
                                     recbole_config_dict(args, work, max_len), args.device)
        recbole["init_seed"](args.seed, True)
        dataset = recbole["create_dataset"](config)
        train_data, valid_data, test_data = recbole["data_preparation"](config, dataset)
        recbole["init_seed"](args.seed, True)
        model = model_class(config, train_data._dataset).to(config["device"])
        trainer = in_memory_trainer()(config, model)

        def progress(epoch: int, score: float) -> None:
            best = " (best)" if trainer.best_epoch == epoch else ""
            loss = trainer.train_loss_dict[epoch] / max(1, len(train_data))  # batch mean
            print(f"{name} epoch {epoch + 1}/{args.epochs}: train loss {loss:.4f}, valid "
                  f"{VALID_METRIC.lower()} "
                  f"{score:.4f}{best}", flush=True)

        _, best_result = trainer.fit(train_data, valid_data, verbose=True, saved=True,
                                     show_progress=False, callback_fn=progress)
        epochs_run = len(trainer.train_loss_dict)
        trainer.load_best()
        model.eval()
        id_tokens = dataset.field2id_token["item_id"]
        inter = test_data._dataset.inter_feat
        targets = [int(id_tokens[i]) for i in inter["item_id"].tolist()]
        if targets != [r.target for r in rows.test]:
            raise RuntimeError("RecBole's test rows are not the evaluation rows in order")
        predictions = []
        with torch.no_grad():
            for begin in range(0, len(inter), PREDICT_BATCH):
                batch = inter[begin:begin + PREDICT_BATCH].to(config["device"])
                scores = model.full_sort_predict(batch).float().cpu()
                predictions += top_titles(scores, id_tokens, titles)
        facts = {"epochs": args.epochs, "epochs_run": epochs_run,
                 "best_epoch": trainer.best_epoch + 1,
                 "best_valid": {k: float(v) for k, v in (best_result or {}).items()},
                 "seconds": round(time.time() - start, 1),
                 "hyperparameters": resolved_hyperparameters(config, MODELS[name])}
    return predictions, facts


# ---------------------------------------------------------------- the run


def read_metrics(out: Path) -> dict[str, dict[str, Any]]:
    path = out / "metrics.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise BaselineError(f"{path}: not valid JSON ({err}); remove it or use another "
                            "--output-dir") from None


def read_predictions(out: Path) -> list[dict[str, Any]]:
    path = out / "predictions.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def kept_entries(metrics: dict[str, dict[str, Any]], args: BaselineArgs
                 ) -> dict[str, dict[str, Any]]:
    """The finished models of an earlier run that this run keeps: those made with the same
    settings (with ``--overwrite`` the others are dropped, and the listed models too)."""
    kept = {}
    for name, entry in metrics.items():
        if name not in MODELS:
            continue
        if entry.get("settings") != args.settings():
            if not args.overwrite:
                raise BaselineError(
                    f"{args.output_dir}/metrics.json has {name} from other settings "
                    f"({entry.get('settings')}, now {args.settings()}); use --overwrite "
                    "(drops them) or another --output-dir")
            continue
        if not (args.overwrite and name in args.models):
            kept[name] = entry
    return kept


@dataclass
class Plan:
    """Everything a run needs once its inputs are checked: the rows, the popularity
    baseline, the finished entries to keep and the models to train."""

    args: BaselineArgs
    out: Path
    titles: tuple[str, ...]
    evaluation: list[Example]
    rows: SequenceRows
    popular: set
    baseline: Any  # fastlatent.evaluate.EvalResult
    fallback: list[str]  # the prediction of an evaluation row with an empty history
    done: dict[str, dict[str, Any]]
    done_predictions: list[dict[str, Any]]
    todo: list[str]


def prepare(args: BaselineArgs) -> Plan:
    """Check the setup and the inputs and choose the rows, loading nothing of RecBole.

    Raises:
        UserError: RecBole or pandas unusable, a dataset or split that cannot be read or
            has no rows, ids that cannot be resolved, an output folder from other settings.
    """
    from fastlatent.config import build_config
    from fastlatent.data.sources import catalogue_frequencies, load_dataset
    from fastlatent.evaluate import most_frequent_titles, popularity_baseline
    from fastlatent.metrics import popular_items
    from fastlatent.pipeline import choose_splits
    from fastlatent.recbole_compat import check_pandas, check_recbole_installed

    out = Path(args.output_dir)
    done = kept_entries(read_metrics(out), args)
    saved = [row for row in read_predictions(out) if row["stage"] in done]
    done = {name: entry for name, entry in done.items()  # an entry needs its rows
            if any(row["stage"] == name for row in saved)}
    todo = [name for name in args.models if name not in done]
    if todo:
        check_recbole_installed()
        check_pandas()
    cfg = build_config("", args.settings())  # the trainer's defaults, then these rows' flags
    dataset = load_dataset(args.data, seed=args.seed)
    for flag, split in (("--train-split", args.train_split), ("--eval-split", args.eval_split)):
        if not dataset.split(split):
            raise BaselineError(f"{flag} {split!r}: the split has no rows (--data {args.data})")
    try:
        splits = choose_splits(dataset, cfg)
    except ValueError as err:  # too few rows to hold out an early-stopping slice
        raise BaselineError(f"--train-split {args.train_split!r}: {err}") from None
    rows = sequence_rows(splits.train, splits.valid, splits.eval, dataset.catalogue)
    popular = popular_items(catalogue_frequencies(splits.train, dataset.catalogue))
    return Plan(args=args, out=out, titles=dataset.catalogue.titles, evaluation=splits.eval,
                rows=rows, popular=popular,
                baseline=popularity_baseline(splits.train, splits.eval, popular=popular,
                                             seed=args.seed),
                fallback=most_frequent_titles(splits.train, TOP_K), done=done,
                done_predictions=[row for row in saved if row["stage"] in done], todo=todo)


def execute(plan: Plan) -> dict[str, dict[str, Any]]:
    """Train and score each model of ``plan.todo``, writing metrics.json and
    predictions.jsonl after each; returns every entry, "popular" last."""
    from fastlatent.metrics import BASELINE
    from fastlatent.pipeline import with_baseline_relation
    from fastlatent.runlog import write_json_atomic, write_jsonl_atomic

    args, out, rows, baseline = plan.args, plan.out, plan.rows, plan.baseline
    metrics, predictions = dict(plan.done), list(plan.done_predictions)
    popular_rows = [{"stage": BASELINE, **row} for row in baseline.predictions]

    def write() -> None:
        write_json_atomic(out / "metrics.json", {**metrics, BASELINE: baseline.metrics})
        write_jsonl_atomic(out / "predictions.jsonl", predictions + popular_rows)

    out.mkdir(parents=True, exist_ok=True)
    for note in rows.notes:
        print(f"note: {note}")
    for name in args.models:
        if name in plan.done:
            print(f"{name}: done already (in {out / 'metrics.json'}; --overwrite retrains it)")
    work = out / "recbole"
    if plan.todo:
        write_atomic_files(rows, work / "data" / DATASET_NAME, len(plan.titles))
    for name in plan.todo:
        print(f"{name}: training on {len(rows.train)} sequences, early stopping on "
              f"{len(rows.valid)}, ranking {len(plan.evaluation)} rows over "
              f"{len(plan.titles)} items", flush=True)
        ranked, facts = train_and_rank(name, args, rows, work, plan.titles)
        per_row = [list(plan.fallback) for _ in plan.evaluation]
        for position, titles in zip(rows.test_rows, ranked, strict=True):
            per_row[position] = titles
        scores, prediction_rows = score_predictions(name, plan.evaluation, per_row,
                                                    plan.popular, seed=args.seed)
        metrics[name] = {**with_baseline_relation(scores, baseline.metrics), **facts,
                         "settings": args.settings(), "notes": list(rows.notes)}
        predictions.extend(prediction_rows)
        write()
    write()
    return {**metrics, BASELINE: baseline.metrics}


def main(argv: Sequence[str] | None = None) -> int:
    """Exit codes: 0 done, 2 bad flags, setup or input (one line on stderr, before any
    training), 1 an expected error during training."""
    try:
        plan = prepare(parse_args(argv))
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        metrics = execute(plan)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    from fastlatent.train import format_table

    print(format_table(metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())
