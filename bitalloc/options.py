"""What one group can be stored as, and what that costs in bits — scales and zero-points included."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterable

from .errors import BadInputError

# Formats this release can simulate; FP8/FP4/MX add entries here (and a quantizer in formats/).
KNOWN_FORMATS = ("int", "keep")
KEEP_BITS = 16  # "keep" stores the weight as fp16/bf16


@dataclass(frozen=True, order=True)
class QuantOption:
    """One storage choice for a weight group.

    group_size: weights per scale along the input dimension; None = one scale per output row
    (per-channel). scale_bits / zero_bits: storage of each group's scale and zero-point; an
    asymmetric integer zero-point is stored with the weight's own bit width (as GPTQ/AWQ pack it).
    """

    fmt: str = "int"
    bits: int = 4
    group_size: int | None = 64
    symmetric: bool = False
    scale_bits: int = 16
    zero_bits: int = 0

    def __post_init__(self) -> None:
        if self.fmt not in KNOWN_FORMATS:
            raise ValueError(f"unknown format {self.fmt!r}; known: {', '.join(KNOWN_FORMATS)}")
        if self.fmt == "int" and not 2 <= self.bits <= 8:
            raise ValueError(f"int bits must be 2..8, got {self.bits}")
        if self.group_size is not None and self.group_size <= 0:
            raise ValueError(f"group_size must be positive or None (per-channel), got {self.group_size}")

    @classmethod
    def int_(cls, bits: int, group_size: int | None, symmetric: bool = False) -> "QuantOption":
        return cls("int", bits, group_size, symmetric, 16, 0 if symmetric else bits)

    @classmethod
    def keep(cls) -> "QuantOption":
        return cls("keep", KEEP_BITS, None, True, 0, 0)

    @property
    def label(self) -> str:
        if self.fmt == "keep":
            return "fp16"
        g = "ch" if self.group_size is None else f"g{self.group_size}"
        return f"int{self.bits}-{g}-{'sym' if self.symmetric else 'asym'}"

    def fits(self, in_features: int) -> bool:
        """Can this option tile a row of `in_features` weights exactly?"""
        return self.group_size is None or in_features % self.group_size == 0

    def storage_bits(self, out_features: int, in_features: int) -> int:
        """Exact bits to store an [out, in] matrix: payload plus per-group scale and zero-point."""
        if not self.fits(in_features):
            raise ValueError(f"{self.label} does not divide in_features={in_features}")
        groups_per_row = 1 if self.group_size is None else in_features // self.group_size
        overhead = out_features * groups_per_row * (self.scale_bits + self.zero_bits)
        return out_features * in_features * self.bits + overhead

    def bits_per_weight(self, in_features: int) -> float:
        """Storage bits per weight for rows of `in_features` (per-channel overhead depends on it)."""
        return self.storage_bits(1, in_features) / in_features

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "QuantOption":
        return cls(**d)


def default_options(
    bits: Iterable[int] = (2, 3, 4, 5, 6, 8),
    group_sizes: Iterable[int | None] = (32, 64, 128, None),
    symmetric: Iterable[bool] = (False, True),
    include_keep: bool = True,
) -> list[QuantOption]:
    """The candidate grid the planner chooses from (each group later keeps only those that fit)."""
    opts = {QuantOption.int_(b, g, s) for b in bits for g in group_sizes for s in symmetric}
    if include_keep:
        opts.add(QuantOption.keep())
    return sorted(opts, key=option_sort_key)


def option_sort_key(o: QuantOption) -> tuple:
    return (o.fmt, o.bits, o.group_size is None, o.group_size or 0, o.symmetric)


def parse_option(label: str) -> QuantOption:
    """Inverse of `QuantOption.label`: 'int4-g64-asym', 'int8-ch-sym', 'fp16'."""
    if label in ("fp16", "keep", "bf16"):
        return QuantOption.keep()
    parts = label.split("-")
    try:
        if len(parts) != 3 or not parts[0].startswith("int") or parts[2] not in ("sym", "asym"):
            raise ValueError
        bits = int(parts[0][3:])
        group = None if parts[1] == "ch" else int(parts[1].removeprefix("g"))
        return QuantOption.int_(bits, group, parts[2] == "sym")
    except ValueError as e:
        detail = f" ({e})" if str(e) else ""
        raise BadInputError(
            f"cannot parse option {label!r}{detail}; write e.g. 'int4-g64-asym', 'int8-ch-sym' or 'fp16'"
        ) from None
