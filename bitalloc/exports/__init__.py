"""Exports: a plan written in the form a serving stack or quantization library reads.

Each target is one module registering an exporter. An exporter never changes the plan to fit its
target: what the target cannot express is returned as `unsupported` (and the CLI reports it), and a
target whose rules the plan breaks (e.g. vLLM's fused q/k/v needing one scheme) raises BadInputError
naming the modules and the fix (re-plan with the fused ties: `bitalloc plan --tie fused`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..errors import BadInputError, phrase, python_name, python_step, setting, step
from ..io import check_output_dir
from ..plan import Plan


@dataclass
class ExportResult:
    target: str
    files: list[Path]
    unsupported: list[str] = field(default_factory=list)  # what the target cannot express, one line each
    notes: list[str] = field(default_factory=list)  # e.g. the command line that consumes the files


Exporter = Callable[..., ExportResult]  # (plan, out: Path, **options) -> ExportResult
_EXPORTERS: dict[str, tuple[Exporter, str]] = {}


def register_export(name: str, description: str) -> Callable[[Exporter], Exporter]:
    def deco(fn: Exporter) -> Exporter:
        _EXPORTERS[name] = (fn, description)
        return fn

    return deco


def available_exports() -> dict[str, str]:
    """Target name -> one-line description."""
    return {name: desc for name, (_, desc) in sorted(_EXPORTERS.items())}


def export_plan(plan: Plan, target: str, out: str | Path, *,
                wording: tuple[Callable[[str], str], Callable[[str], str]] = (python_name, python_step),
                **options: Any) -> ExportResult:
    """Write `plan` for `target` into the folder `out`. wording: how the result's lines spell the settings and
    steps they name, (setting, step) -> text; Python names by default (the CLI passes its flags and commands)."""
    try:
        fn, _ = _EXPORTERS[target]
    except KeyError:
        raise BadInputError(f"unknown export target {target!r}; choose one of {', '.join(sorted(_EXPORTERS))}") from None
    result = fn(plan, check_output_dir(out), **options)
    from ..quantizers import equalizes, unfolded_quantizer  # torch: only once the export itself is done

    if equalizes(plan.quantizer):
        result.unsupported.append(
            f"the plan's errors were measured with AWQ's equalization scales folded into the model (quantizer "
            f"{plan.quantizer}); {target} quantizes the weights as they are, so its errors differ from the plan's. "
            f"{step('apply')} writes the folded, quantized checkpoint; re-plan with {setting('quantizer')} "
            f"{unfolded_quantizer(plan.quantizer)} for a plan measured on the weights as they are")
    result.unsupported = [phrase(line, *wording) for line in result.unsupported]
    result.notes = [phrase(line, *wording) for line in result.notes]
    return result


# Each target registers itself on import.
from . import autoround  # noqa: E402,F401
from . import compressed_tensors  # noqa: E402,F401
from . import gguf  # noqa: E402,F401
from . import gptqmodel  # noqa: E402,F401
from . import modelopt  # noqa: E402,F401
from . import torchao  # noqa: E402,F401
