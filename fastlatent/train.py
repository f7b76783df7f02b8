"""``python -m fastlatent.train``: SFT warm-up -> latent GRPO -> constrained evaluation.

With no arguments: SmolLM2-135M-Instruct on MovieLens-100K, sized by the ``cpu`` preset
(without CUDA) or ``paper`` (with CUDA). Outputs in OUTPUT_DIR: run.json (manifest),
log.jsonl (every step), sft/ and rl/ checkpoints, metrics.json, predictions.jsonl.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from fastlatent import distributed, shutdown, tracking
from fastlatent.checkpoint import remove_partial_checkpoints
from fastlatent.config import (
    FROM_CHECKPOINT,
    PRESETS,
    Config,
    ConfigError,
    build_config,
    config_file_text,
    field_owner,
    load_config_file,
    validate_config,
)
from fastlatent.errors import UserError
from fastlatent.metrics import BASELINE
from fastlatent.model.reasoner import read_checkpoint_config
from fastlatent.rundir import RunFolder, read_manifest
from fastlatent.runlog import StepLog, logged_steps, write_json_atomic, write_text_atomic

METRIC_KEYS = ("hr@5", "hr@10", "ndcg@5", "ndcg@10")
CONFIG_FILE = "config.yaml"



def demo_note(cfg: Config) -> str:
    d, r = cfg.data, cfg.rl
    return (f"note: the cpu preset is a demonstration sized for 2 CPU cores "
            f"({d.sft_limit or 'all'} SFT examples, {r.rl_max_steps or 'all'} RL steps of "
            f"{r.rl_batch_size} prompts, "
            f"{d.eval_limit or 'all'} evaluation users); its numbers are not the paper's, and "
            f"at this size it does not beat the popularity baseline (see README).")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def build_parser() -> argparse.ArgumentParser:
    """One argparse group per config dataclass; defaults are SUPPRESSed so that only
    explicit flags override the preset."""
    parser = argparse.ArgumentParser(
        prog="python -m fastlatent.train",
        description="LatentR3: SFT warm-up, latent GRPO and constrained beam-search "
                    "evaluation. Explicit flags override the preset.",
        argument_default=argparse.SUPPRESS)
    for section in dataclasses.fields(Config):
        defaults = section.default_factory()  # type: ignore[misc]
        group = parser.add_argument_group(section.name)
        for f in dataclasses.fields(defaults):
            default = getattr(defaults, f.name)
            kwargs: dict[str, Any] = {"help": f"{f.metadata['help']} (default: {default!r})"}
            if "choices" in f.metadata:
                kwargs["choices"] = f.metadata["choices"]
            if isinstance(default, bool):
                kwargs["action"] = "store_true"
            else:
                kwargs["type"] = type(default)
            group.add_argument(_flag(f.name), dest=f.name, **kwargs)
    return parser


def parse_args(argv: list[str] | None) -> tuple[Config, set[str]]:
    """The configuration and the names of the fields set explicitly (flags, or the
    ``--config`` file: defaults < preset < file < flags)."""
    flags = vars(build_parser().parse_args(argv))
    from_file = load_config_file(flags["config"]) if flags.get("config") else {}
    overrides = {**from_file, **flags}
    given = overrides.pop("preset", "")
    preset = given or ("paper" if torch.cuda.is_available() else "cpu")
    return build_config(preset, overrides), set(overrides) | ({"preset"} if given else set())


def describe_os_error(err: OSError) -> str:
    """One line: the path, what the system said and its errno name."""
    import errno as errno_names

    where = err.filename or "a file of the run"
    code = errno_names.errorcode.get(err.errno or 0, "")
    return (f"cannot write or read {where}: {err.strerror or err}"
            + (f" ({code})" if code else "") + "; free space or fix the folder's permissions, "
            "then continue with --resume")


def check_ratt_heads(cfg: Config) -> None:
    """``--ratt-heads`` must divide the model's hidden size into even head sizes: checked
    from the model's configuration where it is known without loading the weights."""
    from fastlatent.model.loading import known_hidden_size

    if cfg.run.checkpoint or cfg.model.latent != "ratt":
        return
    d, heads = known_hidden_size(cfg.model.model), cfg.model.ratt_heads
    if d is not None and (d % heads or (d // heads) % 2):
        even = [h for h in range(1, d + 1) if d % h == 0 and (d // h) % 2 == 0]
        raise ConfigError(f"--ratt-heads {heads}: {cfg.model.model}'s hidden size {d} must "
                          f"split into heads of an even size; choose one of "
                          f"{', '.join(map(str, even[:8]))}{', ...' if len(even) > 8 else ''}")


def command_line_fields(argv: list[str] | None) -> set[str]:
    """The fields given as flags on the command line (not from --config)."""
    return set(vars(build_parser().parse_args(argv))) - {"config"}


def parse_config(argv: list[str] | None) -> Config:
    return parse_args(argv)[0]


# Flags a resumed run may change: where it runs, not what it computes.
RESUME_MAY_CHANGE = frozenset({"resume", "output_dir", "device", "save_every",
                               "dist_timeout", "report_to"})


def resumed_config(cfg: Config, explicit: set[str]) -> Config:
    """The configuration of the run in ``--output-dir`` (from its run.json); flags given
    with ``--resume`` must agree with it, or the resumed run would not be that run."""
    if cfg.run.overwrite:
        raise ConfigError("--resume continues the run in --output-dir, --overwrite deletes "
                          "it; give one of them")
    saved = read_manifest(Path(cfg.run.output_dir))["config"]
    resumed = build_config(saved["run"]["preset"], {
        name: value for section in saved.values() for name, value in section.items()
        if name != "preset"})
    owner = field_owner()
    for name in sorted(explicit - RESUME_MAY_CHANGE):
        given = getattr(getattr(cfg, owner[name]), name)
        if given != getattr(getattr(resumed, owner[name]), name):
            raise ConfigError(
                f"--{name.replace('_', '-')} {given!r}: the run being resumed used "
                f"{getattr(getattr(resumed, owner[name]), name)!r}; a resumed run keeps its "
                "configuration (drop the flag, or start a new run in another --output-dir)")
    for name in RESUME_MAY_CHANGE & explicit:
        setattr(getattr(resumed, owner[name]), name, getattr(getattr(cfg, owner[name]), name))
    resumed.run.resume = True
    return resumed


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    return device


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def package_versions() -> dict[str, str | None]:
    from importlib import metadata

    versions = {"python": platform.python_version()}
    for name in ("fastlatent", "torch", "transformers", "tokenizers", "safetensors", "numpy",
                 "triton", "gguf", "accelerate"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def format_table(metrics: dict[str, dict[str, Any]]) -> str:
    """A fixed-width table: one row per stage, HR/NDCG with 95% bootstrap intervals, the
    baselines' rows last (traditional models, then popularity), and whether each stage's
    HR@10 interval lies above, overlaps or lies below each baseline's."""
    from fastlatent.baselines import MODELS

    traditional = [name for name in metrics if name in MODELS]
    baselines = traditional + [name for name in metrics if name == BASELINE]
    stages = [name for name in metrics if name not in baselines]
    against = [name for name in (BASELINE, *(traditional if stages else ())) if name in metrics]
    head = f"{'stage':<8}" + "".join(f"{k:>24}" for k in METRIC_KEYS) + "".join(
        f"  HR@10 vs {name:<9}" for name in against)
    lines = [head.rstrip(), "-" * len(head.rstrip())]
    order = stages + baselines
    for stage in order:
        m = metrics[stage]
        cells = []
        for k in METRIC_KEYS:
            lo, hi = m.get(f"{k}_ci", (float("nan"), float("nan")))
            cells.append(f"{m[k]:.4f} [{lo:.3f},{hi:.3f}]".rjust(24))
        relations = []
        for name in against:
            relation = m.get(f"hr@10_vs_{name}", "")
            if stage == name:
                relation = "(baseline)"
            elif stage in traditional and name != BASELINE:
                relation = ""  # one traditional model against another: not a question asked
            relations.append(f"  {relation:<18}")
        lines.append((f"{stage:<8}" + "".join(cells) + "".join(relations)).rstrip())
    n = next(iter(metrics.values())).get("n") if metrics else None
    note = (f"(95% bootstrap intervals; {n} evaluation rows; popular = the 10 most "
            "frequent training targets for every row")
    if traditional:
        note += "; " + ", ".join(traditional) + " = RecBole, trained on the run's training rows"
    lines.append(note + ")")
    return "\n".join(lines)


def take_model_from_checkpoint(cfg: Config) -> None:
    """Record in ``cfg`` the model settings ``--checkpoint`` fixes (its fastlatent.json),
    so run.json says what was used; an unreadable checkpoint is an error here, before
    anything loads."""
    meta = read_checkpoint_config(cfg.run.checkpoint)
    cfg.model.model = f"checkpoint:{cfg.run.checkpoint}"
    for name in FROM_CHECKPOINT:
        if name in meta:
            setattr(cfg.model, name, meta[name])


def draw_plots(out: Path) -> None:
    """OUTPUT_DIR/plots/ from log.jsonl and metrics.json; a missing matplotlib or a
    failed plot is a note, never the run's failure."""
    try:
        from fastlatent.plots import plot_run

        plot_run(out)
    except ImportError:
        print("note: no plots (matplotlib is not installed: pip install -e '.[plots]')")
    except Exception as err:  # a plot must not turn a finished run into a failed one
        print(f"note: plots not drawn ({type(err).__name__}: {err}); retry with "
              f"python -m fastlatent.plots {out}")


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat()


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 done, 1 an expected error (one line on stderr), 2 a configuration or
    output-folder error before anything ran, 128+N stopped by signal N (resumable).

    Under ``torchrun`` every process runs this; only rank 0 prints, shows progress and
    writes files, and every exit path leaves the process group."""
    launched = distributed.launched()
    main_rank = os.environ.get("RANK", "0") == "0"
    if launched and not main_rank:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (for the life of the process)
    try:
        cfg, explicit = parse_args(argv)
        if cfg.run.resume and cfg.run.output_dir:
            cfg = resumed_config(cfg, explicit)
        validate_config(cfg, explicit, command_line=command_line_fields(argv))
        check_ratt_heads(cfg)
        tracking.resolve(cfg.run.report_to)  # a named tracker that is not installed: now
        if cfg.run.checkpoint:
            take_model_from_checkpoint(cfg)
        device = (distributed.init(cfg.run.device, cfg.run.dist_timeout) if launched
                  else resolve_device(cfg.run.device))
    except (UserError, ValueError) as err:
        if main_rank:
            print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        return open_folder_and_run(cfg, device, argv)
    finally:
        distributed.close()


def open_folder_and_run(cfg: Config, device: torch.device, argv: list[str] | None) -> int:
    """Rank 0 takes the output folder (lock, emptiness rule) and tells the other ranks
    where it is, its run id and the earlier run's manifest, or the error that stops all."""
    run = cfg.run
    out = Path(distributed.broadcast(
        run.output_dir or f"runs/{run.preset}-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"))
    folder, error = None, None
    if distributed.is_main():
        try:
            folder = RunFolder.open(out, resume=run.resume, overwrite=run.overwrite)
        except (UserError, OSError) as err:  # told to every rank, so none waits for it
            error = str(err)
    shared = distributed.broadcast(
        None if folder is None else (folder.run_id, folder.earlier))
    if error is not None or shared is None:
        if distributed.is_main():
            print(f"error: {error}", file=sys.stderr)
        return 2
    if folder is None:  # another rank: it writes nothing, so it holds no lock
        folder = RunFolder(out, shared[0], shared[1], lock=None)
    with folder, shutdown.handle_signals():
        return run_in_folder(cfg, folder, device, argv)


def run_in_folder(cfg: Config, folder: RunFolder, device: torch.device,
                  argv: list[str] | None) -> int:
    from fastlatent.pipeline import run_pipeline, seed_everything

    run, out = cfg.run, folder.path
    main_rank = distributed.is_main()
    if main_rank:
        for leftover in remove_partial_checkpoints(out):
            print(f"note: removed {leftover}, left by a run that did not finish writing it")
    world = {"world_size": distributed.world_size(), "backend": distributed.backend()}
    segment = {"argv": sys.argv[1:] if argv is None else list(argv), "started": _now(),
               "pid": os.getpid(), "resumed": run.resume, "git_commit": git_commit(),
               "versions": package_versions(), "device": str(device), **world}
    manifest = folder.earlier or {
        "run_id": folder.run_id, "argv": segment["argv"], "config": cfg.to_dict(),
        "preset_values": PRESETS.get(run.preset, {}), "seed": run.seed,
        "device": str(device), **world, "git_commit": segment["git_commit"],
        "versions": segment["versions"], "started": segment["started"]}
    manifest.setdefault("run_id", folder.run_id)
    manifest.setdefault("segments", []).append(segment)
    manifest["status"] = "running"

    def finish(status: str, **fields: Any) -> None:
        segment.update(ended=_now(), status=status, **fields)
        manifest["status"] = status
        if main_rank:
            write_json_atomic(out / "run.json", manifest)

    def failed(message: str) -> str:
        """This rank's failure as the run's: rank 0 reports what another rank left (its
        own error is then usually the broken collective that followed)."""
        distributed.report_failure(message)
        elsewhere = distributed.failure_elsewhere() if main_rank else None
        if elsewhere and not elsewhere.startswith("rank 0:"):
            return elsewhere
        return message if distributed.world_size() == 1 else \
            f"rank {distributed.rank()}: {message}"

    if main_rank:
        write_json_atomic(out / "run.json", manifest)
        if not run.resume:
            write_text_atomic(out / CONFIG_FILE, config_file_text(cfg))
    verb = "resuming" if run.resume else "fastlatent:"
    print(f"{verb} run {folder.run_id}: preset {run.preset}, stage {run.stage}, model "
          f"{cfg.model.model}, data {cfg.data.data}, device {device}, output {out}")
    if run.preset == "cpu":
        print(demo_note(cfg))
    seed_everything(run.seed)
    tracker = (tracking.open_tracker(tracking.resolve(run.report_to), out, folder.run_id,
                                     cfg.to_dict()) if main_rank else None)
    log = StepLog(out / "log.jsonl" if main_rank else os.devnull, run_id=folder.run_id,
                  tracker=tracker,
                  replay_until=logged_steps(out / "log.jsonl") if run.resume else None)
    notes: list[str] = []
    try:
        metrics = run_pipeline(cfg, out, device, log, notes, resume=run.resume)
    except shutdown.Interrupted as stop:
        log.write("run", "interrupted", signal=stop.signum, message=str(stop))
        finish("interrupted", message=str(stop), notes=notes)
        if main_rank:
            print(f"fastlatent: {stop}. Continue with: python -m fastlatent.train --resume "
                  f"--output-dir {out}", file=sys.stderr)
        return 128 + stop.signum
    except UserError as err:
        message = failed(str(err))
        log.write("run", "failed", message=message)
        finish("failed", message=message, notes=notes)
        print(f"error: {message}", file=sys.stderr)
        return 1
    except OSError as err:  # a file the run must write (or read) cannot be: disk, rights
        message = failed(describe_os_error(err))
        try:
            log.write("run", "failed", message=message)
            finish("failed", message=message, notes=notes)
        except OSError as also:
            message += f" (run.json not updated either: {describe_os_error(also)})"
        print(f"error: {message}", file=sys.stderr)
        return 1
    except BaseException as err:
        own = f"{type(err).__name__}: {err}"
        message = failed(own)
        finish("failed", message=message, notes=notes)
        if isinstance(err, Exception) and own not in message:  # another rank failed first
            print(f"error: {message}", file=sys.stderr)
            return 1
        raise
    finally:
        log.close()
        if main_rank:
            draw_plots(out)
    try:
        if main_rank:
            write_json_atomic(out / "metrics.json", metrics)
            draw_plots(out)  # again, with the metrics
        manifest["notes"] = manifest.get("notes", []) + notes
        manifest["finished"] = _now()
        finish("complete")
    except OSError as err:
        print(f"error: {describe_os_error(err)}", file=sys.stderr)
        return 1
    if metrics:
        print(format_table(metrics))
    if run.preset == "cpu":
        print(demo_note(cfg))
    print(f"wrote {out / 'metrics.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
