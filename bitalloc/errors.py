"""One exception family for everything a user can cause; the CLI prints these as one line.

A message names the setting to change as `setting("seq_len")`, not as a flag: the library does not
know whether it was called from Python (where the fix is the keyword `seq_len`), over HTTP (the JSON
field `seq_len`) or from the command line (the flag `--seq-len`). `str(error)` spells settings as
Python names; each adapter phrases them its own way with `error.phrased(spell)`.
"""

from __future__ import annotations

import re
from typing import Callable

_SETTING = re.compile(r"\[\[setting:([\w.]+)\]\]")


def setting(name: str) -> str:
    """A placeholder for the setting (config field / keyword argument) `name` inside an error message."""
    return f"[[setting:{name}]]"


def python_name(name: str) -> str:
    return name


class BitallocError(Exception):
    """Base class. `exit_code` 2 means bad input, 1 means an internal failure."""

    exit_code = 1

    def phrased(self, spell: Callable[[str], str]) -> str:
        """The message with every setting() placeholder spelled by `spell` (e.g. as a CLI flag)."""
        return _SETTING.sub(lambda m: spell(m.group(1)), super().__str__())

    def __str__(self) -> str:
        return self.phrased(python_name)


class BadInputError(BitallocError):
    """The user gave something we cannot use; the message says what and how to fix it."""

    exit_code = 2


class BudgetInfeasibleError(BadInputError):
    """No assignment of the allowed options fits the budget (or the budget is above fp16)."""


class PlanMismatchError(BadInputError):
    """A plan was made for another model, or names modules/shapes the model does not have."""


class PlanVersionError(BadInputError):
    """A plan file was written by a newer (or unknown) schema version."""


class ProfileMismatchError(BadInputError):
    """A profile folder was made for other weights, modules or calibration text than the ones given."""


class CalibrationMismatchError(BadInputError):
    """Calibration text or windows are not the ones a plan was calibrated on (their sha256 differs)."""


class OutputPathError(BadInputError):
    """An output location (--out) cannot take what would be written there: wrong kind of entry, or not writable."""


class NonFiniteError(BadInputError):
    """A weight, a statistic or a predicted cost is NaN or infinite; planning on it would be garbage."""
