"""compressed-tensors: the `quantization_config` that vLLM and transformers read, built from a plan.

One config group per distinct option, each with its explicit `format` (compressed-tensors >= 0.20
picks the compressor per group). Targets are anchored regexes that match exactly the planned
module names (`re:^model\\.layers\\.(?:0|3)\\.mlp\\.down_proj$`), so no two groups can claim one
module; kept (fp16) modules and linears the plan does not cover go to `ignore`.

Our options map onto compressed-tensors' QuantizationArgs as follows (the library's own
`infer_module_format` agrees; tests check it):
  int{b}-g{G}/ch-{sym,asym}  -> type int, num_bits b, strategy group/channel  -> pack-quantized
  fp8e4m3-ch/-g{G}/-tensor   -> type float, num_bits 8, fp16 (fp32 per tensor) scale -> naive-quantized
  nvfp4                      -> type float, num_bits 4, tensor_group 16, e4m3 scales -> nvfp4-pack-quantized
  mxfp4                      -> type float, num_bits 4, group 32, e8m0 (uint8) scales -> mxfp4-pack-quantized
compressed-tensors has no E5M2 or E3M2 elements, no fp16-scaled FP4/FP6, and MXFP6/MXFP8 only
with their own element; those options are reported as unsupported, never rewritten.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

from ..errors import BadInputError, setting, step
from ..io import atomic_write_text, canonical_json
from ..options import QuantOption, option_sort_key
from ..plan import Plan
from . import ExportResult, register_export
from .common import check_fused_ties

QUANT_METHOD = "compressed-tensors"
# vLLM's weight-only integer kernels (Marlin, Machete, ExLlama) serve 4 and 8 bits.
VLLM_INT_BITS = (4, 8)


def weight_args(option: QuantOption) -> tuple[dict, str]:
    """(QuantizationArgs fields for the weights, compression format) of an option.

    Raises ValueError with the reason when compressed-tensors cannot store the option.
    """
    scheme, g = option.scheme, option.group_size
    if scheme == "int":
        strategy = {"strategy": "channel"} if g is None else {"strategy": "group", "group_size": g}
        return {"num_bits": option.bits, "type": "int", "symmetric": option.symmetric, "dynamic": False,
                **strategy}, "pack-quantized"
    if scheme == "fp":
        if option.element != "e4m3":
            raise ValueError(f"compressed-tensors stores 8-bit floats as E4M3 only and has no "
                             f"{option.element.upper()} element")
        strategy = ({"strategy": "tensor"} if g == 0 else {"strategy": "channel"} if g is None
                    else {"strategy": "group", "group_size": g})
        return {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False, **strategy}, "naive-quantized"
    if scheme == "nvfp4":
        return {"num_bits": 4, "type": "float", "symmetric": True, "dynamic": False, "strategy": "tensor_group",
                "group_size": 16, "scale_dtype": "torch.float8_e4m3fn"}, "nvfp4-pack-quantized"
    if scheme == "mx":
        if option.element == "e2m1":
            return {"num_bits": 4, "type": "float", "symmetric": True, "dynamic": False, "strategy": "group",
                    "group_size": 32, "scale_dtype": "torch.uint8"}, "mxfp4-pack-quantized"
        raise ValueError(f"compressed-tensors' MX formats are MXFP4 (E2M1), MXFP6 (E2M3) and MXFP8 (E4M3); "
                         f"bitalloc does not write {option.label} for it yet")
    raise ValueError(f"compressed-tensors has no format for {option.scheme} options")


def unsupported_options(plan: Plan) -> list[str]:
    """One line per planned module whose option compressed-tensors cannot store (empty if none)."""
    lines = []
    for a in plan.assignments:
        option = a.option
        if a.rows is not None:
            lines.append(f"{a.module} rows {a.rows[0]}:{a.rows[1]}: compressed-tensors stores one scheme per module, "
                         "not per row range")
        elif option.fmt != "keep":
            try:
                weight_args(option)
            except ValueError as e:
                lines.append(f"{a.module}: {a.label}: {e}")
    return lines


def check_expressible(plan: Plan, allow_untied: bool = False) -> list[str]:
    """Raise BadInputError if compressed-tensors cannot store the plan, or if fused shards (q/k/v,
    gate/up) differ and not allow_untied (vLLM refuses such a checkpoint; transformers and
    compressed-tensors load it). Returns the untied shards as warnings when allowed."""
    refuse_unsupported(plan)
    return check_fused_ties(plan, "compressed-tensors", allow_untied)


def refuse_unsupported(plan: Plan) -> None:
    bad = unsupported_options(plan)
    if bad:
        more = f" (+{len(bad) - 5} more)" if len(bad) > 5 else ""
        raise BadInputError(
            f"compressed-tensors cannot store {len(bad)} planned module(s): {'; '.join(bad[:5])}{more}; "
            f"re-plan with formats it stores (e.g. {setting('formats')} int,fp8,nvfp4,mxfp4,keep and "
            f"{setting('allow')} '.*=int.*|fp8e4m3.*|nvfp4|mxfp4|fp16')")


def anchored_targets(names: list[str]) -> list[str]:
    """Anchored regexes matching exactly `names`: modules that differ only in their block index
    share one regex with an alternation of indices. Sorted, so the same names give the same list."""
    by_pattern: dict[tuple[str, str], list[int]] = defaultdict(list)
    singles = []
    for n in names:
        m = re.fullmatch(r"(.*?\.)(\d+)(\..*)", n)
        if m:
            by_pattern[(m[1], m[3])].append(int(m[2]))
        else:
            singles.append(n)
    targets = [f"re:^{re.escape(n)}$" for n in singles]
    for (head, tail), idx in by_pattern.items():
        alt = "|".join(str(i) for i in sorted(set(idx)))
        targets.append(f"re:^{re.escape(head)}(?:{alt}){re.escape(tail)}$")
    return sorted(targets)


def quantization_config(plan: Plan, linear_names: list[str] | None = None) -> dict:
    """The `quantization_config` dict of config.json for a packed checkpoint of `plan`.

    linear_names: every linear module of the model; those the plan does not quantize (e.g.
    lm_head) are listed in `ignore` next to the planned fp16 modules. Raises BadInputError for
    options compressed-tensors cannot store (see check_expressible).
    """
    refuse_unsupported(plan)
    by_option: dict[QuantOption, list[str]] = defaultdict(list)
    kept = []
    for a in plan.assignments:
        option = a.option
        (kept if option.fmt == "keep" else by_option[option]).append(a.module)
    planned = {a.module for a in plan.assignments}
    ignore = sorted(set(kept) | {n for n in (linear_names or []) if n not in planned})
    groups, formats = {}, set()
    for i, option in enumerate(sorted(by_option, key=option_sort_key)):
        args, fmt = weight_args(option)
        formats.add(fmt)
        groups[f"group_{i}"] = {"targets": anchored_targets(by_option[option]), "weights": args,
                                "input_activations": None, "output_activations": None, "format": fmt}
    return {
        "quant_method": QUANT_METHOD,
        "format": formats.pop() if len(formats) == 1 else "mixed-precision",
        "quantization_status": "compressed",
        "config_groups": groups,
        "ignore": ignore,
        "kv_cache_scheme": None,
        "sparsity_config": {},
    }


def serving_notes(plan: Plan) -> list[str]:
    """What vLLM will not serve although compressed-tensors stores it."""
    odd = sorted({a.label for a in plan.assignments
                  if a.option.fmt == "int" and a.option.bits not in VLLM_INT_BITS})
    if not odd:
        return []
    return [f"vLLM's weight-only int kernels serve {' and '.join(map(str, VLLM_INT_BITS))} bits; "
            f"{', '.join(odd)} load in transformers/compressed-tensors but not in vLLM "
            "(re-plan with 4- and 8-bit options to serve with vLLM)"]


@register_export("compressed-tensors", "quantization_config JSON for compressed-tensors / vLLM (packed weights: `bitalloc apply`)")
def export_compressed_tensors(plan: Plan, out: Path, linear_names: list[str] | None = None,
                              allow_untied: bool = False) -> ExportResult:
    warnings = check_expressible(plan, allow_untied)
    path = out if out.suffix == ".json" else out / "quantization_config.json"
    atomic_write_text(path, canonical_json(quantization_config(plan, linear_names)))
    return ExportResult(
        target="compressed-tensors", files=[path], unsupported=warnings,
        notes=[f"merge into config.json as \"quantization_config\"; {step('apply')} to a checkpoint folder "
               "writes the packed weights with it", *serving_notes(plan)],
    )
