"""Hardware targets: which format families each can run natively, to restrict the candidate grid.

A family is listed where the target has kernels for it (weight-only INT dequantization runs
everywhere; FP8 tensor cores from Hopper on; MX and NVFP4 block-scaled MMA from Blackwell on).
Plain FP6/FP4 with fp16 scales have no native kernels anywhere, so only "any" offers them.
llama.cpp runs its own GGUF tensor types (and F16 for what stays unquantized); its lattice i-quants
(IQ3_S, IQ3_XXS, IQ2_S, IQ2_XS, IQ2_XXS: grid "gguf-iq") only when asked for with --formats, because
their exact search costs seconds per million weights in numpy (about 14 s per 576×1536 tensor for
all five), which would double a llama.cpp profile. "any" offers every registered family's grids
(bitalloc/formats), a newly registered one included.
"""

from __future__ import annotations

from typing import Iterable

from .errors import BadInputError, setting
from .formats import grid_names

DEFAULT_FAMILIES = ("int", "keep")

HARDWARE: dict[str, tuple[str, ...]] = {
    "cpu": ("int", "keep"),
    "a100": ("int", "keep"),
    "h100": ("int", "fp8", "keep"),
    "h200": ("int", "fp8", "keep"),  # the H100's chip (Hopper) with more, faster memory
    "b200": ("int", "fp8", "mxfp4", "mxfp6", "mxfp8", "nvfp4", "keep"),
    "llama.cpp": ("gguf", "keep"),
}
# Grids a target runs but offers only when named in --formats.
OPT_IN: dict[str, tuple[str, ...]] = {"llama.cpp": ("gguf-iq",)}


def targets() -> dict[str, tuple[str, ...]]:
    """Target -> the format grids (default_options(formats=...) names) it runs natively."""
    return {**HARDWARE, "any": grid_names()}


def resolve_formats(formats: str | Iterable[str] | None = None, target: str | None = None) -> list[str]:
    """The format families to offer. formats: 'int,fp8,keep' or a list; target: a targets() key.

    With both, every named family must run on the target; with neither, INT + keep.
    """
    allowed, known = None, targets()
    if target is not None:
        if target not in known:
            raise BadInputError(f"unknown target {target!r}; choose one of {', '.join(known)}")
        if formats is None:
            return list(known[target])
        allowed = known[target] + OPT_IN.get(target, ())
    if formats is None:
        return list(DEFAULT_FAMILIES)
    names = [f.strip() for f in formats.split(",")] if isinstance(formats, str) else [f.strip() for f in formats]
    names = [f for f in names if f]
    unknown = [f for f in names if f not in known["any"]]
    if unknown or not names:
        what = f"unknown format famil{'y' if len(unknown) == 1 else 'ies'} {', '.join(map(repr, unknown))}" if unknown else "no format families given"
        raise BadInputError(f"{what}; choose from {', '.join(known['any'])} (comma-separated, e.g. int,fp8,keep)")
    if allowed is not None:
        unsupported = [f for f in names if f not in allowed]
        if unsupported:
            raise BadInputError(f"{', '.join(unsupported)} not supported on target {target!r}, which allows "
                                f"{', '.join(allowed)}; drop them from {setting('formats')} or choose another {setting('target')}")
    return list(dict.fromkeys(names))  # unique, in the given order
