"""Budgets as users write them: '3.2bits', '1.5GB', '800MB', '2GiB', '30%'."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

from .errors import BadInputError, setting

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


SCOPES = ("planned", "model")
UNPLANNED_BITS = 16  # unplanned tensors (embedding, head, norms, biases) are stored as fp16/bf16


@dataclass(frozen=True)
class Outside:
    """What the whole model stores besides the planned weights, as its target writes it.

    weights: elements of the tensors the plan does not cover; bits: their storage plus anything else
    the model's file holds whatever the plan (a GGUF file's header, metadata and padding)."""

    weights: int
    bits: float
    what: str

    @classmethod
    def at_16_bits(cls, weights: int) -> "Outside":
        return cls(weights, weights * UNPLANNED_BITS, f"unplanned tensors ({weights:,} weights) at {UNPLANNED_BITS} bits")


@dataclass(frozen=True)
class Budget:
    """kind: 'bits' (storage bits per weight), 'bytes' (total), or 'percent' (of fp16 size).

    scope: 'planned' = of the planned weights only; 'model' = of the whole model as its target stores
    it: what lies outside the plan (an `Outside`: the unplanned tensors at 16 bits, or for a GGUF
    file everything the file holds besides the planned tensors) is a constant the planned weights'
    budget is reduced by, and a bits or percent budget is over every weight of the model."""

    kind: str
    value: float
    text: str
    scope: str = "planned"

    def max_storage_bits(self, num_weights: int, outside: Outside | int | None = 0) -> float:
        """The budget as total storage bits for `num_weights` planned weights.

        outside: what the whole model holds besides them (an int: that many unplanned weights at 16
        bits); only a 'model' budget uses it, and refuses None (a profile made before it was recorded)."""
        n, fixed = self._whole(num_weights, outside)
        if self.kind == "bits":
            total = self.value * n
        elif self.kind == "bytes":
            total = self.value * 8
        else:
            total = self.value / 100 * 16 * n
        return total - fixed

    def describe(self, storage_bits: float, num_weights: int, outside: Outside | int | None = 0) -> str:
        """Express a planned-weight storage amount in this budget's own unit and scope (for error messages)."""
        n, fixed = self._whole(num_weights, outside)
        bits = storage_bits + fixed
        if self.kind == "bits":
            return f"{bits / n:.4g}bits"
        if self.kind == "bytes":
            return f"{bits / 8 / 1e6:.4g}MB"
        return f"{bits / (16 * n) * 100:.4g}%"

    def _whole(self, num_weights: int, outside: Outside | int | None) -> tuple[int, float]:
        """(weights the budget is over, storage bits fixed outside the plan)."""
        if self.scope == "planned":
            return num_weights, 0
        if outside is None:
            raise BadInputError(f"a whole-model budget ({setting('budget_scope')} model) needs the size of the unplanned "
                                f"tensors, which this profile predates; profile again, or use {setting('budget_scope')} planned")
        if isinstance(outside, int):
            outside = Outside.at_16_bits(outside)
        return num_weights + outside.weights, outside.bits

    def to_dict(self) -> dict:
        return {"kind": self.kind, "value": self.value, "text": self.text, "scope": self.scope}


def default_scope(kind: str, gguf_file: bool) -> str:
    """The scope of a budget given without one: a size budget of a plan in GGUF types of a .gguf model is
    the whole file a llama.cpp user sees ('model'); every other budget is of the planned weights."""
    return "model" if gguf_file and kind == "bytes" else "planned"


def gguf_typed(options, source: object) -> bool:
    """Whether plans from these options of this model are llama.cpp files: every option a GGUF type (or
    kept at 16 bits) and the model a .gguf (whose header, metadata and other tensors the file copies) or a
    checkpoint folder of an architecture `bitalloc apply --format gguf` converts (gguf_hf.py)."""
    if not all(o.fmt in ("gguf", "keep") for o in options):
        return False
    return str(source).endswith(".gguf") or _convertible_folder(str(source))


def _convertible_folder(source: str) -> bool:
    import json
    from pathlib import Path

    from .gguf_hf import HF_ARCHITECTURES

    config = Path(source).expanduser() / "config.json"
    if not config.is_file():
        return False
    archs = json.loads(config.read_text()).get("architectures") or [None]
    return archs[0] in HF_ARCHITECTURES


def parse_budget(text: str | Budget, scope: str | None = None) -> Budget:
    """scope: 'planned' (default) or 'model'; None keeps a Budget's own scope."""
    if scope is not None and scope not in SCOPES:
        raise BadInputError(f"unknown budget scope {scope!r}: 'planned' (the planned weights) or 'model' (the whole model)")
    if isinstance(text, Budget):
        return text if scope is None else replace(text, scope=scope)
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
    return Budget(kind, value, str(text).strip(), scope or "planned")
