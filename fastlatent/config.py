"""Run configuration: dataclasses whose fields become the CLI's flags, and the presets.

Each field's ``metadata["help"]`` is its flag's help text; ``train.py`` builds one
argparse group per dataclass. Precedence: dataclass defaults < preset < explicit flags.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastlatent.errors import UserError

WARMUP_FITS = ("fitted", "as-given")


def _f(default: Any, help: str, **extra: Any) -> Any:
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class DataConfig:
    data: str = _f("movielens-100k", "data source: movielens-100k | synthetic | csv:DIR "
                   "(the BIGRec/D3/LatentR3 layout DIR/{train,valid,test}/*.csv + DIR/info/*.txt)")
    train_split: str = _f("train", "split to train on (use 'valid' for ../shared/data/amazon-cds, "
                          "which has no train split)")
    eval_split: str = _f("test", "split to evaluate on")
    template: str = _f("default", "prompt template: default (our wording, names the domain) | "
                       "latentr3 (the release's exact strings, for reproduction)",
                       choices=("default", "latentr3"))
    release_domain: str = _f("musics", "the domain word inside the latentr3 template's strings "
                             "(the release's CDs word: 'musics', which its second string "
                             "pluralises to 'musicss'; name your category's word otherwise)")
    sft_limit: int = _f(0, "SFT on a seeded sample of this many training rows (0 = all)")
    rl_limit: int = _f(0, "RL on a seeded sample of this many training prompts (0 = all)")
    valid_limit: int = _f(0, "validation loss on a seeded sample of this many rows (0 = all)")
    eval_limit: int = _f(0, "evaluate a seeded sample of this many rows of the eval split "
                         "(0 = all; splits are time-sorted, so the first N would be biased)")
    strict: bool = _f(False, "make data warnings errors (history titles missing from the "
                      "catalogue, empty histories, evaluation rows also trained on)")


@dataclass
class ModelConfig:
    model: str = _f("smollm2-135m", "smollm2-135m (offline default) | tiny-random (tests) | "
                    "a hub id | a local HF directory | a .gguf file")
    latent: str = _f("ratt", "ratt: LatentRATT makes the thought vector r (LatentR3); "
                     "last-hidden: r = last prompt hidden state (ablation 'w/o LatentRATT'); "
                     "none: no thought token, plain SFT (ablation 'w/o reasoning' = BIGRec)",
                     choices=("ratt", "last-hidden", "none"))
    ratt_heads: int = _f(1, "LatentRATT attention heads (the release uses 1 head over d)")
    ratt_rope_base: float = _f(1000.0, "RoPE base of LatentRATT's own rotary embedding")
    num_latents: int = _f(1, "latent tokens before the answer (the paper's reasoning-length "
                          "study, App. E: N in {1,2,4,8}; the release uses 1): latent 1 is r "
                          "(noised in RL), each further one is the latent module applied "
                          "again with its query at the newest latent, without noise")
    dtype: str = _f("float32", "LLM weight dtype (LatentRATT always keeps fp32 master weights)",
                    choices=("float32", "bfloat16", "float16"))
    base_quant: str = _f("none", "the frozen LLM of RL and evaluation in 8-bit or NF4 "
                         "(bitsandbytes), and under SFT's adapters with --sft-lora-r "
                         "(QLoRA); full SFT trains in --dtype: none | int8 | nf4",
                         choices=("none", "int8", "nf4"))


@dataclass
class SFTConfig:
    sft_lr: float = _f(3e-4, "SFT learning rate (paper: from {3e-3, 3e-4, 3e-5})")
    sft_batch_size: int = _f(128, "SFT global batch (examples per optimiser step, over all "
                               "processes under torchrun)")
    sft_micro_batch: int = _f(8, "SFT examples per forward/backward (gradient "
                                "accumulation; dealt over the processes under torchrun)")
    sft_epochs: int = _f(3, "SFT epochs")
    sft_warmup_steps: int = _f(20, "SFT linear warm-up steps, then linear decay to 0")
    sft_warmup_fit: str = _f("fitted", "fitted: a warm-up at least as long as the SFT run "
                             "is shortened to the release's share of it (20/1155) | as-given: "
                             "--sft-warmup-steps is used as it is", choices=WARMUP_FITS)
    sft_weight_decay: float = _f(0.0, "AdamW weight decay in SFT")
    sft_lora_r: int = _f(0, "LoRA rank for SFT (PEFT adapters on the attention and MLP "
                         "projections; 0 = full fine-tuning); merged into the base before RL")
    sft_lora_alpha: float = _f(16.0, "LoRA alpha (the update is scaled by alpha / r)")
    sft_lora_dropout: float = _f(0.0, "dropout on the LoRA branch's input (0 keeps SFT "
                                 "deterministic)")
    optim: str = _f("adamw", "SFT optimiser: adamw (torch) | adamw8bit (bitsandbytes' 8-bit "
                    "AdamW: its two moments in 8 bits, 1/4 of the memory)",
                    choices=("adamw", "adamw8bit"))
    patience: int = _f(1, "early stopping: epochs without validation-loss improvement")


@dataclass
class RLConfig:
    rl_lr: float = _f(1e-4, "RL learning rate for LatentRATT (release: {1e-5,5e-5,1e-4,5e-4})")
    rl_batch_size: int = _f(32, "prompts per RL optimiser step (global: over all "
                              "processes under torchrun; the advantage pool)")
    rl_micro_batch: int = _f(0, "prompts per RL forward (0 = the whole optimiser batch, or "
                             "each process's share of it under torchrun); the "
                             "advantage pool is always the optimiser batch (micro-batching adds "
                             "one no-grad scoring pass)")
    rl_epochs: int = _f(1, "RL epochs over the training prompts")
    rl_max_steps: int = _f(0, "stop RL after this many optimiser steps (0 = no limit)")
    rl_warmup_steps: int = _f(200, "RL warm-up steps, then cosine decay")
    rl_warmup_fit: str = _f("fitted", "fitted: a warm-up at least as long as the RL run is "
                            "shortened to the release's share of it (200/1539) | as-given: "
                            "--rl-warmup-steps is used as it is (a warm-up as long as the run "
                            "never reaches --rl-lr)", choices=WARMUP_FITS)
    num_samples: int = _f(8, "K: rows per prompt, r^0 = r plus K-1 noisy r + sigma*eps "
                          "(the release's 8)")
    sigma: float = _f(1.5, "standard deviation of the Gaussian noise on the latent (absolute)")
    advantage: str = _f("batch", "batch: paper Eq. 7, baseline mean s^0 over the batch, L2 "
                        "norm of the pool | group: GRPO's group-relative advantage "
                        "(s - mean_k s) / (std_k s + 1e-4), the paper's 'w/o batch advantage' "
                        "ablation (needs K >= 2)", choices=("batch", "group"))
    reward: str = _f("ppl", "ppl: -PPL of the target under each latent row (the paper's "
                     "latent GRPO) | exact-match: each row writes a title by greedy decoding "
                     "constrained to the catalogue, reward 1 if it is the target, else 0, loss "
                     "over the written tokens (the original GRPO of the paper's App. F; use "
                     "with --advantage group; needs K >= 2)", choices=("ppl", "exact-match"))
    rl_trainable: str = _f("ratt", "what RL trains: ratt (LatentRATT only, the LLM frozen: the "
                           "paper's method) | all (the LLM too, at --rl-llm-lr: the original "
                           "GRPO's full-model tuning)", choices=("ratt", "all"))
    rl_llm_lr: float = _f(1e-5, "RL learning rate of the LLM with --rl-trainable all")


@dataclass
class TrainConfig:
    grad_clip: float = _f(1.0, "gradient-norm clip in both stages")
    max_nonfinite_steps: int = _f(3, "stop the run after this many optimiser steps in a row "
                                  "whose loss, reward, advantage or gradient norm is not "
                                  "finite (each such step is skipped, counted and logged)")
    save_every: int = _f(100, "write a resumable training checkpoint every N optimiser steps "
                         "(and at the end of each stage); 0 = only at the end of each stage")


@dataclass
class EvalConfig:
    num_beams: int = _f(10, "beams (and returned titles) in constrained beam search")
    length_penalty: float = _f(1.0, "beam score = sum log p / L^lp: 1.0 BIGRec, 0.0 D3")
    max_new_tokens: int = _f(128, "longest title (tokens) the beam search may write")
    eval_batch_size: int = _f(4, "users per beam-search batch")
    baselines: str = _f("auto", "traditional recommenders reported beside the popularity "
                        "baseline, trained by RecBole on the run's rows once and cached "
                        "(python -m fastlatent.baselines): auto (SASRec when the [baselines] "
                        "extra is installed) | none | comma-separated names (sasrec, "
                        "gru4rec, caser, ...)")
    baseline_epochs: int = _f(300, "most training epochs of each --baselines model, early-"
                              "stopped on the held-out rows (300: RecBole's default)")


@dataclass
class RunConfig:
    stage: str = _f("all", "sft | rl | eval | all (sft -> rl -> eval after each)",
                    choices=("sft", "rl", "eval", "all"))
    preset: str = _f("", "smoke (tiny random model + synthetic data, < 1 min) | cpu (demo "
                     "sized for 2 CPU cores; default without CUDA) | paper (the release's "
                     "setting; default with CUDA)", choices=("", "smoke", "cpu", "paper"))
    output_dir: str = _f("", "where checkpoints, logs and metrics go "
                         "(default runs/<preset>-<timestamp>)")
    checkpoint: str = _f("", "start from this saved LatentReasoner (e.g. OUTPUT_DIR/sft) "
                         "instead of --model; needed for --stage rl/eval on their own")
    allow_untrained: bool = _f(False, "let --stage rl start from a model that was not "
                               "fine-tuned (no --checkpoint): RL then trains LatentRATT over "
                               "an LLM that never saw the task")
    seed: int = _f(42, "seed for sampling, noise and initialisation")
    resume: bool = _f(False, "continue the run in --output-dir from its newest complete "
                      "checkpoint (same configuration; any stage)")
    overwrite: bool = _f(False, "start afresh in a non-empty --output-dir, deleting the "
                         "earlier run's outputs there")
    device: str = _f("auto", "auto | cpu | cuda | cuda:N (under torchrun: auto or cuda, "
                     "each process takes the GPU of its LOCAL_RANK)")
    config: str = _f("", "a YAML or JSON file of settings named like the flags (flat, or "
                     "grouped by section as in OUTPUT_DIR/config.yaml); precedence: defaults "
                     "< preset < this file < explicit flags")
    report_to: str = _f("auto", "tracker beside log.jsonl: auto (tensorboard if installed) | "
                        "none | tensorboard | wandb | trackio",
                        choices=("auto", "none", "tensorboard", "wandb", "trackio"))
    dist_timeout: float = _f(30.0, "under torchrun: minutes a process waits for the others "
                             "at a collective before the run stops with an error")


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)


# Presets only name the fields they change. "paper" = the release's hyper-parameters.
PRESETS: dict[str, dict[str, Any]] = {
    "smoke": dict(model="tiny-random", data="synthetic", sft_limit=0, sft_batch_size=16,
                  sft_micro_batch=8, sft_epochs=2, sft_warmup_steps=2, sft_lr=3e-3,
                  rl_batch_size=8, rl_max_steps=2, rl_warmup_steps=1, rl_lr=1e-3,
                  eval_limit=12, num_beams=5, max_new_tokens=24, save_every=10,
                  baseline_epochs=2),
    # Sized for 2 CPU cores with the engine (benchmarks/RESULTS.md: SmolLM2-135M there does
    # an SFT step of 32 examples in ~51 s, an RL step of 8 prompts x K=8 in ~12 s, and
    # beam search at ~1.25 s per user): 17 min 47 s measured alone.
    "cpu": dict(sft_limit=320, sft_batch_size=32, sft_micro_batch=8, sft_epochs=1,
                sft_warmup_steps=1, sft_lr=3e-4, valid_limit=32, rl_limit=80,
                rl_batch_size=8, rl_max_steps=10, rl_warmup_steps=1, rl_lr=1e-4,
                eval_limit=100, eval_batch_size=8, save_every=4),
    "paper": dict(template="latentr3", sft_batch_size=128, sft_epochs=3, sft_lr=3e-4,
                  sft_warmup_steps=20,
                  rl_batch_size=32, rl_epochs=1, rl_warmup_steps=200, rl_lr=1e-4,
                  num_samples=8, sigma=1.5, num_beams=10, dtype="bfloat16"),
}


def field_owner() -> dict[str, str]:
    """Map each flag field name to the Config attribute (section) that holds it."""
    owner: dict[str, str] = {}
    for section in dataclasses.fields(Config):
        for f in dataclasses.fields(section.default_factory()):  # type: ignore[misc]
            if f.name in owner:
                raise RuntimeError(f"config field {f.name!r} is defined twice")
            owner[f.name] = section.name
    return owner


def build_config(preset: str, overrides: dict[str, Any]) -> Config:
    """Defaults, then the preset's values, then ``overrides`` (explicit flags)."""
    if preset and preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    cfg = Config()
    owner = field_owner()
    values = {**PRESETS.get(preset, {}), **overrides, "preset": preset}
    for name, value in values.items():
        if name not in owner:
            raise ValueError(f"unknown config field {name!r}")
        setattr(getattr(cfg, owner[name]), name, value)
    return cfg


class ConfigError(UserError, ValueError):
    """A configuration a run cannot use; the message names the flag and the fix."""


# Settings that say what this process does with its folder, not what the run computes:
# never read from nor written to a config file.
NOT_IN_CONFIG_FILES = ("config", "resume", "overwrite", "output_dir")


def _field_types() -> dict[str, dataclasses.Field]:
    return {f.name: f for section in dataclasses.fields(Config)
            for f in dataclasses.fields(section.default_factory())}  # type: ignore[misc]


def _coerce(name: str, value: Any, field_: dataclasses.Field, where: str) -> Any:
    default = field_.default
    kind = type(default)
    ok = (isinstance(value, bool) if kind is bool else
          isinstance(value, int) and not isinstance(value, bool) if kind is int else
          isinstance(value, (int, float)) and not isinstance(value, bool) if kind is float
          else isinstance(value, str))
    if not ok:
        raise ConfigError(f"{where}: {name}: expected a {kind.__name__} (like {default!r}), "
                          f"got {value!r}")
    value = kind(value)
    choices = field_.metadata.get("choices")
    if choices and value not in choices:
        raise ConfigError(f"{where}: {name}: {value!r} is not one of {list(choices)}")
    return value


class _DuplicateKey(ValueError):
    pass


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """JSON objects whose keys are unique (json keeps the last of a repeated key)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(f"{key} is given twice in one object; keep one")
        out[key] = value
    return out


def _unique_key_loader():
    """A YAML safe loader refusing a key repeated in one mapping (PyYAML keeps the last)."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            keys = [self.construct_object(key_node, deep=True) for key_node, _ in node.value]
            repeated = sorted({str(k) for k in keys if keys.count(k) > 1})
            if repeated:
                raise _DuplicateKey(f"{repeated[0]} is given twice in one mapping (line "
                                    f"{node.start_mark.line + 1}); keep one")
            return super().construct_mapping(node, deep=deep)

    return UniqueKeyLoader


def load_config_file(path: str) -> dict[str, Any]:
    """The settings in a YAML/JSON config file: ``{flag_name: value}``. Keys are the flag
    names with underscores (``sft_lr``) or dashes (``sft-lr``), at the top level or under
    their section (``sft: {sft_lr: ...}``); an unknown key, a wrong type or a value outside
    a flag's choices is a :class:`ConfigError` naming the file and the key."""
    import difflib
    import json

    import yaml

    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"--config {path}: cannot be read ({err.strerror or err})") from None
    try:
        raw = (json.loads(text, object_pairs_hook=_unique_pairs) if file.suffix == ".json"
               else yaml.load(text, Loader=_unique_key_loader()))  # noqa: S506 (safe loader)
    except _DuplicateKey as err:
        raise ConfigError(f"--config {path}: {err}") from None
    except (ValueError, yaml.YAMLError) as err:
        kind = "JSON" if file.suffix == ".json" else "YAML"
        raise ConfigError(f"--config {path}: not valid {kind} ({str(err).splitlines()[0]})"
                          ) from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"--config {path}: expected a mapping of settings, got "
                          f"{type(raw).__name__}")
    sections = {f.name for f in dataclasses.fields(Config)}
    flat: list[tuple[Any, str, Any]] = []  # (key as written, where, value)
    for key, value in raw.items():
        if key in sections and isinstance(value, dict):
            flat += [(k, f"under {key}", v) for k, v in value.items()]
        else:
            flat.append((key, "at the top level", value))
    fields = _field_types()
    values: dict[str, Any] = {}
    seen: dict[str, str] = {}
    for key, where, value in flat:
        name = str(key).replace("-", "_")
        if name in seen:
            raise ConfigError(f"--config {path}: {name} is given twice ({seen[name]} and as "
                              f"{key!r} {where}); keep one")
        seen[name] = f"as {key!r} {where}"
        if name in NOT_IN_CONFIG_FILES:
            raise ConfigError(f"--config {path}: {key} is not a run setting; give "
                              f"--{name.replace('_', '-')} on the command line")
        if name not in fields:
            close = difflib.get_close_matches(name, list(fields), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(f"--config {path}: unknown setting {key!r}{hint}")
        values[name] = _coerce(name, value, fields[name], f"--config {path}")
    return values


def config_file_text(cfg: Config) -> str:
    """``cfg`` as the YAML that ``--config`` reads back, grouped by section; without the
    folder actions (``--output-dir``, ``--resume``, ...) and, for a run from
    ``--checkpoint``, without the model settings the checkpoint fixes."""
    import yaml

    skip = set(NOT_IN_CONFIG_FILES) | (set(FROM_CHECKPOINT) if cfg.run.checkpoint else set())
    tree = {section: {k: v for k, v in values.items() if k not in skip}
            for section, values in cfg.to_dict().items()}
    head = ("# The resolved configuration of this run (defaults < preset < config file < "
            "flags).\n# Repeat it: python -m fastlatent.train --config config.yaml "
            "--output-dir NEW_DIR\n")
    return head + yaml.safe_dump(tree, sort_keys=False, allow_unicode=True)


_POSITIVE_INTS = ("sft_batch_size", "sft_micro_batch", "sft_epochs", "sft_warmup_steps",
                  "patience", "rl_batch_size", "rl_epochs", "rl_warmup_steps", "num_samples",
                  "ratt_heads", "num_beams", "max_new_tokens", "eval_batch_size",
                  "max_nonfinite_steps", "baseline_epochs")
# What a saved LatentReasoner fixes: with --checkpoint these come from its fastlatent.json.
FROM_CHECKPOINT = ("model", "latent", "ratt_heads", "ratt_rope_base", "num_latents")
_NON_NEGATIVE_INTS = ("sft_limit", "rl_limit", "valid_limit", "eval_limit", "rl_micro_batch",
                      "rl_max_steps", "save_every", "sft_lora_r")
_POSITIVE_FLOATS = ("sft_lr", "rl_lr", "rl_llm_lr", "grad_clip", "ratt_rope_base", "dist_timeout",
                    "sft_lora_alpha")


_SFT_DATA = ("sft_limit", "valid_limit")
_LATENT_SHAPE = ("num_latents", "ratt_heads", "ratt_rope_base")
_LORA_SHAPE = ("sft_lora_alpha", "sft_lora_dropout")


def unused_fields(cfg: Config, names: Iterable[str]) -> list[tuple[str, str]]:
    """The fields among ``names`` that change nothing in this run, each with the reason:
    SFT settings when no SFT runs, RL settings when no RL runs, training settings for an
    evaluation, latent shapes without a latent, LoRA shapes without LoRA, the LLM's RL
    learning rate when the LLM is frozen."""
    owner = field_owner()
    stage, latent = cfg.run.stage, cfg.model.latent
    sft = stage in ("sft", "all")
    rl = stage in ("rl", "all") and latent != "none"
    no_rl = (f"--stage {stage} runs no RL" if stage not in ("rl", "all") else
             "--latent none has no latent for RL to train")
    out = []
    for name in sorted(names):
        section = owner.get(name)
        if (section == "sft" or name in _SFT_DATA) and not sft:
            out.append((name, f"--stage {stage} runs no SFT"))
        elif (section == "rl" or name == "rl_limit") and not rl:
            out.append((name, no_rl))
        elif section == "train" and not (sft or rl):
            out.append((name, f"--stage {stage} trains nothing"))
        elif name in _LATENT_SHAPE and latent == "none":
            out.append((name, "--latent none has no latent token"))
        elif name in _LATENT_SHAPE[1:] and latent == "last-hidden":
            out.append((name, "--latent last-hidden has no LatentRATT"))
        elif name in _LORA_SHAPE and cfg.sft.sft_lora_r == 0:
            out.append((name, "--sft-lora-r 0 trains no LoRA adapters"))
        elif name == "rl_llm_lr" and cfg.rl.rl_trainable != "all":
            out.append((name, f"--rl-trainable {cfg.rl.rl_trainable} keeps the LLM frozen"))
    return out


def validate_config(cfg: Config, explicit: Iterable[str] = (), *,
                    command_line: Iterable[str] = ()) -> None:
    """Raise :class:`ConfigError` for a configuration that cannot train, before anything is
    loaded (a bad value found after an hour of SFT loses the hour). ``explicit``: the
    fields given as flags or in the config file (a flag that ``--checkpoint`` would
    override is refused); ``command_line``: those given as flags, each of which must
    change something (a config file may hold settings a stage does not use, as the
    config.yaml a run writes does)."""
    values = {f: v for section in cfg.to_dict().values() for f, v in section.items()}

    def fail(name: str, fix: str) -> None:
        raise ConfigError(f"--{name.replace('_', '-')} {values[name]!r}: {fix}")

    for name, reason in unused_fields(cfg, command_line):
        fail(name, f"has no effect here ({reason}); drop the flag")

    for name in _POSITIVE_INTS:
        if not isinstance(values[name], int) or values[name] < 1:
            fail(name, "expected a positive integer")
    for name in _NON_NEGATIVE_INTS:
        if not isinstance(values[name], int) or values[name] < 0:
            fail(name, "expected an integer >= 0 (0 = no limit / off)")
    for name in _POSITIVE_FLOATS:
        if not math.isfinite(values[name]) or values[name] <= 0:
            fail(name, "expected a finite number > 0")
    if values["stage"] == "rl" and not values["checkpoint"] and not values["allow_untrained"]:
        fail("stage", "RL starts from a fine-tuned model: give --checkpoint OUTPUT_DIR/sft "
             "(or run --stage all); --allow-untrained starts from the base model anyway")
    if values["allow_untrained"] and (values["stage"] != "rl" or values["checkpoint"]):
        fail("allow_untrained", "only --stage rl without --checkpoint starts from an "
             "untrained model; drop the flag")
    data = values["data"]
    if data not in ("movielens-100k", "synthetic") and not data.startswith("csv:"):
        fail("data", "expected movielens-100k, synthetic or csv:DIR (a folder in the "
             "BIGRec/D3/LatentR3 CSV layout)")
    if data.startswith("csv:") and not Path(data[len("csv:"):]).expanduser().is_dir():
        fail("data", f"{data[len('csv:'):] or '(empty)'} is not a directory; give the "
             "folder holding {train,valid,test}/NAME.csv and info/NAME.txt")
    if not math.isfinite(values["length_penalty"]):
        fail("length_penalty", "expected a finite exponent (1.0 BIGRec, 0.0 D3)")
    if not math.isfinite(values["sigma"]) or values["sigma"] < 0:
        fail("sigma", "expected a finite noise scale >= 0 (the release uses 1.5)")
    if not math.isfinite(values["sft_weight_decay"]) or values["sft_weight_decay"] < 0:
        fail("sft_weight_decay", "expected a finite number >= 0")
    if values["latent"] != "none" and (not isinstance(values["num_latents"], int)
                                       or values["num_latents"] < 1):
        fail("num_latents", f"expected at least 1 latent token with --latent "
             f"{values['latent']} (no latent at all is --latent none)")
    if values["checkpoint"]:
        for name in FROM_CHECKPOINT:
            if name in explicit:
                fail(name, f"the model comes from --checkpoint {values['checkpoint']} (its "
                     f"fastlatent.json fixes {name}); drop this flag or --checkpoint")
    if values["resume"] and values["overwrite"]:
        fail("resume", "--resume continues the run in --output-dir, --overwrite deletes it; "
             "give one of them")
    if (values["resume"] or values["overwrite"]) and not values["output_dir"]:
        fail("resume" if values["resume"] else "overwrite",
             "needs --output-dir (the run folder to continue or replace)")
    if (values["base_quant"] != "none" or values["optim"] == "adamw8bit") and \
            importlib.util.find_spec("bitsandbytes") is None:
        fail("base_quant" if values["base_quant"] != "none" else "optim",
             "needs bitsandbytes (pip install bitsandbytes)")
    if not 0 <= values["sft_lora_dropout"] < 1:
        fail("sft_lora_dropout", "expected a probability in [0, 1)")
    if values["sft_lora_r"] > 0 and importlib.util.find_spec("peft") is None:
        fail("sft_lora_r", "needs peft (pip install peft)")
    if values["reward"] == "exact-match" and values["num_samples"] < 2:
        fail("num_samples", "--reward exact-match compares the K rows of a prompt (a 0/1 "
             "reward of one row has no baseline); use --num-samples 8")
    if values["reward"] == "exact-match" and values["latent"] == "none" and \
            "latent" in explicit:
        fail("latent", "--reward exact-match samples latent rows; use --latent ratt")
    if values["rl_trainable"] == "all" and values["base_quant"] != "none":
        fail("rl_trainable", "--rl-trainable all trains the LLM, which --base-quant "
             f"{values['base_quant']} freezes in 8/4 bits; drop one of them")
    try:
        from fastlatent.baseline_cache import resolve_models

        resolve_models(values["baselines"])
    except UserError as err:
        raise ConfigError(str(err)) from None
    if values["advantage"] == "group" and values["num_samples"] < 2:
        fail("num_samples", "the group advantage needs K >= 2 rows per prompt (its std is "
             "over the K rows); use --num-samples 8 or --advantage batch")
