"""Packaging: the kernels folder is fastlatent.kernels, and from the repo root a library
that probes for a top-level ``kernels`` package (bitsandbytes) still imports cleanly."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_import_from_repo_root_with_bitsandbytes():
    code = "import fastlatent, transformers, bitsandbytes; import fastlatent.kernels; print('ok')"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith("ok")


def test_kernels_init_has_no_imports():
    tree = ast.parse((ROOT / "kernels" / "__init__.py").read_text())
    assert not [n for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom)]


def test_kernels_installs_as_fastlatent_kernels():
    import fastlatent.kernels

    assert Path(fastlatent.kernels.__file__).resolve().parent == ROOT / "kernels"
