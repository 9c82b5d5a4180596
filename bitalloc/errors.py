"""One exception family for everything a user can cause; the CLI prints these as one line."""


class BitallocError(Exception):
    """Base class. `exit_code` 2 means bad input, 1 means an internal failure."""

    exit_code = 1


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
