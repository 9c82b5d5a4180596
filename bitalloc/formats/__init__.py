"""Number-format families, one module each, behind one registry.

A family's module registers one `Format`: the rules its options obey, its label syntax, the grids it
offers the planner, and round-to-nearest quantization returning the stored codes and scales with the
values. QuantOption, the plan, the quantizers and the packers ask the registry, never a family's name;
adding a family is one module that calls `register_format` (tests/test_toy_format.py adds one).
Importing this package does not import torch: reading a plan or a label needs only the rules.
"""

from __future__ import annotations

import importlib
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    import torch

    from ..options import QuantOption

_BUILTIN = ("int", "fp", "mx", "nvfp4", "gguf", "keep")  # registration order = FORMAT_FAMILIES order


@dataclass
class QuantizedWeight:
    """One quantized weight matrix: what a simulated model runs with and what a packer stores.

    values: [out, in] float32, what the stored weight reproduces.
    codes: [out, in], each weight's stored code: int32 integers (int: signed when symmetric,
      unsigned [0, 2^b-1] with a zero-point when not), float32 element values (fp, mx, nvfp4: each
      exactly representable in the element format); None where the weight is stored as it is (keep)
      or as whole blocks (gguf).
    scale / zero: [out, n_groups] float32 (per channel n_groups = 1, per tensor [1, 1]); zero only
      for formats with zero-points. mx: 2^X per block; nvfp4: the E4M3 block scale.
    tensor_scale: the scale stored once per tensor on top (nvfp4's fp32 global scale), a 0-d tensor.
    values == (codes - zero) · scale (· tensor_scale) per group, exactly.
    blocks: gguf only: the tensor's bytes as a GGUF file stores them, [out, row_bytes] uint8 (numpy).
    """

    option: QuantOption
    values: torch.Tensor
    codes: torch.Tensor | None = None
    scale: torch.Tensor | None = None
    zero: torch.Tensor | None = None
    blocks: Any = None
    tensor_scale: torch.Tensor | None = None


@dataclass(frozen=True)
class Grid:
    """The knobs `default_options` passes to every family's grids (each uses those it has)."""

    bits: tuple[int, ...]
    group_sizes: tuple[int | None, ...]
    symmetric: tuple[bool, ...]


@dataclass(frozen=True)
class Format:
    """Everything bitalloc knows about one number-format family.

    name: the family (QuantOption.scheme). fmt / scale_fmts: the plan fields that select it
      (mx and nvfp4 are fmt "fp" options with e8m0 / e4m3 scales, as plans have always said);
      elements: the values its options' `element` field takes (the plan schema lists them).
    check(option): raise ValueError saying what is wrong with an option of this family.
    label(option) -> its label; parse(label) -> the option, None if the label is another family's
      (ValueError if it is this family's syntax but invalid).
    quantize(weight [out, in] float32, option) -> QuantizedWeight, round to nearest.
    grids: name offered to `default_options(formats=...)` and hardware targets -> options for a Grid.
    grid_of(option): which of those grids offers it (None: the only one).
    fake_quant(weight, option) -> the values quantize gives, differentiable for QAT (qat.py); None: those
      values with the gradient passed straight through everywhere (ste.FormatSTE).
    fallback(option) -> the option a runtime stores a tensor in when its rows do not fit `option`
      (llama.cpp's tensor_type_fallback), None where it has none; verify's "uniform" baselines follow it.
    """

    name: str
    fmt: str
    check: Callable[[QuantOption], None]
    label: Callable[[QuantOption], str]
    parse: Callable[[str], QuantOption | None]
    quantize: Callable[[torch.Tensor, QuantOption], QuantizedWeight]
    grids: dict[str, Callable[[Grid], list[QuantOption]]]
    label_examples: tuple[str, ...]
    scale_fmts: tuple[str, ...] = ("fp16",)
    elements: tuple[str, ...] = ("",)
    grid_of: Callable[[QuantOption], str] | None = None
    fake_quant: Callable[[torch.Tensor, QuantOption], torch.Tensor] | None = None
    fallback: Callable[[QuantOption], QuantOption | None] | None = None


_FORMATS: dict[str, Format] = {}
_derived: dict = {}  # lookups built from _FORMATS on use (labels are asked for often); cleared when it changes
_builtins_loaded = False
_loading = threading.RLock()  # the service asks from several threads; the first one loads the built-ins


def _registry() -> dict[str, Format]:
    """The families: built-in ones in _BUILTIN order (whichever module was imported first), then the others."""
    global _builtins_loaded
    if not _builtins_loaded:
        with _loading:
            for name in _BUILTIN:  # each registers itself through register_format
                importlib.import_module(f"{__name__}.{name}")
            _builtins_loaded = True
    if "all" not in _derived:
        _derived["all"] = {**{n: _FORMATS[n] for n in _BUILTIN}, **_FORMATS}
    return _derived["all"]


def register_format(fmt: Format) -> Format:
    """Add a family; its grids become `default_options(formats=...)` names, its labels parseable."""
    # A built-in family registers while the others may still be importing; any other comes after them all.
    registered = _FORMATS if fmt.name in _BUILTIN else _registry()
    taken = {g for f in registered.values() for g in f.grids}
    if fmt.name in _FORMATS or taken & set(fmt.grids):
        raise ValueError(f"format {fmt.name!r} or one of its grids {sorted(fmt.grids)} is registered already")
    _FORMATS[fmt.name] = fmt
    _derived.clear()
    return fmt


def unregister_format(name: str) -> None:
    """Remove a family registered by `register_format` (a test's or plugin's)."""
    if name in _BUILTIN:
        raise ValueError(f"{name!r} is built in")
    _FORMATS.pop(name, None)
    _derived.clear()


def all_formats() -> list[Format]:
    """The registered families, in registration order."""
    return list(_registry().values())


def format_of(option: QuantOption) -> Format:
    """The family an option belongs to (by fmt, then scale format); ValueError for an unknown fmt."""
    key = (option.fmt, option.scale_fmt)
    if key not in _derived:
        candidates = [f for f in _registry().values() if f.fmt == option.fmt]
        if not candidates:
            known = ", ".join(dict.fromkeys(f.fmt for f in _registry().values()))
            raise ValueError(f"unknown format {option.fmt!r}; known: {known}")
        # An unknown scale format goes to the first family of the fmt, whose check names it.
        _derived[key] = next((f for f in candidates if option.scale_fmt in f.scale_fmts), candidates[0])
    return _derived[key]


def grid_names() -> tuple[str, ...]:
    """Every name `default_options(formats=...)` and the hardware targets accept, family by family."""
    return tuple(g for f in _registry().values() for g in f.grids)


def quantize(weight: torch.Tensor, option: QuantOption) -> QuantizedWeight:
    """Round-to-nearest `weight` [out, in] as `option`: values (float32) and what is stored."""
    return format_of(option).quantize(weight.detach().float(), option)


def quantize_dequantize(weight: torch.Tensor, option: QuantOption) -> torch.Tensor:
    """Return the values the stored option would reproduce for `weight` [out, in] (same dtype)."""
    return quantize(weight, option).values.to(weight.dtype)


def fallback(option: QuantOption) -> QuantOption | None:
    """The option a runtime stores a tensor in when its rows do not fit `option`, or None (Format.fallback)."""
    fmt = format_of(option)
    return None if fmt.fallback is None else fmt.fallback(option)


def fake_quant(weight: torch.Tensor, option: QuantOption) -> torch.Tensor:
    """quantize_dequantize of `weight` [out, in] float32, differentiable for QAT: the family's own
    fake_quant, or straight through (identity gradient) where it declares none."""
    fmt = format_of(option)
    if fmt.fake_quant is not None:
        return fmt.fake_quant(weight, option)
    from ..ste import FormatSTE

    return FormatSTE.apply(weight, option)
