"""The stages in order, on one dataset and one model: SFT -> RL -> evaluation."""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from fastlatent import distributed
from fastlatent.checkpoint import MODEL_DIR, LoadedCheckpoint, newest_loadable
from fastlatent.config import Config
from fastlatent.data.checks import report_data
from fastlatent.data.example import Dataset, Example
from fastlatent.data.prompt import TEMPLATES, PromptBuilder
from fastlatent.data.sampling import seeded_sample
from fastlatent.data.sources import catalogue_frequencies, holdout_slice, load_dataset
from fastlatent.engine.decoder import UnsupportedModelError
from fastlatent.errors import ModelLoadError
from fastlatent.evaluate import (
    build_title_trie,
    catalogue_record,
    evaluate,
    popularity_baseline,
    target_nll,
)
from fastlatent.metrics import BASELINE, interval_relation, popular_items
from fastlatent.model.loading import load_llm
from fastlatent.model.lora import (
    LoraSettings,
    add_lora,
    load_adapters,
    lora_layers,
    merge_lora,
)
from fastlatent.model.quantize import quantization_of, quantize_llm
from fastlatent.model.reasoner import LatentReasoner, ReasonerConfig
from fastlatent.rl import load_rl_weights, run_rl
from fastlatent.runlog import StepLog, write_json_atomic, write_jsonl_atomic
from fastlatent.sft import run_sft

PROGRESS_FILE = "progress.json"


@dataclass
class Splits:
    train: list[Example]
    valid: list[Example]
    eval: list[Example]


def choose_splits(dataset: Dataset, cfg: Config) -> Splits:
    """Training, early-stopping and evaluation rows. When the validation split is the
    training split (or there is none), early stopping uses a seeded 5% slice held out of
    the training rows; the evaluation split is never used for it."""
    d, seed = cfg.data, cfg.run.seed
    train = dataset.split(d.train_split)
    evaluation = dataset.split(d.eval_split)
    if d.train_split == "valid" or "valid" not in dataset.splits or d.eval_split == "valid":
        train, valid = holdout_slice(train, fraction=0.05, seed=seed)
    else:
        valid = dataset.split("valid")
    return Splits(train, seeded_sample(valid, d.valid_limit, seed),
                  seeded_sample(evaluation, d.eval_limit, seed))


def build_reasoner(cfg: Config, dataset: Dataset, device: torch.device) -> LatentReasoner:
    if cfg.run.checkpoint:
        reasoner = LatentReasoner.load(cfg.run.checkpoint, dtype=cfg.model.dtype)
    else:
        m = cfg.model
        texts = list(dataset.catalogue.distinct_titles)
        template = TEMPLATES[cfg.data.template]  # so tiny-random's BPE learns the prompt too
        words = dict(domain=dataset.domain, release_domain=cfg.data.release_domain)
        texts += [template.preamble.format(**words),
                  template.user_input.format(history="", **words)] * 8
        try:
            llm, tokenizer = load_llm(m.model, dtype=m.dtype, tokenizer_texts=texts,
                                      seed=cfg.run.seed)
        except (OSError, ValueError) as err:  # missing file, offline hub id, bad format
            raise ModelLoadError(f"--model {m.model!r} cannot be loaded: {err}") from err
        reasoner = LatentReasoner.build(llm, tokenizer, ReasonerConfig(
            latent=m.latent, ratt_heads=m.ratt_heads, ratt_rope_base=m.ratt_rope_base,
            num_latents=m.num_latents))
    reasoner = reasoner.to(device)
    distributed.broadcast_parameters(reasoner)  # every process starts from rank 0's weights
    return reasoner


def with_baseline_relation(metrics: dict[str, Any], baseline: dict[str, Any],
                           name: str = BASELINE) -> dict[str, Any]:
    """Add ``hr@10_vs_<name>``: where the stage's HR@10 interval lies against the
    baseline's ("above", "overlaps", "below"); ``name`` defaults to the popularity
    baseline."""
    relation = interval_relation(metrics["hr@10_ci"], baseline["hr@10_ci"])
    return {**metrics, f"hr@10_vs_{name}": relation}


def with_baseline_relations(metrics: dict[str, Any], baselines: dict[str, dict[str, Any]]
                            ) -> dict[str, Any]:
    """:func:`with_baseline_relation` against each of ``baselines`` (name -> metrics)."""
    for name, baseline in baselines.items():
        metrics = with_baseline_relation(metrics, baseline, name)
    return metrics


def traditional_baselines(cfg: Config, dataset: Dataset, splits: Splits, out: Path,
                          notes: list[str]) -> dict[str, dict[str, Any]]:
    """``--baselines``: RecBole's models on the rows the baselines command takes for this
    run's data, splits, evaluation rows and seed (trained once per rows, then cached;
    :mod:`fastlatent.baseline_cache`). Rank 0 computes, every rank gets the entries. A
    baseline that fails is a note; the run goes on without it."""
    from fastlatent.baseline_cache import BaselineRows, cached_baselines, resolve_models

    models, note = resolve_models(cfg.eval.baselines)
    entries: dict[str, dict[str, Any]] = {}
    if distributed.is_main() and note:
        tqdm.write(note)
    if distributed.is_main() and models:
        early_stopping = choose_splits(dataset, _with_all_valid_rows(cfg)).valid
        rows = BaselineRows(data=cfg.data.data, train_split=cfg.data.train_split,
                            eval_split=cfg.data.eval_split, eval_limit=cfg.data.eval_limit,
                            seed=cfg.run.seed, epochs=cfg.eval.baseline_epochs,
                            train=splits.train, valid=early_stopping,
                            evaluation=splits.eval)
        outcome = cached_baselines(rows, models, out / "baselines.log", announce=tqdm.write)
        if outcome.error:
            message = f"baselines {', '.join(models)} not reported: {outcome.error}"
            tqdm.write(f"note: {message}")
            notes.append(message)
        else:
            entries = outcome.entries
            where = "from the cache" if outcome.cached else f"in {outcome.seconds:.0f} s"
            tqdm.write(f"baselines: {', '.join(models)} on the same {len(splits.eval)} rows "
                       f"({where}): " + ", ".join(
                           f"{name} HR@10 {m['hr@10']:.4f}" for name, m in entries.items()))
    return distributed.broadcast(entries)


def _numbers(entry: dict[str, Any]) -> dict[str, Any]:
    """The numeric fields of a metrics entry (numbers and intervals), for log.jsonl."""
    def numeric(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    return {k: v for k, v in entry.items()
            if numeric(v) or (isinstance(v, list) and v and all(map(numeric, v)))}


def _with_all_valid_rows(cfg: Config) -> Config:
    """``cfg`` with ``--valid-limit 0``: the baselines command early-stops on every
    held-out row (the training and evaluation rows do not depend on the limit)."""
    import copy

    whole = copy.deepcopy(cfg)
    whole.data.valid_limit = 0
    return whole


@dataclass
class Progress:
    """The milestones a run has finished ("sft:trained", "rl:trained") and the metrics of
    the evaluations it has done, kept in OUTPUT_DIR/progress.json so that ``--resume``
    skips them."""

    path: Path
    done: list[str]
    metrics: dict[str, dict[str, Any]]

    @classmethod
    def open(cls, out: Path, *, resume: bool) -> Progress:
        path = out / PROGRESS_FILE
        if resume and path.is_file():
            saved = json.loads(path.read_text(encoding="utf-8"))
            return cls(path, saved["done"], saved["metrics"])
        return cls(path, [], {})

    def finished(self, milestone: str) -> None:
        self.done.append(milestone)
        self._write()

    def evaluated(self, stage: str, metrics: dict[str, Any]) -> None:
        self.metrics[stage] = metrics
        self._write()

    def _write(self) -> None:
        if distributed.is_main():
            write_json_atomic(self.path, {"done": self.done, "metrics": self.metrics})


def saved_predictions(out: Path, stages: Iterable[str]) -> list[dict[str, Any]]:
    """The prediction rows of the evaluations an interrupted run already finished."""
    path, keep = out / "predictions.jsonl", set(stages)
    if not keep or not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    return [row for row in rows if row["stage"] in keep]


def run_pipeline(cfg: Config, out: Path, device: torch.device, log: StepLog,
                 notes: list[str] | None = None, *, resume: bool = False
                 ) -> dict[str, dict[str, Any]]:
    """Run ``cfg.run.stage``; returns metrics keyed by the stage after which they were
    taken, plus ``"popular"``, the popularity baseline on the same rows. Notes for the
    manifest (e.g. a fitted warm-up) are appended to ``notes``. With ``resume``, finished
    stages and evaluations are skipped and an interrupted stage continues from the newest
    complete training checkpoint in ``out``."""
    notes = [] if notes is None else notes
    seed, stage, dtype = cfg.run.seed, cfg.run.stage, cfg.model.dtype
    progress = Progress.open(out, resume=resume)
    loaded = newest_loadable(out, tqdm.write) if resume else None

    def resumed(stage_name: str) -> LoadedCheckpoint | None:
        return loaded if loaded is not None and loaded.state.stage == stage_name else None

    if stage in ("rl", "eval") and not cfg.run.checkpoint:
        note = (f"--stage {stage} without --checkpoint starts from the base model "
                f"{cfg.model.model!r}, not from an SFT checkpoint")
        tqdm.write(f"note: {note}")
        notes.append(note)
    dataset = load_dataset(cfg.data.data, seed=seed)
    splits = choose_splits(dataset, cfg)
    notes.extend(report_data(dataset, splits.train, splits.eval, cfg.data, log))
    sft_resume = resumed("sft") if stage in ("sft", "all") else None
    if stage in ("sft", "all") and "sft:trained" in progress.done:
        tqdm.write("resume: SFT already trained; loading its best checkpoint")
        reasoner = LatentReasoner.load(out / "sft", dtype=dtype).to(device)
    elif sft_resume is not None and cfg.sft.sft_lora_r > 0:
        # LoRA: the frozen base as the run built it, then the checkpoint's adapters
        reasoner = build_reasoner(cfg, dataset, device)
        add_lora_for_sft(reasoner, cfg)
        load_adapters(reasoner.llm, sft_resume.path / MODEL_DIR)
        if reasoner.ratt is not None:
            reasoner.load_ratt(sft_resume.path / MODEL_DIR)
    elif sft_resume is not None:
        reasoner = LatentReasoner.load(sft_resume.path / MODEL_DIR, dtype=dtype).to(device)
    else:
        reasoner = build_reasoner(cfg, dataset, device)
    builder = PromptBuilder(reasoner.tokenizer, template=cfg.data.template,
                            domain=dataset.domain, release_domain=cfg.data.release_domain,
                            use_thought=reasoner.uses_latent)
    trie = build_title_trie(builder, dataset.catalogue)
    reasoner.catalogue = catalogue_record(builder, dataset.catalogue)
    if stage in ("rl", "eval"):
        quantize_base(reasoner, cfg, out, log, source=cfg.run.checkpoint or None)
    popular = popular_items(catalogue_frequencies(splits.train, dataset.catalogue))
    log.write("data", "splits", train=len(splits.train), valid=len(splits.valid),
              eval=len(splits.eval), catalogue=len(dataset.catalogue), titles=len(trie))
    baseline = popularity_baseline(splits.train, splits.eval, popular=popular, seed=seed)
    traditional = traditional_baselines(cfg, dataset, splits, out, notes)
    baselines = {BASELINE: baseline.metrics, **traditional}
    metrics: dict[str, dict[str, Any]] = {**baselines, **progress.metrics}
    predictions = saved_predictions(out, progress.metrics)
    for name, entry in baselines.items():
        log.write(name, "eval", **_numbers(entry))
    train_kwargs = dict(grad_clip=cfg.train.grad_clip, output_dir=out, log=log, seed=seed,
                        save_every=cfg.train.save_every,
                        max_nonfinite_steps=cfg.train.max_nonfinite_steps)

    def run_eval(name: str) -> None:
        if name in progress.metrics:
            tqdm.write(f"resume: evaluation after {name} already done")
            return
        result = evaluate(reasoner, splits.eval, builder, trie, cfg.eval, popular=popular,
                          seed=seed, desc=f"eval after {name}")
        stage_metrics = with_baseline_relations(result.metrics, baselines)
        try:
            nll = target_nll(reasoner, splits.eval, builder, cfg.eval.eval_batch_size)
        except UnsupportedModelError:
            nll = [None] * len(splits.eval)
        else:
            stage_metrics["target_nll"] = sum(nll) / len(nll)
        metrics[name] = stage_metrics
        predictions.extend({"stage": name, **row, "target_nll": v}
                           for row, v in zip(result.predictions, nll, strict=True))
        if distributed.is_main():
            write_jsonl_atomic(out / "predictions.jsonl", predictions)
        progress.evaluated(name, stage_metrics)
        log.write(name, "eval", **stage_metrics)

    if stage in ("sft", "all"):
        if "sft:trained" not in progress.done:
            if sft_resume is None:
                seed_everything(seed)
            if cfg.sft.sft_lora_r > 0 and not lora_layers(reasoner.llm):
                count = add_lora_for_sft(reasoner, cfg)
                log.write("sft", "lora", layers=count, r=cfg.sft.sft_lora_r,
                          alpha=cfg.sft.sft_lora_alpha, dropout=cfg.sft.sft_lora_dropout,
                          base_quant=cfg.model.base_quant)
            encode = builder.encode
            train = [encode(ex) for ex in seeded_sample(splits.train, cfg.data.sft_limit, seed)]
            valid = [encode(ex) for ex in splits.valid]
            result = run_sft(reasoner, train, valid, cfg.sft, resume=sft_resume, **train_kwargs)
            notes.extend(result.notes)
            if result.epochs_run - 1 != result.best_epoch:
                tqdm.write(f"SFT: reloading the best checkpoint (epoch {result.best_epoch + 1})")
                reasoner = LatentReasoner.load(result.checkpoint, dtype=dtype).to(device)
            progress.finished("sft:trained")
        merge_lora(reasoner.llm)  # RL and evaluation see a plain model (what sft/ holds)
        quantize_base(reasoner, cfg, out, log, source=out / "sft")
        run_eval("sft")
    if stage == "all" and reasoner.ratt is None:
        note = (f"RL skipped: latent={reasoner.config.latent!r} has no LatentRATT to train "
                "(an SFT-only variant)")
        tqdm.write(note)
        notes.append(note)
    elif stage in ("rl", "all"):
        if "rl:trained" in progress.done:
            tqdm.write("resume: RL already trained; loading its checkpoint")
            load_rl_weights(reasoner, out / "rl", cfg.rl)
        else:
            rl_resume = resumed("rl")
            if rl_resume is None:
                seed_everything(seed + 1)
            prompts = [builder.encode(ex)
                       for ex in seeded_sample(splits.train, cfg.data.rl_limit, seed + 1)]
            rl_result = run_rl(reasoner, prompts, cfg.rl, resume=rl_resume, trie=trie,
                               **train_kwargs)
            notes.extend(rl_result.notes)
            progress.finished("rl:trained")
        run_eval("rl")
    if stage == "eval":
        run_eval("eval")
    return metrics


def add_lora_for_sft(reasoner: LatentReasoner, cfg: Config) -> int:
    """``--sft-lora-r``: adapters on the projections; with ``--base-quant`` over the
    quantised base (QLoRA: the base is frozen anyway, so it may as well be small)."""
    if cfg.model.base_quant != "none":
        quantize_llm(reasoner.llm, cfg.model.base_quant, source=None)
    return add_lora(reasoner.llm, LoraSettings(cfg.sft.sft_lora_r, cfg.sft.sft_lora_alpha,
                                               cfg.sft.sft_lora_dropout))


def quantize_base(reasoner: LatentReasoner, cfg: Config, out: Path, log: StepLog, *,
                  source: str | Path | None) -> None:
    """``--base-quant``: the frozen LLM in 8-bit or NF4 for RL and evaluation (after SFT,
    which trains in full precision). ``source``: a saved model holding the full-precision
    LLM (what saving the quantised model writes); for a base model without one, it is
    saved to OUTPUT_DIR/base first."""
    mode = cfg.model.base_quant
    if mode == "none" or quantization_of(reasoner.llm) is not None:
        return
    if source is None:
        source = out / "base"
        if distributed.is_main():
            reasoner.save(source)
        distributed.barrier()
    count = quantize_llm(reasoner.llm, mode, source=source)
    log.write("model", "quantized", mode=mode, layers=count, source=str(source))
    tqdm.write(f"--base-quant {mode}: {count} linear layers of the frozen LLM quantised "
               "(bitsandbytes) for RL and evaluation")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch; each training stage starts from its own seed, so a
    resumed run's stage starts as the uninterrupted run's did."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
