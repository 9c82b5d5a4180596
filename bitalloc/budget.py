"""Budgets as users write them: '3.2bits', '1.5GB', '800MB', '2GiB', '30%'."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from .errors import BadInputError

_UNITS = {
    "bits": ("bits", 1.0),
    "bit": ("bits", 1.0),
    "bpw": ("bits", 1.0),
    "%": ("percent", 1.0),
    "b": ("bytes", 1.0),
    "kb": ("bytes", 1e3),
    "mb": ("bytes", 1e6),
    "gb": ("bytes", 1e9),
    "kib": ("bytes", 2.0**10),
    "mib": ("bytes", 2.0**20),
    "gib": ("bytes", 2.0**30),
}
_PATTERN = re.compile(r"^\s*([-+]?[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([a-zA-Z%]+)\s*$")
_EXAMPLES = "e.g. '3.2bits' (average storage bits per planned weight), '1.5GB', '800MB', '2GiB' or '30%' (of fp16 size)"


@dataclass(frozen=True)
class Budget:
    """kind: 'bits' (storage bits per planned weight), 'bytes' (total), or 'percent' (of fp16 size)."""

    kind: str
    value: float
    text: str

    def max_storage_bits(self, num_weights: int) -> float:
        """The budget as total storage bits for `num_weights` planned weights."""
        if self.kind == "bits":
            return self.value * num_weights
        if self.kind == "bytes":
            return self.value * 8
        return self.value / 100 * 16 * num_weights

    def describe(self, storage_bits: float, num_weights: int) -> str:
        """Express a storage amount in this budget's own unit (for error messages)."""
        if self.kind == "bits":
            return f"{storage_bits / num_weights:.4g}bits"
        if self.kind == "bytes":
            return f"{storage_bits / 8 / 1e6:.4g}MB"
        return f"{storage_bits / (16 * num_weights) * 100:.4g}%"

    def to_dict(self) -> dict:
        return {"kind": self.kind, "value": self.value, "text": self.text}


def parse_budget(text: str | Budget) -> Budget:
    if isinstance(text, Budget):
        return text
    m = _PATTERN.match(str(text))
    if not m:
        raise BadInputError(f"cannot read budget {text!r}: write a number with a unit, {_EXAMPLES}")
    number, unit = float(m.group(1)), m.group(2).lower()
    if unit not in _UNITS:
        raise BadInputError(f"unknown budget unit {m.group(2)!r} in {text!r}: {_EXAMPLES}")
    kind, factor = _UNITS[unit]
    value = number * factor
    if not math.isfinite(value):  # '1e309bits' parses as inf; no solver can use it
        raise BadInputError(f"budget {text!r} is not a finite number: write a number with a unit, {_EXAMPLES}")
    if value <= 0:
        raise BadInputError(f"budget must be positive, got {text!r}: {_EXAMPLES}")
    if kind == "percent" and value > 100:
        raise BadInputError(f"a percentage budget is of the fp16 size and cannot exceed 100%, got {text!r}: {_EXAMPLES}")
    return Budget(kind, value, str(text).strip())
