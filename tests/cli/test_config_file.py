"""``--config FILE``: defaults < preset < file < explicit flags; the run's resolved
configuration is written to OUTPUT_DIR/config.yaml and reproduces the run when fed back."""

from __future__ import annotations

import json
import re

import pytest

from fastlatent.config import ConfigError, build_config, config_file_text, load_config_file
from fastlatent.train import main, parse_args


def write(tmp_path, text, name="run.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_file_sits_between_the_preset_and_the_flags(tmp_path):
    path = write(tmp_path, "preset: smoke\nsft_lr: 0.01\nrl:\n  sigma: 0.5\n  num-samples: 4\n")
    cfg, explicit = parse_args(["--config", path, "--sigma", "2.0"])
    assert cfg.run.preset == "smoke"  # the file may name the preset
    assert cfg.model.model == "tiny-random"  # the preset's value, not in the file
    assert cfg.sft.sft_lr == 0.01  # the file over the preset (smoke: 3e-3)
    assert cfg.rl.num_samples == 4
    assert cfg.rl.sigma == 2.0  # the flag over the file
    assert {"sft_lr", "num_samples", "sigma"} <= explicit
    cfg, _ = parse_args(["--config", path, "--preset", "cpu"])
    assert cfg.run.preset == "cpu" and cfg.sft.sft_lr == 0.01


def test_json_and_yaml_read_the_same(tmp_path):
    settings = {"sft": {"sft_epochs": 2}, "eval_batch_size": 3, "strict": True}
    from_json = load_config_file(write(tmp_path, json.dumps(settings), "run.json"))
    from_yaml = load_config_file(write(tmp_path, "sft:\n  sft_epochs: 2\neval_batch_size: 3\n"
                                       "strict: true\n"))
    assert from_json == from_yaml == {"sft_epochs": 2, "eval_batch_size": 3, "strict": True}


def test_an_int_is_a_float_where_a_float_is_expected(tmp_path):
    assert load_config_file(write(tmp_path, "sigma: 1\n")) == {"sigma": 1.0}


@pytest.mark.parametrize("text,named", [
    ("sft_lrr: 0.1\n", "did you mean sft_lr"),
    ("sft_epochs: two\n", "sft_epochs: expected a int"),
    ("sft_epochs: 2.5\n", "sft_epochs: expected a int"),
    ("strict: 1\n", "strict: expected a bool"),
    ("latent: ratt2\n", "not one of"),
    ("output_dir: runs/x\n", "--output-dir on the command line"),
    ("resume: true\n", "--resume on the command line"),
    ("- sft_lr\n", "expected a mapping"),
    ("sft_lr: [unclosed\n", "not valid YAML"),
    ("sft_batch_size: 8\nsft-batch-size: 16\n",
     "sft_batch_size is given twice (as 'sft_batch_size' at the top level and as "
     "'sft-batch-size' at the top level)"),
    ("sigma: 1.0\nrl:\n  sigma: 2.0\n",
     "sigma is given twice (as 'sigma' at the top level and as 'sigma' under rl)"),
    ("sft_lr: 0.1\nsft_lr: 0.2\n", "sft_lr is given twice in one mapping (line 1)"),
])
def test_a_bad_file_is_one_line_naming_the_key(tmp_path, text, named, capsys):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=re.escape(named)):
        load_config_file(path)
    assert main(["--config", path, "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --config") and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_a_missing_file_is_named(tmp_path, capsys):
    assert main(["--config", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml: cannot be read" in capsys.readouterr().err


def test_the_written_file_reads_back_to_the_same_configuration():
    cfg = build_config("smoke", {"sft_lr": 0.02, "advantage": "group", "output_dir": "x"})
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.yaml"
        path.write_text(config_file_text(cfg))
        values = load_config_file(str(path))
        again = build_config(values.pop("preset"), values)
    assert again.run.output_dir == ""  # folder actions are not part of a run's settings
    again.run.output_dir = "x"
    assert again == cfg


def test_a_run_from_a_checkpoint_leaves_the_model_settings_out():
    cfg = build_config("smoke", {"checkpoint": "runs/a/sft"})
    text = config_file_text(cfg)
    assert "checkpoint: runs/a/sft" in text
    for name in ("model:", "latent:", "ratt_heads:", "num_latents:"):
        assert f"  {name}" not in text


@pytest.mark.slow
def test_feeding_back_config_yaml_repeats_the_run(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    flags = ["--preset", "smoke", "--sft-epochs", "1", "--rl-max-steps", "1",
             "--eval-limit", "4"]
    assert main([*flags, "--output-dir", str(first)]) == 0
    assert main(["--config", str(first / "config.yaml"), "--output-dir", str(second)]) == 0
    assert (second / "config.yaml").read_text() == (first / "config.yaml").read_text()
    assert (second / "metrics.json").read_text() == (first / "metrics.json").read_text()


def test_a_key_repeated_in_a_json_object_is_named(tmp_path):
    with pytest.raises(ConfigError, match="sigma is given twice in one object"):
        load_config_file(write(tmp_path, '{"sigma": 1.0, "sigma": 2.0}', "run.json"))
