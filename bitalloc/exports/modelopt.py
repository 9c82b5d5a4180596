"""NVIDIA TensorRT Model Optimizer: hf_quant_config.json with quant_algo MIXED_PRECISION.

Entries follow ModelOpt's own exporter (modelopt/torch/export/quant_utils.py,
process_layer_quant_config): `quantized_layers` maps a module name to {"quant_algo": ...} plus
group_size where the algorithm has one; a module absent from it stays unquantized. vLLM's
ModelOptMixedPrecisionConfig reads FP8, NVFP4, W4A16_NVFP4 and MXFP8 per layer and requires one
algorithm per fused layer; TensorRT-LLM's QuantAlgo also reads W4A16_AWQ, W4A16, W8A16 and
FP8_PER_CHANNEL_PER_TOKEN. An option with no ModelOpt algorithm (asymmetric or 2/3/5/6-bit integers,
MXFP4/6, fp6/plain fp4, e5m2) is left out of quantized_layers (unquantized) and listed.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import BadInputError, setting
from ..options import QuantOption
from ..plan import Plan
from . import ExportResult, register_export
from .common import check_fused_ties, require_whole_modules, write_json

CONFIG_FILE = "hf_quant_config.json"
# ModelOpt/TRT-LLM's weight-only INT4 (W4A16_AWQ) is symmetric, groups of 64 or 128.
AWQ_GROUPS = (64, 128)
VLLM_MIXED_ALGOS = {"FP8", "NVFP4", "W4A16_NVFP4", "MXFP8"}


def modelopt_layer(o: QuantOption) -> tuple[dict | None, str]:
    """(quantized_layers entry, or None with the reason it has none)."""
    if o.fmt == "keep":
        return None, ""
    scheme = o.scheme
    if scheme == "nvfp4":
        return {"quant_algo": "NVFP4", "group_size": o.group_size}, ""
    if scheme == "mx":
        if o.element == "e4m3":
            return {"quant_algo": "MXFP8"}, ""
        return None, "ModelOpt MIXED_PRECISION has no per-layer MX algorithm for this element (only MXFP8)"
    if scheme == "fp":
        if o.element != "e4m3":
            return None, "ModelOpt's FP8 algorithms are e4m3 only"
        if o.per_tensor:
            return {"quant_algo": "FP8"}, ""
        if o.per_channel:
            return {"quant_algo": "FP8_PER_CHANNEL_PER_TOKEN"}, ""
        return None, "ModelOpt has no per-group FP8 weight scales (FP8 is per tensor or per channel)"
    if scheme != "int":
        return None, f"ModelOpt has no algorithm for {scheme} options"
    if not o.symmetric:
        return None, "ModelOpt's integer algorithms are symmetric (no zero-points)"
    if o.bits == 8 and o.per_channel:
        return {"quant_algo": "W8A16"}, ""
    if o.bits == 4 and o.per_channel:
        return {"quant_algo": "W4A16"}, ""
    if o.bits == 4 and o.group_size in AWQ_GROUPS:
        return {"quant_algo": "W4A16_AWQ", "group_size": o.group_size, "has_zero_point": False,
                "pre_quant_scale": True}, ""
    return None, f"ModelOpt has int4 per channel or groups of {'/'.join(map(str, AWQ_GROUPS))}, and int8 per channel"


def modelopt_config(plan: Plan) -> tuple[dict, list[str]]:
    layers: dict[str, dict] = {}
    excluded, unsupported = [], []
    for a in sorted(plan.assignments, key=lambda a: a.module):
        entry, why = modelopt_layer(a.option)
        if entry is None:
            excluded.append(a.module)
            if why:
                unsupported.append(f"{a.module} ({a.label}): {why}; left unquantized")
        else:
            layers[a.module] = entry
    if not layers:
        # vLLM's ModelOptMixedPrecisionConfig refuses an empty quantized_layers.
        raise BadInputError("no planned option has a ModelOpt algorithm (FP8, NVFP4, MXFP8, int4/int8 symmetric); "
                            f"re-plan with e.g. {setting('formats')} fp8,nvfp4,keep")
    config = {
        # vLLM recognises the file by producer.name == "modelopt"; the version says who wrote it.
        "producer": {"name": "modelopt", "version": f"bitalloc-{plan.bitalloc_version}"},
        "quantization": {"quant_algo": "MIXED_PRECISION", "kv_cache_quant_algo": None,
                         "quantized_layers": layers, "exclude_modules": excluded},
    }
    return config, unsupported


@register_export("modelopt", "NVIDIA ModelOpt / TensorRT-LLM / vLLM: hf_quant_config.json (MIXED_PRECISION)")
def export_modelopt(plan: Plan, out: Path, allow_untied: bool = False, **_) -> ExportResult:
    require_whole_modules(plan, "modelopt")
    tie_lines = check_fused_ties(plan, "modelopt", allow_untied)
    config, unsupported = modelopt_config(plan)
    path = write_json(out / CONFIG_FILE, config)
    algos = sorted({e["quant_algo"] for e in config["quantization"]["quantized_layers"].values()})
    notes = [f"quant_algo per layer: {', '.join(algos) or 'none'}"]
    trt_only = [a for a in algos if a not in VLLM_MIXED_ALGOS]
    if trt_only:
        notes.append(f"vLLM's modelopt_mixed loader reads {', '.join(sorted(VLLM_MIXED_ALGOS))} per layer; "
                     f"{', '.join(trt_only)}: TensorRT-LLM only")
    if unsupported:
        notes.append("to keep every module quantized, re-plan with ModelOpt's schemes, e.g. "
                     f"{setting('formats')} fp8,nvfp4,keep or {setting('allow')} '.*=int4-g(64|128)-sym|int[48]-ch-sym|fp16'")
    return ExportResult("modelopt", [path], unsupported + tie_lines, notes)
