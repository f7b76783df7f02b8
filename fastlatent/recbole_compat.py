"""What RecBole 1.2.1 needs to run beside torch >= 2.6, numpy 2 and this package.

RecBole (the ``baselines`` extra) was released for numpy 1, pandas 1/2 and torch < 2.6.
Each shim below is one function with the reason it exists; :mod:`fastlatent.baselines`
applies them and tests/cli/test_baselines.py tests each. Nothing happens at import: recbole
itself is imported only inside the functions, and never ``recbole.quick_start``.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import importlib.util
import logging
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fastlatent.errors import UserError

RECBOLE_REQUIREMENT = "recbole==1.2.1"
INSTALL_HINT = "pip install -e '.[baselines]'"
LOG_FILE = "recbole.log"


class BaselineSetupError(UserError, RuntimeError):
    """RecBole or one of its dependencies is missing or in a version it cannot run with."""


def check_recbole_installed() -> None:
    """RecBole present (found without importing it); else a :class:`BaselineSetupError`."""
    if importlib.util.find_spec("recbole") is None:
        raise BaselineSetupError(f"RecBole is not installed; the baselines need "
                                 f"{RECBOLE_REQUIREMENT}: {INSTALL_HINT}")


# Shim 1: numpy 2 removed the aliases np.float_, np.complex_, np.unicode_ (and earlier
# np.float, np.int, ...). RecBole's Config.__init__ runs ``np.float = np.float_`` and its
# evaluator and dataset code use np.float / np.bool / np.long, so every alias must exist
# before Config is built. Only missing names are set, each to what numpy 1 had.
NUMPY_ALIASES = {
    "float_": "float64", "complex_": "complex128", "unicode_": "str_",
    "bool": "bool_", "int": "int_", "float": "float64", "complex": "complex128",
    "object": "object_", "str": "str_", "long": "int_",
}


def restore_numpy_aliases() -> list[str]:
    """Set each missing alias of :data:`NUMPY_ALIASES` on numpy; returns the names set."""
    import numpy as np

    added = []
    for alias, target in NUMPY_ALIASES.items():
        if alias not in np.__dict__:  # numpy 2's module __getattr__ raises for removed ones
            setattr(np, alias, getattr(np, target))
            added.append(alias)
    return added


# Shim 2: pandas 3 makes copy-on-write the only mode, and RecBole's ID remapping and
# missing-value filling write through chained assignments (``df[field].fillna(...,
# inplace=True)``), which then silently change a copy: the remapped ids are wrong. There
# is no workaround short of patching RecBole, so refuse to run and name the fix.
def check_pandas(version: str | None = None) -> None:
    """Raise :class:`BaselineSetupError` unless pandas < 3 is installed (``version``: the
    version to check, by default the installed one, read without importing pandas)."""
    if version is None:
        try:
            version = importlib.metadata.version("pandas")
        except importlib.metadata.PackageNotFoundError:
            raise BaselineSetupError(f"pandas is not installed; RecBole needs pandas < 3: "
                                     f"{INSTALL_HINT}") from None
    major = version.split(".", 1)[0]
    if not major.isdigit() or int(major) >= 3:
        raise BaselineSetupError(
            f"pandas {version} is installed, but RecBole 1.2.1 needs pandas < 3 (pandas "
            f"3's copy-on-write breaks its ID remapping): pip install 'pandas<3' "
            f"(or {INSTALL_HINT})")


# Shim 3: ``recbole.quick_start`` imports ray (for hyper-parameter tuning), and ray 2.6
# imports ``pkg_resources``, which recent setuptools no longer ships. The baselines need
# none of it: import Config, the data helpers, the Trainer and the model classes directly.
def import_recbole() -> dict[str, Any]:
    """The RecBole objects the baselines use: ``Config``, ``create_dataset``,
    ``data_preparation``, ``Trainer``, ``init_seed``, ``Interaction`` and
    ``sequential_models`` (the module of the sequential model classes). Never imports
    ``recbole.quick_start``."""
    check_recbole_installed()
    restore_numpy_aliases()
    import torch

    # Shim 7: importing the sequential models runs recbole/model/sequential_recommender/
    # sine.py, which calls torch.autograd.set_detect_anomaly(True) at module level: every
    # later backward in the process (fastlatent's own, too) would be slowed and would
    # raise on a NaN gradient instead of letting the non-finite-step guard skip it.
    anomaly = torch.is_anomaly_enabled()
    try:
        from recbole.config import Config
        from recbole.data import create_dataset, data_preparation
        from recbole.data.interaction import Interaction
        from recbole.model import sequential_recommender
        from recbole.trainer import Trainer
        from recbole.utils import init_seed
    finally:
        torch.autograd.set_detect_anomaly(anomaly)

    return {"Config": Config, "create_dataset": create_dataset,
            "data_preparation": data_preparation, "Trainer": Trainer, "init_seed": init_seed,
            "Interaction": Interaction, "sequential_models": sequential_recommender}


# Shim 4: RecBole's Trainer saves the best model with torch.save and reloads it with a
# bare torch.load, which torch >= 2.6 refuses (weights_only=True cannot unpickle the saved
# Config). The subclass keeps the best state dict in memory instead: RecBole calls
# _save_checkpoint exactly when the validation metric improves (ties included), so the
# early-stopping bookkeeping stays RecBole's own. Nothing is written to disk.
@functools.cache
def in_memory_trainer() -> type:
    """A ``recbole.trainer.Trainer`` subclass whose checkpoints stay in memory:
    ``best_epoch`` (0-based, None before the first) and ``load_best()``."""
    trainer_class = import_recbole()["Trainer"]

    class InMemoryBestTrainer(trainer_class):
        best_epoch: int | None = None
        best_state: dict[str, Any] | None = None

        def _save_checkpoint(self, epoch, verbose=True, **kwargs):
            self.best_epoch = epoch
            self.best_state = {name: value.detach().clone()
                               for name, value in self.model.state_dict().items()}

        def load_best(self) -> None:
            if self.best_state is None:
                raise RuntimeError("expected a best state to load, got none (no epoch has "
                                   "been validated)")
            self.model.load_state_dict(self.best_state)

    return InMemoryBestTrainer


# Shim 5: RecBole writes beside the current directory whatever the config says: the
# Trainer opens ./log_tensorboard (hard-coded), Config reads ``--key=value`` words from
# sys.argv (so our own flags, e.g. --epochs=3, would leak into it), and every component
# logs to the root logger (colour codes included). Inside this context RecBole runs in
# ``workdir`` with an empty argv, its log and Python warnings go to workdir/recbole.log
# (colours stripped) and nowhere else, and all of that is put back afterwards.
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class _PlainFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return _ANSI.sub("", super().format(record))


@contextlib.contextmanager
def recbole_session(workdir: str | Path) -> Iterator[Path]:
    """Run RecBole inside ``workdir`` (created), logging to ``workdir/recbole.log``."""
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    handler = logging.FileHandler(workdir / LOG_FILE, encoding="utf-8")
    handler.setFormatter(_PlainFormatter("%(asctime)s %(levelname)s %(message)s"))
    saved_level, saved_argv, saved_cwd = root.level, sys.argv, os.getcwd()
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    logging.captureWarnings(True)
    sys.argv = sys.argv[:1]
    os.chdir(workdir)
    try:
        yield workdir
    finally:
        os.chdir(saved_cwd)
        sys.argv = saved_argv
        logging.captureWarnings(False)
        root.setLevel(saved_level)
        root.removeHandler(handler)
        handler.close()


# Shim 6: Config sets CUDA_VISIBLE_DEVICES to its gpu_id ("0" by default) and then asks
# torch whether CUDA is available, which fixes the process's visible GPUs to that list
# for good (on CPU runs too). CUDA is asked first, with the variable as it was, so the
# change cannot take effect; the variable is put back and the device is the caller's.
def make_recbole_config(config_class: type, model_class: type, dataset: str,
                 config_dict: dict[str, Any], device: str):
    """``config_class(model=..., dataset=..., config_dict=...)`` without side effects on
    the visible CUDA devices; ``config["device"]`` is ``torch.device(device)``."""
    import torch

    torch.cuda.is_available()
    saved = os.environ.get("CUDA_VISIBLE_DEVICES")
    try:
        config = config_class(model=model_class, dataset=dataset, config_dict=config_dict)
    finally:
        if saved is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = saved
    config["device"] = torch.device(device)
    return config
