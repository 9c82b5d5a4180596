"""One exception family for everything a user can cause; the CLI prints these as one line.

A message names the setting to change as `setting("seq_len")`, not as a flag: the library does not
know whether it was called from Python (where the fix is the keyword `seq_len`), over HTTP (the JSON
field `seq_len`) or from the command line (the flag `--seq-len`). In the same way it names a step to
run again as `step("profile")`: `bitalloc.profile()` in Python, `bitalloc profile` on the command line,
`POST /v1/profiles` over HTTP. `str(error)` spells both for Python; each adapter phrases them its own way
with `error.phrased(spell, spell_step)`.
"""

from __future__ import annotations

import re
from typing import Callable

_SETTING = re.compile(r"\[\[setting:([\w.]+)\]\]")
_STEP = re.compile(r"\[\[step:(\w+)\]\]")


def setting(name: str) -> str:
    """A placeholder for the setting (config field / keyword argument) `name` inside an error message."""
    return f"[[setting:{name}]]"


def step(name: str) -> str:
    """A placeholder for the step `name` (profile, plan, apply, export, latency) the fix runs again."""
    return f"[[step:{name}]]"


def python_name(name: str) -> str:
    return name


# The Python call behind each step (bitalloc's public names; the CLI spells them `bitalloc <step>`).
PYTHON_STEPS = {"profile": "bitalloc.profile()", "plan": "bitalloc.plan()", "apply": "bitalloc.apply()",
                "export": "bitalloc.exports.export_plan()", "latency": "bitalloc.latency.api.measure_latency()"}


def python_step(name: str) -> str:
    return f"`{PYTHON_STEPS.get(name, name)}`"


def cli_step(name: str) -> str:
    return f"`bitalloc {name}`"


def phrase(text: str, spell: Callable[[str], str] = python_name, spell_step: Callable[[str], str] = python_step) -> str:
    """`text` (an error message, or an export's note) with its setting() and step() placeholders spelled."""
    return _STEP.sub(lambda m: spell_step(m.group(1)), _SETTING.sub(lambda m: spell(m.group(1)), text))


class BitallocError(Exception):
    """Base class. `exit_code` 2 means bad input, 1 means an internal failure."""

    exit_code = 1

    def phrased(self, spell: Callable[[str], str], spell_step: Callable[[str], str] = python_step) -> str:
        """The message with every setting() placeholder spelled by `spell` (e.g. as a CLI flag) and every
        step() by `spell_step` (e.g. as a CLI command)."""
        return phrase(self.unphrased, spell, spell_step)

    @property
    def unphrased(self) -> str:
        """The message with its placeholders: what an error that wraps this one quotes, for its adapter to spell."""
        return super().__str__()

    def __str__(self) -> str:
        return self.phrased(python_name, python_step)


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
