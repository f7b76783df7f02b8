"""Faults a run must survive or report clearly: non-finite values, damaged checkpoints, a
failure while saving, flags that contradict a checkpoint or a resumed run, suspicious data.
(Kill/resume and SIGTERM end to end: test_runs_survive.py.)"""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch

from fastlatent import checkpoint as ckpt
from fastlatent.config import RLConfig, SFTConfig
from fastlatent.data.prompt import PromptBuilder
from fastlatent.errors import CheckpointError, TrainingStopped
from fastlatent.optim import make_scheduler
from fastlatent.rl import run_rl
from fastlatent.runlog import StepLog
from fastlatent.sft import run_sft
from fastlatent.train import main


@pytest.fixture
def encoded(tiny_reasoner, synthetic_dataset):
    builder = PromptBuilder(tiny_reasoner.tokenizer, domain=synthetic_dataset.domain)
    return [builder.encode(ex) for ex in synthetic_dataset.split("train")[:12]]


def records(path):
    """Every line must be strict JSON (no NaN/Infinity)."""
    def refuse(token):
        raise AssertionError(f"non-JSON constant {token} in {path}")
    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def poisoned_steps(monkeypatch, module, bad_calls, field):
    """Make the training step of ``module`` ("sft" or "rl") return NaN in ``field`` on the
    calls numbered in ``bad_calls`` (1-based)."""
    import fastlatent.engine.generic as generic

    real_step_for = generic.step_for
    calls = {"n": 0}

    def step_for(reasoner, stage, **kwargs):
        step = real_step_for(reasoner, stage, **kwargs)

        def poisoned(*args, **kwargs):
            out = step(*args, **kwargs)
            calls["n"] += 1
            if calls["n"] in bad_calls:
                value = getattr(out, field)
                setattr(out, field, value * float("nan"))
            return out
        return poisoned

    monkeypatch.setattr(f"fastlatent.{module}.step_for", step_for)


def test_a_nan_sft_loss_skips_the_update_and_is_logged_as_null(tiny_reasoner, encoded,
                                                                tmp_path, monkeypatch):
    poisoned_steps(monkeypatch, "sft", {2}, "nll_sum")  # the 2nd micro-batch = step 1
    before = {k: v.clone() for k, v in tiny_reasoner.state_dict().items()}
    cfg = SFTConfig(sft_batch_size=4, sft_micro_batch=2, sft_epochs=1, sft_warmup_steps=1)
    log = StepLog(tmp_path / "log.jsonl")
    run_sft(tiny_reasoner, encoded, encoded[:2], cfg, grad_clip=1.0, output_dir=tmp_path,
            log=log, seed=0)
    log.close()
    steps = [r for r in records(tmp_path / "log.jsonl") if r["event"] == "step"]
    assert [r["skipped"] for r in steps] == [True, False, False]
    assert steps[0]["loss"] is None  # NaN written as null
    after = tiny_reasoner.state_dict()
    assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())
    assert any(not torch.equal(before[k], after[k]) for k in before)  # steps 2, 3 trained


def test_non_finite_steps_in_a_row_stop_the_run_naming_step_and_cause(tiny_reasoner, encoded,
                                                                      tmp_path, monkeypatch):
    poisoned_steps(monkeypatch, "rl", set(range(1, 100)), "rewards")
    cfg = RLConfig(rl_batch_size=2, rl_max_steps=5, rl_warmup_steps=1, num_samples=2)
    log = StepLog(tmp_path / "log.jsonl")
    with pytest.raises(TrainingStopped, match=r"RL step 3: 3 optimiser steps in a row .*"
                                              r"--sigma 1.5"):
        run_rl(tiny_reasoner, encoded, cfg, grad_clip=1.0, output_dir=tmp_path, log=log,
               seed=0, max_nonfinite_steps=3)
    log.close()
    assert not (tmp_path / "rl").exists()  # nothing non-finite reached a checkpoint
    assert all(r["skipped"] for r in records(tmp_path / "log.jsonl") if r["event"] == "step")


def test_a_non_finite_validation_loss_is_an_error(tiny_reasoner, encoded, tmp_path,
                                                  monkeypatch):
    import fastlatent.sft as sft

    monkeypatch.setattr(sft, "validation_loss", lambda *a, **k: math.nan)
    cfg = SFTConfig(sft_batch_size=6, sft_micro_batch=6, sft_epochs=2, sft_warmup_steps=1)
    with pytest.raises(TrainingStopped, match="SFT epoch 1 .*validation loss is nan"):
        run_sft(tiny_reasoner, encoded, encoded[:2], cfg, grad_clip=1.0, output_dir=tmp_path,
                log=StepLog(tmp_path / "log.jsonl"), seed=0)
    assert not (tmp_path / "sft").exists()


def save_rl_state(reasoner, out, step):
    params = [p for p in reasoner.ratt.parameters()]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    scheduler = make_scheduler(optimizer, "rl", 1, 10)
    state = ckpt.TrainingState("rl", step=step, epoch=0, batch=step, extra={})
    return ckpt.save_training_state(out, state, reasoner, optimizer, scheduler,
                                    torch.Generator().manual_seed(step))


def test_a_damaged_checkpoint_is_named_and_the_one_before_it_is_used(tiny_reasoner,
                                                                      tmp_path):
    first = save_rl_state(tiny_reasoner, tmp_path, 1)
    second = save_rl_state(tiny_reasoner, tmp_path, 2)
    assert ckpt.complete_checkpoints(tmp_path) == [second, first]
    trainer = second / ckpt.TRAINER_FILE
    trainer.write_bytes(trainer.read_bytes()[:100])  # truncated
    with pytest.raises(CheckpointError, match=f"{trainer}: expected .* bytes, found 100"):
        ckpt.load_training_state(second)
    warnings = []
    loaded = ckpt.newest_loadable(tmp_path, warnings.append)
    assert loaded.path == first and loaded.state.step == 1
    assert len(warnings) == 1 and str(trainer) in warnings[0]
    # Same size, garbage inside: still named (by its checksum).
    (first / ckpt.TRAINER_FILE).write_bytes(b"\0" * (first / ckpt.TRAINER_FILE).stat().st_size)
    with pytest.raises(CheckpointError, match=f"{first / ckpt.TRAINER_FILE}: its content "
                                              "changed"):
        ckpt.load_training_state(first)


def test_a_failure_while_saving_keeps_the_previous_checkpoint(tiny_reasoner, tmp_path,
                                                              monkeypatch):
    first = save_rl_state(tiny_reasoner, tmp_path, 1)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt.torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        save_rl_state(tiny_reasoner, tmp_path, 2)
    assert ckpt.complete_checkpoints(tmp_path) == [first]
    assert not list((tmp_path / ckpt.CHECKPOINTS).glob(".tmp-*"))
    assert ckpt.load_training_state(first).state.step == 1


def test_only_the_newest_checkpoints_are_kept(tiny_reasoner, tmp_path):
    for step in (1, 2, 3):
        save_rl_state(tiny_reasoner, tmp_path, step)
    assert [p.name for p in ckpt.complete_checkpoints(tmp_path)] == ["rl-00000003",
                                                                     "rl-00000002"]


def test_leftovers_of_a_crash_are_removed(tmp_path):
    (tmp_path / ckpt.CHECKPOINTS / ".tmp-rl-00000004-123").mkdir(parents=True)
    (tmp_path / ".sft.tmp-123").mkdir()
    removed = ckpt.remove_partial_checkpoints(tmp_path)
    assert len(removed) == 2 and not (tmp_path / ".sft.tmp-123").exists()


# ---- the CLI: one line, a non-zero exit, nothing overwritten -----------------------------
def smoke(out, *flags):
    return main(["--preset", "smoke", "--output-dir", str(out), "--stage", "sft",
                 "--sft-epochs", "1", "--eval-limit", "4", *flags])


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("saved") / "run"
    assert smoke(out) == 0
    return out


def one_error_line(capsys):
    """The error is one line, last on stderr (progress bars may come before it), and no
    traceback."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert "Traceback" not in err and lines[-1].startswith("error: "), err[-2000:]
    assert sum(line.startswith("error: ") for line in lines) == 1
    return lines[-1]


@pytest.mark.parametrize("damage, named", [
    ("truncate-ratt", "latent_ratt.safetensors"),
    ("truncate-config", "fastlatent.json"),
    ("missing", "is not a fastlatent checkpoint"),
])
def test_a_damaged_checkpoint_flag_is_one_clear_line(saved_run, tmp_path, capsys, damage,
                                                     named):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(saved_run / "sft", model)
    if damage == "truncate-ratt":
        f = model / "latent_ratt.safetensors"
        f.write_bytes(f.read_bytes()[:50])
    elif damage == "truncate-config":
        f = model / "fastlatent.json"
        f.write_text(f.read_text()[:20])
    else:
        model = tmp_path / "nowhere"
    code = main(["--preset", "smoke", "--stage", "eval", "--checkpoint", str(model),
                 "--output-dir", str(tmp_path / "run")])
    assert code in (1, 2)
    assert named in one_error_line(capsys)


def test_flags_a_checkpoint_fixes_are_refused_and_its_values_recorded(saved_run, tmp_path,
                                                                      capsys):
    code = main(["--preset", "smoke", "--stage", "eval", "--checkpoint",
                 str(saved_run / "sft"), "--ratt-heads", "2",
                 "--output-dir", str(tmp_path / "refused")])
    assert code == 2 and "--ratt-heads 2: the model comes from --checkpoint" in \
        one_error_line(capsys)
    out = tmp_path / "eval"
    assert main(["--preset", "smoke", "--stage", "eval", "--checkpoint", str(saved_run / "sft"),
                 "--eval-limit", "4", "--output-dir", str(out)]) == 0
    model = json.loads((out / "run.json").read_text())["config"]["model"]
    assert model["model"] == f"checkpoint:{saved_run / 'sft'}" and model["latent"] == "ratt"


def test_resume_keeps_the_runs_configuration(saved_run, tmp_path, capsys):
    assert main(["--resume", "--output-dir", str(saved_run), "--sigma", "0.5"]) == 2
    assert "--sigma 0.5: the run being resumed used 1.5" in one_error_line(capsys)
    assert main(["--resume", "--output-dir", str(tmp_path / "none")]) == 2
    assert "there is no run to continue" in one_error_line(capsys)
    assert main(["--resume", "--overwrite", "--output-dir", str(saved_run)]) == 2
    one_error_line(capsys)
    # A finished run resumed does nothing again and keeps its results.
    metrics = (saved_run / "metrics.json").read_text()
    assert main(["--resume", "--output-dir", str(saved_run)]) == 0
    assert json.loads((saved_run / "metrics.json").read_text()) == json.loads(metrics)
    assert len(json.loads((saved_run / "run.json").read_text())["segments"]) == 2


def test_data_warnings_are_reported_and_strict_makes_them_errors(tmp_path, capsys):
    from fastlatent.testing.toy_data import write_csv_dir

    titles = [f"Album {c}{c}" for c in "ABCDEFGH"]
    write_csv_dir(tmp_path / "data", ["valid", "test"], titles)
    info = tmp_path / "data" / "info" / "Toy_Music.txt"
    info.write_text("".join(f"{t}\t{i}\n" for i, t in enumerate(titles[:-1] + ["Other"])))
    for split in ("valid", "test"):  # the dropped title stays only in histories
        path = tmp_path / "data" / split / "Toy_Music.csv"
        with path.open(newline="") as f:
            rows = list(csv.reader(f))
        with path.open("w", newline="") as f:
            csv.writer(f).writerows([r for r in rows if r[6] != "Album HH"])
    flags = ["--data", f"csv:{tmp_path / 'data'}", "--train-split", "valid",
             "--eval-split", "valid"]
    out = tmp_path / "run"
    assert smoke(out, *flags) == 0
    printed = capsys.readouterr().out
    assert "not in the catalogue" in printed and "also training rows" in printed
    notes = json.loads((out / "run.json").read_text())["notes"]
    assert any("'Album HH'" in n for n in notes) and any("memorisation" in n for n in notes)
    warned = [r for r in records(out / "log.jsonl") if r["event"] == "warning"]
    assert len(warned) >= 2
    assert smoke(tmp_path / "strict", *flags, "--strict") == 1
    assert "--strict" in one_error_line(capsys)


def test_data_warnings_count_each_kind():
    from fastlatent.data.checks import data_warnings
    from fastlatent.data.example import Catalogue, Dataset, Example

    ds = Dataset("toy", "music", Catalogue(("A", "B", "C")))
    train = [Example("u1", ("A", "Z"), "B"), Example("u2", (), "C"), Example("u3", ("A",), "C")]
    evaluation = [Example("u3", ("A",), "C"), Example("u4", ("B",), "A")]
    warnings = data_warnings(ds, train, evaluation, train_split="train", eval_split="test")
    assert len(warnings) == 3
    assert warnings[0].startswith("1 of 3 training rows name history titles that are not "
                                  "in the catalogue (1 distinct, e.g. ['Z'])")
    assert warnings[1].startswith("1 of 3 training rows have an empty history")
    assert warnings[2].startswith("1 of 2 evaluation rows are also training rows:")
    assert data_warnings(ds, train[2:], evaluation[1:], train_split="train",
                         eval_split="test") == []


def test_signal_handling_is_a_no_op_off_the_main_thread():
    """main() called from a worker thread (a notebook, a launcher) must not crash on
    signal.signal, which only the main thread may call."""
    import threading

    from fastlatent import shutdown

    errors = []

    def work():
        try:
            with shutdown.handle_signals():
                shutdown.check("in a thread")
        except Exception as err:  # pragma: no cover - the failure being tested for
            errors.append(err)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    assert errors == []


# ---- a run that ends badly says so (non-finite results, corrupted checkpoints) ------------
def test_a_checkpoint_changed_without_changing_size_is_named(tiny_reasoner, tmp_path):
    first = save_rl_state(tiny_reasoner, tmp_path, 1)
    second = save_rl_state(tiny_reasoner, tmp_path, 2)
    manifest = json.loads((second / ckpt.COMPLETE_FILE).read_text())
    assert all(len(entry["sha256"]) == 64 for entry in manifest["files"].values())
    ratt = second / "latent_ratt.safetensors"
    data = bytearray(ratt.read_bytes())
    data[-200:-136] = b"\xff" * 64  # 64 bytes of weights, same size
    ratt.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{ratt}: its content changed"):
        ckpt.load_training_state(second)
    warnings = []
    assert ckpt.newest_loadable(tmp_path, warnings.append).path == first
    assert len(warnings) == 1 and str(ratt) in warnings[0]


def test_a_checkpoint_written_before_checksums_still_loads(tiny_reasoner, tmp_path):
    path = save_rl_state(tiny_reasoner, tmp_path, 1)
    manifest = json.loads((path / ckpt.COMPLETE_FILE).read_text())
    manifest["files"] = {rel: entry["bytes"] for rel, entry in manifest["files"].items()}
    (path / ckpt.COMPLETE_FILE).write_text(json.dumps(manifest))
    assert ckpt.load_training_state(path).state.step == 1


def test_an_rl_stage_ending_on_skipped_steps_fails_and_saves_nothing(saved_run, tmp_path,
                                                                      capsys):
    out = tmp_path / "rl"
    assert main(["--preset", "smoke", "--stage", "rl", "--checkpoint", str(saved_run / "sft"),
                 "--rl-lr", "1e30", "--rl-max-steps", "3", "--output-dir", str(out)]) == 1
    line = one_error_line(capsys)
    assert "RL step 3:" in line and "not saved" in line and "--rl-lr 1e+30" in line
    assert not (out / "rl").exists() and not (out / "metrics.json").exists()
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["status"] == "failed" and "RL step 3" in manifest["segments"][-1]["message"]


def test_non_finite_weights_at_the_end_of_a_stage_are_not_saved(tiny_reasoner, encoded,
                                                                tmp_path, monkeypatch):
    import fastlatent.optim as optim

    real = optim.clipped_update

    def poisoning_update(optimizer, scheduler, params, max_norm, *, finite=True):
        result = real(optimizer, scheduler, params, max_norm, finite=finite)
        with torch.no_grad():
            params[0].view(-1)[0] = float("inf")  # an applied step that broke a weight
        return result

    monkeypatch.setattr("fastlatent.rl.clipped_update", poisoning_update)
    cfg = RLConfig(rl_batch_size=4, rl_max_steps=1, rl_warmup_steps=1, num_samples=2)
    with pytest.raises(TrainingStopped, match=r"RL step 1: 1 trained weight tensor\(s\) hold "
                                              r"non-finite values \(ratt\.q_proj\.weight\)"):
        run_rl(tiny_reasoner, encoded, cfg, grad_clip=1.0, output_dir=tmp_path,
               log=StepLog(tmp_path / "log.jsonl"), seed=0)
    assert not (tmp_path / "rl").exists() and not (tmp_path / "checkpoints").exists()


def test_a_model_with_non_finite_weights_is_refused_by_evaluation(saved_run, tmp_path,
                                                                  capsys):
    import shutil

    from safetensors.torch import load_file, save_file

    model = tmp_path / "model"
    shutil.copytree(saved_run / "sft", model)
    weights = load_file(model / "latent_ratt.safetensors")
    name = sorted(weights)[0]
    weights[name].view(-1)[:16] = float("nan")
    save_file(weights, model / "latent_ratt.safetensors")
    assert main(["--preset", "smoke", "--stage", "eval", "--checkpoint", str(model),
                 "--output-dir", str(tmp_path / "eval")]) == 1
    assert "non-finite weights" in one_error_line(capsys)
    assert not (tmp_path / "eval" / "metrics.json").exists()


def test_a_row_with_no_title_fails_the_evaluation(tiny_reasoner, synthetic_dataset,
                                                  monkeypatch):
    import fastlatent.evaluate as evaluate
    from fastlatent.config import EvalConfig
    from fastlatent.errors import EvaluationError

    builder = PromptBuilder(tiny_reasoner.tokenizer, domain=synthetic_dataset.domain)
    trie = evaluate.build_title_trie(builder, synthetic_dataset.catalogue)
    real = evaluate.rank_titles

    def one_empty(*args, **kwargs):
        ranked = real(*args, **kwargs)
        return [([], [])] + ranked[1:]

    monkeypatch.setattr(evaluate, "rank_titles", one_empty)
    rows = synthetic_dataset.split("test")[:3]
    with pytest.raises(EvaluationError, match=r"eval: 1 of 3 rows got no title at all "
                                              r"\(first: row 1"):
        evaluate.evaluate(tiny_reasoner, rows, builder, trie,
                          EvalConfig(num_beams=2, max_new_tokens=24, eval_batch_size=3))


def test_a_non_finite_length_penalty_is_refused_before_loading(tmp_path, capsys):
    assert main(["--preset", "smoke", "--length-penalty", "nan",
                 "--output-dir", str(tmp_path / "run")]) == 2
    assert "--length-penalty nan: expected a finite exponent" in one_error_line(capsys)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("spec, message", [
    ("foobar", "--data 'foobar': expected movielens-100k, synthetic or csv:DIR"),
    ("csv:NOWHERE", "NOWHERE is not a directory"),
])
def test_a_data_spec_that_cannot_load_is_refused_before_the_folder_exists(tmp_path, capsys,
                                                                          spec, message):
    spec = spec.replace("NOWHERE", str(tmp_path / "nowhere"))
    message = message.replace("NOWHERE", str(tmp_path / "nowhere"))
    assert main(["--preset", "smoke", "--data", spec, "--output-dir", str(tmp_path / "run")]) == 2
    assert message in one_error_line(capsys)
    assert not (tmp_path / "run").exists()


def test_rl_without_a_checkpoint_needs_allow_untrained(tmp_path, capsys):
    assert main(["--preset", "smoke", "--stage", "rl", "--output-dir", str(tmp_path / "a")]) == 2
    assert "--allow-untrained starts from the base model" in one_error_line(capsys)
    assert main(["--preset", "smoke", "--allow-untrained",
                 "--output-dir", str(tmp_path / "b")]) == 2
    assert "--allow-untrained True: only --stage rl without --checkpoint" in \
        one_error_line(capsys)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_resume_refuses_another_preset_and_names_resume_with_overwrite(saved_run, tmp_path,
                                                                      capsys):
    import shutil

    assert main(["--resume", "--preset", "cpu", "--output-dir", str(saved_run)]) == 2
    assert "--preset 'cpu': the run being resumed used 'smoke'" in one_error_line(capsys)
    assert main(["--resume", "--overwrite", "--output-dir", str(saved_run)]) == 2
    assert one_error_line(capsys) == ("error: --resume continues the run in --output-dir, "
                                      "--overwrite deletes it; give one of them")
    copy = tmp_path / "run"
    shutil.copytree(saved_run, copy)
    assert main(["--resume", "--preset", "smoke", "--output-dir", str(copy)]) == 0


@pytest.mark.parametrize("flags, message", [
    (["--stage", "eval", "--checkpoint", "CKPT", "--sft-lr", "0.01"],
     "--sft-lr 0.01: has no effect here (--stage eval runs no SFT)"),
    (["--stage", "eval", "--checkpoint", "CKPT", "--sigma", "2.5"],
     "--sigma 2.5: has no effect here (--stage eval runs no RL)"),
    (["--stage", "eval", "--checkpoint", "CKPT", "--save-every", "3"],
     "--save-every 3: has no effect here (--stage eval trains nothing)"),
    (["--stage", "sft", "--num-samples", "4"],
     "--num-samples 4: has no effect here (--stage sft runs no RL)"),
    (["--latent", "none", "--num-latents", "3"],
     "--num-latents 3: has no effect here (--latent none has no latent token)"),
    (["--latent", "none", "--sigma", "1.0"],
     "--sigma 1.0: has no effect here (--latent none has no latent for RL to train)"),
    (["--sft-lora-alpha", "8"], "--sft-lora-alpha 8.0: has no effect here (--sft-lora-r 0"),
    (["--rl-llm-lr", "1e-6"], "--rl-llm-lr 1e-06: has no effect here (--rl-trainable ratt"),
])
def test_a_flag_with_no_effect_is_refused(saved_run, tmp_path, capsys, flags, message):
    flags = [str(saved_run / "sft") if f == "CKPT" else f for f in flags]
    assert main(["--preset", "smoke", *flags, "--output-dir", str(tmp_path / "run")]) == 2
    assert message in one_error_line(capsys)
    assert not (tmp_path / "run").exists()


def test_a_config_file_may_hold_settings_the_stage_does_not_use(tmp_path):
    from fastlatent.train import command_line_fields, parse_args, validate_config

    path = tmp_path / "run.yaml"
    path.write_text("sigma: 2.5\nnum_samples: 4\n")
    argv = ["--preset", "smoke", "--stage", "sft", "--config", str(path)]
    cfg, explicit = parse_args(argv)
    validate_config(cfg, explicit, command_line=command_line_fields(argv))  # no error
    assert command_line_fields(argv) == {"preset", "stage"}


def test_ratt_heads_that_do_not_split_the_hidden_size_are_refused_before_loading(tmp_path,
                                                                                 capsys):
    assert main(["--preset", "smoke", "--ratt-heads", "3",
                 "--output-dir", str(tmp_path / "run")]) == 2
    assert "--ratt-heads 3: tiny-random's hidden size 64 must split into heads of an even " \
        "size; choose one of 1, 2, 4, 8, 16, 32" in one_error_line(capsys)
    assert not (tmp_path / "run").exists()
    from fastlatent.model.loading import known_hidden_size

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text('{"hidden_size": 96}')
    assert known_hidden_size(str(tmp_path / "model")) == 96
    assert known_hidden_size("smollm2-135m") == 576
    assert known_hidden_size("some/hub-id") is None


def test_a_write_that_fails_mid_run_is_one_line_and_the_run_is_marked_failed(tmp_path, capsys,
                                                                             monkeypatch):
    import errno

    out = tmp_path / "run"

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(out / "checkpoints"))

    monkeypatch.setattr("fastlatent.sft.checkpoint_after_step", full_disk)
    assert smoke(out) == 1
    line = one_error_line(capsys)
    assert line.startswith(f"error: cannot write or read {out / 'checkpoints'}: No space left "
                           "on device (ENOSPC)")
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["status"] == "failed" and "ENOSPC" in manifest["segments"][-1]["message"]


def test_titles_come_from_the_trie_path_not_the_decoded_text(tiny_reasoner, synthetic_dataset,
                                                             monkeypatch):
    """A tokenizer that normalises text on decoding (here: upper case, the extreme of NFC
    or space clean-up) must not turn an exact catalogue path into a miss: each beam's
    title is the catalogue title its trie path encodes."""
    import fastlatent.evaluate as evaluate
    from fastlatent.config import EvalConfig

    builder = PromptBuilder(tiny_reasoner.tokenizer, domain=synthetic_dataset.domain)
    trie = evaluate.build_title_trie(builder, synthetic_dataset.catalogue)
    rows = synthetic_dataset.split("test")[:3]
    cfg = EvalConfig(num_beams=3, max_new_tokens=24, eval_batch_size=3)
    plain = evaluate.evaluate(tiny_reasoner, rows, builder, trie, cfg).predictions
    decode = tiny_reasoner.tokenizer.decode
    monkeypatch.setattr(tiny_reasoner.tokenizer, "decode",
                        lambda *a, **k: decode(*a, **k).upper())
    shouting = evaluate.evaluate(tiny_reasoner, rows, builder, trie, cfg).predictions
    titles = set(synthetic_dataset.catalogue.titles)
    assert [r["predictions"] for r in shouting] == [r["predictions"] for r in plain]
    assert all(t in titles for r in shouting for t in r["predictions"])
    assert [r["rank"] for r in shouting] == [r["rank"] for r in plain]
