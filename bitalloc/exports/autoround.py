"""AutoRound: a quantization_config.json whose `extra_config` gives each module its own scheme.

AutoRound writes per-layer settings that differ from its global bits/group_size/sym into the
checkpoint's quantization_config as `extra_config` {module name: {"bits", "group_size", "sym",
"data_type"}}; vLLM's AutoRoundConfig/INCConfig (get_layer_config) looks a layer up there by exact
name, treats bits >= 16 as unquantized, and raises unless a fused layer's shards agree. Its
`auto_round:auto_gptq` packing (and vLLM's SUPPORTED_BITS) holds 2/3/4/8-bit integers, per channel
(group_size -1) or per group. Other options (5/6-bit, fp, MX, NVFP4) get bits 16 and are listed.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import BadInputError, setting
from ..options import QuantOption
from ..plan import Plan
from . import ExportResult, register_export
from .common import check_fused_ties, dominant_option, group_size_field, require_whole_modules, write_json

CONFIG_FILE = "quantization_config.json"
AUTOROUND_BITS = (2, 3, 4, 8)
UNQUANTIZED = {"bits": 16}


def autoround_layer(o: QuantOption) -> tuple[dict | None, str]:
    if o.fmt == "keep":
        return None, ""
    if o.fmt != "int":
        return None, "the auto_round:auto_gptq packing stores integers only"
    if o.bits not in AUTOROUND_BITS:
        return None, f"auto_round:auto_gptq packs {'/'.join(map(str, AUTOROUND_BITS))}-bit integers"
    return {"bits": o.bits, "group_size": group_size_field(o), "sym": o.symmetric, "data_type": "int"}, ""


def autoround_config(plan: Plan) -> tuple[dict, list[str]]:
    base = dominant_option(plan, lambda o: autoround_layer(o)[0] is not None)
    if base is None:
        raise BadInputError("no planned option is a 2/3/4/8-bit integer, so auto_round:auto_gptq can store none of "
                            f"the modules; re-plan with e.g. {setting('formats')} int and {setting('bits')} 2,3,4,8")
    base_fields = autoround_layer(base)[0]
    extra, unsupported = {}, []
    for a in sorted(plan.assignments, key=lambda a: a.module):
        fields, why = autoround_layer(a.option)
        if fields is None and why:
            unsupported.append(f"{a.module} ({a.label}): {why}; left unquantized (bits 16)")
        # Every planned module is listed, so the file states the whole plan and no layer silently
        # takes the global default.
        extra[a.module] = fields if fields is not None else dict(UNQUANTIZED)
    config = {"quant_method": "auto-round", "packing_format": "auto_round:auto_gptq", **base_fields,
              "act_bits": 16, "extra_config": extra,
              "bitalloc_version": plan.bitalloc_version}
    return config, unsupported


@register_export("autoround", "AutoRound / vLLM auto-round: quantization_config.json with per-module extra_config")
def export_autoround(plan: Plan, out: Path, allow_untied: bool = False, **_) -> ExportResult:
    require_whole_modules(plan, "autoround")
    tie_lines = check_fused_ties(plan, "autoround", allow_untied)
    config, unsupported = autoround_config(plan)
    path = write_json(out / CONFIG_FILE, config)
    notes = [f"base: bits={config['bits']} group_size={config['group_size']} sym={config['sym']}; "
             f"{len(config['extra_config'])} module(s) in extra_config",
             "use: AutoRound(model, tokenizer, layer_config=config['extra_config'], bits=..., group_size=..., sym=...)"]
    if unsupported:
        notes.append("to keep every module quantized, re-plan with integer options of 2/3/4/8 bits: "
                     f"{setting('formats')} int,keep and {setting('bits')} 2,3,4,8")
    return ExportResult("autoround", [path], unsupported + tie_lines, notes)
