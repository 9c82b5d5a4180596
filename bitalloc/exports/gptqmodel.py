"""GPTQModel: a quantize_config.json whose `dynamic` map gives each module its own bits/group/sym.

GPTQModel's QuantizeConfig.dynamic (gptqmodel/quantization/config.py, dynamic_get) maps regex keys
to per-module overrides: "+:REGEX" (or a bare REGEX) overrides bits, group_size, sym, desc_act for
modules it `re.match`es; "-:REGEX" leaves matching modules unquantized. vLLM's gptq/gptq_marlin
read the same map (get_dynamic_override) against its *fused* names (qkv_proj, gate_up_proj), so a
tied group also gets a key for the fused name. The base bits/group_size/sym are the plan's
dominant expressible option.

GPTQ stores integers of 2, 3, 4 or 8 bits (QuantizeConfig's bits choices) per channel (-1) or per
group; anything else (5/6-bit, fp, MX, NVFP4) is left unquantized ("-:") and listed. Marlin kernels
(vLLM gptq_marlin, GPTQModel BACKEND.MARLIN) run only 4/8-bit symmetric weights; other options
load on the slower GPTQ kernels, which is listed too.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from ..errors import BadInputError, setting
from ..options import QuantOption
from ..plan import Plan
from . import ExportResult, register_export
from .common import (
    check_fused_ties, dominant_option, exact_regex, fused_groups, group_size_field, require_whole_modules, write_json,
)

CONFIG_FILE = "quantize_config.json"
GPTQ_BITS = (2, 3, 4, 8)
MARLIN_BITS = (4, 8)


def gptq_expressible(o: QuantOption) -> tuple[bool, str]:
    if o.fmt == "keep":
        return False, ""
    if o.fmt != "int":
        return False, "GPTQ stores integers only"
    if o.bits not in GPTQ_BITS:
        return False, f"GPTQ stores {'/'.join(map(str, GPTQ_BITS))}-bit integers"
    return True, ""


def gptq_fields(o: QuantOption) -> dict:
    return {"bits": o.bits, "group_size": group_size_field(o), "sym": o.symmetric, "desc_act": False}


def gptqmodel_config(plan: Plan) -> tuple[dict, list[str]]:
    base = dominant_option(plan, lambda o: gptq_expressible(o)[0])
    options = plan.options_by_module()
    unsupported, dynamic = [], {}
    if base is None:
        raise BadInputError("no planned option is a 2/3/4/8-bit integer, so GPTQ can store none of the modules; "
                            f"re-plan with e.g. {setting('formats')} int and {setting('bits')} 2,3,4,8")
    for module in sorted(options):
        o = options[module]
        ok, why = gptq_expressible(o)
        if not ok:
            dynamic[f"-:{exact_regex(module)}"] = {}
            if why:
                unsupported.append(f"{module} ({o.label}): {why}; left unquantized")
        elif o != base:
            dynamic[f"+:{exact_regex(module)}"] = gptq_fields(o)
    # vLLM matches dynamic keys against fused layers; a tied group gets one key for the fused name.
    for fused, shards in fused_groups(options).items():
        if len({options[s] for s in shards}) == 1 and (o := options[shards[0]]) != base:
            ok, _ = gptq_expressible(o)
            dynamic[f"{'+' if ok else '-'}:{exact_regex(fused)}"] = gptq_fields(o) if ok else {}
    unsupported += marlin_lines(options)
    config = {**gptq_fields(base), "quant_method": "gptq", "checkpoint_format": "gptq", "dynamic": dynamic,
              "meta": {"quantizer": [f"bitalloc:{plan.bitalloc_version}"]}}
    return config, unsupported


def marlin_lines(options: dict[str, QuantOption]) -> list[str]:
    slow: dict[str, int] = defaultdict(int)
    for o in options.values():
        if gptq_expressible(o)[0] and (o.bits not in MARLIN_BITS or not o.symmetric):
            slow[o.label] += 1
    return [f"Marlin kernels run only {'/'.join(map(str, MARLIN_BITS))}-bit symmetric weights: {n} module(s) "
            f"with {label} load on the GPTQ torch/triton/exllama kernels" for label, n in sorted(slow.items())]


@register_export("gptqmodel", "GPTQModel / vLLM gptq: quantize_config.json with a per-module `dynamic` map")
def export_gptqmodel(plan: Plan, out: Path, allow_untied: bool = False, **_) -> ExportResult:
    require_whole_modules(plan, "gptqmodel")
    tie_lines = check_fused_ties(plan, "gptqmodel", allow_untied)
    config, unsupported = gptqmodel_config(plan)
    path = write_json(out / CONFIG_FILE, config)
    notes = [f"base: bits={config['bits']} group_size={config['group_size']} sym={config['sym']}; "
             f"{len(config['dynamic'])} dynamic override(s)",
             f"use: QuantizeConfig.from_quant_config(json.load(open('{path.name}'))) in GPTQModel; vLLM reads the "
             "same dict as the checkpoint's quantization_config",
             "transformers' GPTQConfig (5.x) drops `dynamic`: per-module bits load through GPTQModel or vLLM only"]
    if any("GPTQ stores" in u for u in unsupported):
        notes.append(f"to keep every module quantized, re-plan with GPTQ's widths: {setting('bits')} 2,3,4,8")
    return ExportResult("gptqmodel", [path], unsupported + tie_lines, notes)
