"""The errors a user can fix by changing a flag, a file or a folder.

``python -m fastlatent.train`` prints such an error as one line (no traceback) and exits
non-zero; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """Base of the expected errors; the message names what to fix."""


class DataError(UserError, ValueError):
    """Input data that cannot be read; the message names the file, the place and the fix."""


class CheckpointError(UserError, ValueError):
    """A checkpoint that is missing, incomplete or corrupt; the message names the file."""


class TrainingStopped(UserError, RuntimeError):
    """Training cannot go on (e.g. non-finite values step after step); names the step."""


class RunFolderError(UserError, RuntimeError):
    """The output folder holds another run, or another process is writing to it."""


class ModelLoadError(UserError, ValueError):
    """A --model that cannot be loaded (missing file, unknown id offline, bad format)."""


class EvaluationError(UserError, RuntimeError):
    """A model that cannot be evaluated (non-finite weights) or an evaluation that ranked
    nothing for a row; names the stage, the row and the likely cause."""
