"""What one group can be stored as, and what that costs in bits — scales and zero-points included."""

from __future__ import annotations

import importlib
from dataclasses import asdict, dataclass
from typing import Iterable

from .errors import BadInputError
from .formats import Grid, all_formats, format_of, grid_names

# Names that moved to their family's module (bitalloc/formats), still importable from here.
_MOVED = {"ELEMENTS": "fp", "Element": "fp", "SCALE_BITS": "fp", "MX_BLOCK": "mx", "NVFP4_BLOCK": "nvfp4",
          "GGUF_TYPES": "gguf", "GGUFLayout": "gguf", "KEEP_BITS": "keep"}


def _family_module(name: str):
    return importlib.import_module(f".formats.{name}", __package__)


def __getattr__(name: str) -> object:
    if name == "FORMAT_FAMILIES":  # computed on use: a family registered later offers its grids too
        return grid_names()
    if name in _MOVED:
        return getattr(_family_module(_MOVED[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# group_size's two values that are not a group of weights along a row (a plan stores them as they are).
PER_CHANNEL = None  # one scale per output row
PER_TENSOR = 0  # one scale for the whole tensor (fp only)


@dataclass(frozen=True, order=True)
class QuantOption:
    """One storage choice for a weight group; its family (bitalloc/formats, by fmt and scale_fmt)
    says which field values are valid, what the option is called and how it is quantized.

    group_size: weights per scale along the input dimension; None = one scale per output row
    (per-channel); 0 = one scale for the whole tensor (fp only). scale_bits / zero_bits: storage
    of each group's scale and zero-point; an asymmetric integer zero-point is stored with the
    weight's own bit width (as GPTQ/AWQ pack it). For fmt "fp", `element` names the element
    format and `scale_fmt` the scale's (fp16 per channel/group, fp32 per tensor, e8m0 for MX,
    e4m3 for NVFP4); tensor_scale_bits is stored once per tensor on top (NVFP4's fp32 scale).
    For fmt "gguf", `element` names the llama.cpp tensor type (Q4_K, ...), group_size is its block
    and scale_bits its whole per-block overhead (super-scales, sub-block scales and mins).
    Storage is these fields' sum (storage_bits): every family states its overhead through them.
    """

    fmt: str = "int"
    bits: int = 4
    group_size: int | None = 64
    symmetric: bool = False
    scale_bits: int = 16
    zero_bits: int = 0
    element: str = ""
    scale_fmt: str = "fp16"
    tensor_scale_bits: int = 0

    def __post_init__(self) -> None:
        if self.group_size is not None and self.group_size < 0:
            raise ValueError(f"group_size must be positive, 0 (per tensor) or None (per channel), got {self.group_size}")
        format_of(self).check(self)

    # The built-in families' constructors (bitalloc/formats/<family>.py), imported on use: those modules import this one.
    @classmethod
    def int_(cls, bits: int, group_size: int | None, symmetric: bool = False) -> "QuantOption":
        return _family_module("int").int_option(bits, group_size, symmetric)

    @classmethod
    def fp(cls, element: str, group_size: int | None) -> "QuantOption":
        return _family_module("fp").fp_option(element, group_size)

    @classmethod
    def mx(cls, element: str) -> "QuantOption":
        return _family_module("mx").mx_option(element)

    @classmethod
    def nvfp4(cls) -> "QuantOption":
        return _family_module("nvfp4").nvfp4_option()

    @classmethod
    def gguf(cls, ggml_type: str) -> "QuantOption":
        return _family_module("gguf").gguf_option(ggml_type)

    @classmethod
    def keep(cls) -> "QuantOption":
        return _family_module("keep").keep_option()

    @property
    def scheme(self) -> str:
        """The family (bitalloc/formats) that checks, labels and quantizes this option: int, fp, mx, nvfp4, gguf, keep."""
        return format_of(self).name

    @property
    def family(self) -> str:
        """The grid that offers this option (FORMAT_FAMILIES: int, fp8, mxfp4, nvfp4, keep, ...)."""
        f = format_of(self)
        return f.grid_of(self) if f.grid_of else next(iter(f.grids))

    @property
    def label(self) -> str:
        return format_of(self).label(self)

    @property
    def per_channel(self) -> bool:
        """One scale per output row (group_size PER_CHANNEL)."""
        return self.group_size is PER_CHANNEL

    @property
    def per_tensor(self) -> bool:
        """One scale for the whole tensor (group_size PER_TENSOR)."""
        return self.group_size == PER_TENSOR

    def fits(self, in_features: int) -> bool:
        """Can this option tile a row of `in_features` weights exactly?"""
        return self.per_channel or self.per_tensor or in_features % self.group_size == 0

    def storage_bits(self, out_features: int, in_features: int) -> int:
        """Exact bits to store an [out, in] matrix: payload, per-group scale and zero-point,
        and the per-tensor scale where the format has one."""
        if not self.fits(in_features):
            raise ValueError(f"{self.label} does not divide in_features={in_features}")
        if self.per_channel:
            groups = out_features
        elif self.per_tensor:
            groups = 1
        else:
            groups = out_features * (in_features // self.group_size)
        overhead = groups * (self.scale_bits + self.zero_bits) + self.tensor_scale_bits
        return out_features * in_features * self.bits + overhead

    def bits_per_weight(self, in_features: int, out_features: int = 1) -> float:
        """Storage bits per weight of an [out, in] matrix. Per-channel overhead depends on
        `in_features`; per-tensor overhead (group_size=0, NVFP4) on both, hence `out_features`."""
        return self.storage_bits(out_features, in_features) / (out_features * in_features)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "QuantOption":
        return cls(**d)


DEFAULT_BITS = (2, 3, 4, 5, 6, 8)  # the default grid's INT widths
DEFAULT_GROUP_SIZES = (32, 64, 128, None)  # ... and group sizes (None: one scale per output channel)


def default_options(
    bits: Iterable[int] = DEFAULT_BITS,
    group_sizes: Iterable[int | None] = DEFAULT_GROUP_SIZES,
    symmetric: Iterable[bool] = (False, True),
    include_keep: bool = True,
    formats: Iterable[str] | None = None,
) -> list[QuantOption]:
    """The candidate grid the planner chooses from (each group later keeps only those that fit).

    formats: grids among FORMAT_FAMILIES (every registered family's); default INT + keep. `bits` and
    `symmetric` shape the INT grid; `group_sizes` the INT and plain FP (fp8/fp6/fp4) grids. fp8 also
    gets a per-tensor fp32 scale. MX and NVFP4 have fixed block sizes, so they add one option per element.
    """
    families = ("int", "keep") if formats is None else tuple(formats)
    builders = {name: build for f in all_formats() for name, build in f.grids.items()}
    unknown = [f for f in families if f not in builders]
    if unknown:
        raise BadInputError(f"unknown format famil{'y' if len(unknown) == 1 else 'ies'} {', '.join(map(repr, unknown))}; "
                            f"choose from {', '.join(builders)}")
    grid = Grid(tuple(bits), tuple(group_sizes), tuple(symmetric))
    opts = {o for f in families if include_keep or f != "keep" for o in builders[f](grid)}
    return sorted(opts, key=option_sort_key)


def option_sort_key(o: QuantOption) -> tuple:
    # Within one element: per tensor (0), then groups by size, then per channel (None); scale format last.
    return (o.fmt, o.bits, o.element, o.per_channel, o.group_size or 0, o.symmetric, o.scale_fmt)


def label_examples() -> str:
    examples = [f"'{e}'" for f in all_formats() for e in f.label_examples]
    return ", ".join(examples[:-1]) + " or " + examples[-1]


def parse_option(label: str) -> QuantOption:
    """Inverse of `QuantOption.label`: 'int4-g64-asym', 'fp8e4m3-ch', 'mxfp4', 'nvfp4', 'fp16', ..."""
    try:
        for f in all_formats():
            if (option := f.parse(label)) is not None:
                return option
        raise ValueError
    except ValueError as e:
        detail = f" ({e})" if str(e) else ""
        raise BadInputError(f"cannot parse option {label!r}{detail}; write e.g. {label_examples()}") from None
