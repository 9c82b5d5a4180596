"""What one group can be stored as, and what that costs in bits — scales and zero-points included."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Iterable

from .errors import BadInputError

KNOWN_FORMATS = ("int", "fp", "gguf", "keep")
KEEP_BITS = 16  # "keep" stores the weight as fp16/bf16


@dataclass(frozen=True)
class Element:
    """A sign-exponent-mantissa element format without infinities (OCP FP8 / MX v1.0 §5.3).

    max_value is given rather than derived: E4M3 ("fn") spends its top code on NaN (max 448),
    E5M2 keeps IEEE inf/NaN (max 57344), the MX FP6/FP4 formats use every code for numbers.
    """

    ebits: int
    mbits: int
    max_value: float

    @property
    def bits(self) -> int:
        return 1 + self.ebits + self.mbits

    @property
    def bias(self) -> int:
        return 2 ** (self.ebits - 1) - 1

    @property
    def min_exp(self) -> int:
        """Exponent of the smallest normal binade (subnormals share its step)."""
        return 1 - self.bias

    @property
    def emax(self) -> int:
        """Exponent of the largest normal binade: floor(log2(max_value)) (MX spec's emax_elem)."""
        return int(self.max_value).bit_length() - 1


ELEMENTS = {
    "e4m3": Element(4, 3, 448.0),
    "e5m2": Element(5, 2, 57344.0),
    "e2m3": Element(2, 3, 7.5),
    "e3m2": Element(3, 2, 28.0),
    "e2m1": Element(2, 1, 6.0),
}
# Width of each scale format. e8m0: MX power-of-two block scale; e4m3: NVFP4 block scale.
SCALE_BITS = {"fp16": 16, "fp32": 32, "e8m0": 8, "e4m3": 8}
MX_BLOCK = 32  # OCP MX v1.0 §5: k = 32 elements share one E8M0 scale
NVFP4_BLOCK = 16
NVFP4_TENSOR_SCALE_BITS = 32  # one fp32 second-level scale per tensor



@dataclass(frozen=True)
class GGUFLayout:
    """One llama.cpp tensor type's block (ggml-common.h): `block` weights stored in `block_bytes`.

    bits: width of each weight's code; the rest of the block (fp16 super-scales, packed sub-block
    scales and mins) is the per-block overhead. has_min: the block stores a min (zero-point) too.
    """

    block: int
    block_bytes: int
    bits: int
    has_min: bool

    @property
    def overhead_bits(self) -> int:
        return self.block_bytes * 8 - self.block * self.bits


# Linear GGUF types, most bits first; sizes as gguf.GGML_QUANT_SIZES (tests check they agree).
GGUF_TYPES = {
    "Q8_0": GGUFLayout(32, 34, 8, False),
    "Q6_K": GGUFLayout(256, 210, 6, False),
    "Q5_K": GGUFLayout(256, 176, 5, True),
    "Q5_1": GGUFLayout(32, 24, 5, True),
    "Q5_0": GGUFLayout(32, 22, 5, False),
    "Q4_K": GGUFLayout(256, 144, 4, True),
    "Q4_1": GGUFLayout(32, 20, 4, True),
    "Q4_0": GGUFLayout(32, 18, 4, False),
    "IQ4_NL": GGUFLayout(32, 18, 4, False),
    "IQ4_XS": GGUFLayout(256, 136, 4, False),
    "Q3_K": GGUFLayout(256, 110, 3, False),
    "Q2_K": GGUFLayout(256, 84, 2, True),
}

# Families offered by default_options(formats=...), coarser than options: what hardware supports.
FORMAT_FAMILIES = ("int", "fp8", "fp6", "fp4", "mxfp4", "mxfp6", "mxfp8", "nvfp4", "gguf", "keep")


@dataclass(frozen=True, order=True)
class QuantOption:
    """One storage choice for a weight group.

    group_size: weights per scale along the input dimension; None = one scale per output row
    (per-channel); 0 = one scale for the whole tensor (fp only). scale_bits / zero_bits: storage
    of each group's scale and zero-point; an asymmetric integer zero-point is stored with the
    weight's own bit width (as GPTQ/AWQ pack it). For fmt "fp", `element` names the element
    format and `scale_fmt` the scale's (fp16 per channel/group, fp32 per tensor, e8m0 for MX,
    e4m3 for NVFP4); tensor_scale_bits is stored once per tensor on top (NVFP4's fp32 scale).
    For fmt "gguf", `element` names the llama.cpp tensor type (Q4_K, ...), group_size is its block
    and scale_bits its whole per-block overhead (super-scales, sub-block scales and mins).
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
        if self.fmt not in KNOWN_FORMATS:
            raise ValueError(f"unknown format {self.fmt!r}; known: {', '.join(KNOWN_FORMATS)}")
        if self.group_size is not None and self.group_size < 0:
            raise ValueError(f"group_size must be positive, 0 (per tensor) or None (per channel), got {self.group_size}")
        if self.fmt != "fp" and self.group_size == 0:
            raise ValueError(f"group_size must be positive or None (per channel) for {self.fmt}; "
                             "0 (one scale per tensor) is for fp formats only")
        if self.fmt == "gguf":
            self._check_gguf()
        elif self.fmt != "fp" and (self.element or self.scale_fmt != "fp16" or self.tensor_scale_bits):
            raise ValueError(f"{self.fmt} options take no element, scale_fmt or tensor scale")
        if self.fmt == "int" and not 2 <= self.bits <= 8:
            raise ValueError(f"int bits must be 2..8, got {self.bits}")
        if self.fmt == "fp":
            self._check_fp()

    def _check_fp(self) -> None:
        if self.element not in ELEMENTS:
            raise ValueError(f"unknown fp element {self.element!r}; known: {', '.join(ELEMENTS)}")
        width = ELEMENTS[self.element].bits
        if self.bits != width:
            raise ValueError(f"fp element {self.element} is {width} bits wide, not {self.bits}")
        if not self.symmetric or self.zero_bits:
            raise ValueError("fp options are symmetric and store no zero-point")
        if self.scale_fmt not in SCALE_BITS or self.scale_bits != SCALE_BITS[self.scale_fmt]:
            raise ValueError(f"scale_fmt {self.scale_fmt!r} with scale_bits={self.scale_bits}; "
                             f"known: {', '.join(f'{k} ({v} bits)' for k, v in SCALE_BITS.items())}")
        # Each scale format belongs to one layout, so every valid option has exactly one label.
        g, t = self.group_size, self.tensor_scale_bits
        layouts = {
            "fp16": (g != 0 and t == 0, "fp16 scales are per channel or per group"),
            "fp32": (g == 0 and t == 0, "an fp32 scale is one per tensor (group_size=0)"),
            "e8m0": (g == MX_BLOCK and t == 0, f"MX (e8m0 scales) uses blocks of {MX_BLOCK}"),
            "e4m3": (g == NVFP4_BLOCK and t == NVFP4_TENSOR_SCALE_BITS and self.element == "e2m1",
                     f"NVFP4 (e4m3 scales) is e2m1 in blocks of {NVFP4_BLOCK} plus a {NVFP4_TENSOR_SCALE_BITS}-bit tensor scale"),
        }
        ok, why = layouts[self.scale_fmt]
        if not ok:
            raise ValueError(why)

    def _check_gguf(self) -> None:
        if self.element not in GGUF_TYPES:
            raise ValueError(f"unknown GGUF type {self.element!r}; known: {', '.join(GGUF_TYPES)}")
        t = GGUF_TYPES[self.element]
        layout = (t.bits, t.block, not t.has_min, t.overhead_bits, 0, "fp16", 0)
        if (self.bits, self.group_size, self.symmetric, self.scale_bits, self.zero_bits, self.scale_fmt,
                self.tensor_scale_bits) != layout:
            raise ValueError(f"GGUF type {self.element} has a fixed layout; build it with QuantOption.gguf({self.element!r})")

    @classmethod
    def gguf(cls, ggml_type: str) -> "QuantOption":
        """A llama.cpp tensor type: its block, code width and exact per-block overhead."""
        t = GGUF_TYPES[ggml_type]
        return cls("gguf", t.bits, t.block, not t.has_min, t.overhead_bits, 0, ggml_type)

    @classmethod
    def int_(cls, bits: int, group_size: int | None, symmetric: bool = False) -> "QuantOption":
        return cls("int", bits, group_size, symmetric, 16, 0 if symmetric else bits)

    @classmethod
    def fp(cls, element: str, group_size: int | None) -> "QuantOption":
        """Minifloat elements with an fp16 scale per channel (None) or group, or one fp32 scale (0)."""
        scale_fmt = "fp32" if group_size == 0 else "fp16"
        bits = ELEMENTS[element].bits if element in ELEMENTS else 0
        return cls("fp", bits, group_size, True, SCALE_BITS[scale_fmt], 0, element, scale_fmt)

    @classmethod
    def mx(cls, element: str) -> "QuantOption":
        """OCP MX v1.0: blocks of 32 elements sharing one E8M0 (power-of-two) scale."""
        bits = ELEMENTS[element].bits if element in ELEMENTS else 0
        return cls("fp", bits, MX_BLOCK, True, SCALE_BITS["e8m0"], 0, element, "e8m0")

    @classmethod
    def nvfp4(cls) -> "QuantOption":
        """E2M1 in blocks of 16 with an E4M3 scale each, plus one fp32 scale per tensor."""
        return cls("fp", 4, NVFP4_BLOCK, True, SCALE_BITS["e4m3"], 0, "e2m1", "e4m3", NVFP4_TENSOR_SCALE_BITS)

    @classmethod
    def keep(cls) -> "QuantOption":
        return cls("keep", KEEP_BITS, None, True, 0, 0)

    @property
    def scheme(self) -> str:
        """Which quantizer in bitalloc.formats simulates this option: int, fp, mx, nvfp4 or keep."""
        if self.fmt != "fp":
            return self.fmt
        return {"e8m0": "mx", "e4m3": "nvfp4"}.get(self.scale_fmt, "fp")

    @property
    def family(self) -> str:
        """The FORMAT_FAMILIES entry that offers this option (int, fp8, mxfp4, nvfp4, keep, ...)."""
        scheme = self.scheme
        if scheme in ("int", "keep", "nvfp4", "gguf"):
            return scheme
        return f"{'mx' if scheme == 'mx' else ''}fp{self.bits}"

    @property
    def label(self) -> str:
        scheme = self.scheme
        if scheme == "keep":
            return "fp16"
        if scheme == "nvfp4":
            return "nvfp4"
        if scheme == "gguf":
            return self.element
        if scheme == "mx":
            return f"mxfp{self.bits}" + ("" if self.element == "e2m1" else self.element)
        g = "ch" if self.group_size is None else ("tensor" if self.group_size == 0 else f"g{self.group_size}")
        if scheme == "fp":
            return f"fp{self.bits}{self.element}-{g}"
        return f"int{self.bits}-{g}-{'sym' if self.symmetric else 'asym'}"

    def fits(self, in_features: int) -> bool:
        """Can this option tile a row of `in_features` weights exactly?"""
        return not self.group_size or in_features % self.group_size == 0

    def storage_bits(self, out_features: int, in_features: int) -> int:
        """Exact bits to store an [out, in] matrix: payload, per-group scale and zero-point,
        and the per-tensor scale where the format has one."""
        if not self.fits(in_features):
            raise ValueError(f"{self.label} does not divide in_features={in_features}")
        if self.group_size is None:
            groups = out_features
        elif self.group_size == 0:
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

    formats: families among FORMAT_FAMILIES; default INT + keep. `bits` and `symmetric` shape the
    INT grid; `group_sizes` the INT and plain FP (fp8/fp6/fp4) grids. fp8 also gets a per-tensor
    fp32 scale. MX and NVFP4 have fixed block sizes, so they add one option per element format.
    """
    families = ("int", "keep") if formats is None else tuple(formats)
    unknown = [f for f in families if f not in FORMAT_FAMILIES]
    if unknown:
        raise BadInputError(f"unknown format famil{'y' if len(unknown) == 1 else 'ies'} {', '.join(map(repr, unknown))}; "
                            f"choose from {', '.join(FORMAT_FAMILIES)}")
    group_sizes = tuple(group_sizes)
    per_family = {
        "int": lambda: [QuantOption.int_(b, g, s) for b in bits for g in group_sizes for s in symmetric],
        "fp8": lambda: [QuantOption.fp(e, g) for e in ("e4m3", "e5m2") for g in (0, *group_sizes)],
        "fp6": lambda: [QuantOption.fp(e, g) for e in ("e2m3", "e3m2") for g in group_sizes],
        "fp4": lambda: [QuantOption.fp("e2m1", g) for g in group_sizes],
        "mxfp4": lambda: [QuantOption.mx("e2m1")],
        "mxfp6": lambda: [QuantOption.mx("e2m3"), QuantOption.mx("e3m2")],
        "mxfp8": lambda: [QuantOption.mx("e4m3"), QuantOption.mx("e5m2")],
        "nvfp4": lambda: [QuantOption.nvfp4()],
        "gguf": lambda: [QuantOption.gguf(t) for t in _gguf_implemented()],
        "keep": lambda: [QuantOption.keep()] if include_keep else [],
    }
    opts = {o for f in families for o in per_family[f]()}
    return sorted(opts, key=option_sort_key)


def _gguf_implemented() -> list[str]:
    """GGUF types bitalloc can quantize (formats/gguf.py), the ones the gguf family offers."""
    from .formats.gguf import QUANTIZERS  # formats import this module; import on use

    return list(QUANTIZERS)


def option_sort_key(o: QuantOption) -> tuple:
    # Within one element: per tensor (0), then groups by size, then per channel (None); scale format last.
    return (o.fmt, o.bits, o.element, o.group_size is None, o.group_size or 0, o.symmetric, o.scale_fmt)


_INT_LABEL = re.compile(r"int(\d+)-(ch|g\d+)-(sym|asym)")
_FP_LABEL = re.compile(r"fp(\d+)(e\dm\d)-(ch|tensor|g\d+)")
_MX_LABEL = re.compile(r"mxfp(\d+)(e\dm\d)?")
LABEL_EXAMPLES = "'int4-g64-asym', 'int8-ch-sym', 'fp8e4m3-ch', 'fp8e4m3-tensor', 'fp4e2m1-g32', 'mxfp4', 'mxfp6e3m2', 'nvfp4', 'Q4_K' or 'fp16'"


def parse_option(label: str) -> QuantOption:
    """Inverse of `QuantOption.label`: 'int4-g64-asym', 'fp8e4m3-ch', 'mxfp4', 'nvfp4', 'fp16', ..."""
    if label in ("fp16", "keep", "bf16"):
        return QuantOption.keep()
    try:
        if label == "nvfp4":
            return QuantOption.nvfp4()
        if label.upper() in GGUF_TYPES:
            return QuantOption.gguf(label.upper())
        if m := _INT_LABEL.fullmatch(label):
            group = None if m[2] == "ch" else int(m[2][1:])
            if group == 0:
                raise ValueError("group size must be positive")
            return QuantOption.int_(int(m[1]), group, m[3] == "sym")
        if m := _FP_LABEL.fullmatch(label):
            group = {"ch": None, "tensor": 0}.get(m[3])
            if group is None and m[3] != "ch":
                group = int(m[3][1:])
                if group == 0:
                    raise ValueError("group size must be positive; per tensor is '-tensor'")
            return _checked_bits(QuantOption.fp(m[2], group), int(m[1]))
        if m := _MX_LABEL.fullmatch(label):
            element = m[2] or ("e2m1" if m[1] == "4" else "")
            if not element:
                raise ValueError(f"mxfp{m[1]} needs an element, e.g. mxfp{m[1]}{'e2m3' if m[1] == '6' else 'e4m3'}")
            return _checked_bits(QuantOption.mx(element), int(m[1]))
        raise ValueError
    except ValueError as e:
        detail = f" ({e})" if str(e) else ""
        raise BadInputError(f"cannot parse option {label!r}{detail}; write e.g. {LABEL_EXAMPLES}") from None


def _checked_bits(option: QuantOption, bits: int) -> QuantOption:
    if option.bits != bits:
        raise ValueError(f"{option.element} is {option.bits} bits wide, the label says {bits}")
    return option
