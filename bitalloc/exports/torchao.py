"""torchao: an FqnToConfig (module name -> config) as torchao's own JSON, plus a loader snippet.

torchao serializes configs with torchao.core.config.config_to_dict: {"_type": class name,
"_version": n, "_data": {field: value}}, nested for granularities, dtypes and enums; config_from_dict
rebuilds them (this is what transformers' TorchAoConfig stores). We write that form directly, so
no torchao is needed to export; `fqn_to_config(plan)` builds the real objects from the same dicts.
A None config leaves a module unquantized.

Mapping (torchao 0.18): int4 asymmetric groups -> Int4WeightOnlyConfig (tinygemm, float zero
points); int8 symmetric per channel -> Int8WeightOnlyConfig; every other integer (2..8 bits, sym or
asym, per channel or group) -> IntxWeightOnlyConfig(weight_dtype=torch.intN, PerAxis/PerGroup);
fp8 (e4m3/e5m2, per tensor/channel/group) -> Float8WeightOnlyConfig; nvfp4 ->
NVFP4WeightOnlyConfig. MX and fp6/plain fp4 have no weight-only torchao config (MX configs quantize
activations too): left unquantized and listed. torchao quantizes the model's own unfused modules,
so no fused-layer tie rule applies.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import BadInputError, step
from ..io import atomic_write_text
from ..options import QuantOption
from ..plan import Plan
from . import ExportResult, register_export
from .common import require_whole_modules, write_json

CONFIG_FILE = "torchao_config.json"
SNIPPET_FILE = "torchao_config.py"
INT4_TINYGEMM_GROUPS = (32, 64, 128, 256)
FP8_DTYPES = {"e4m3": "float8_e4m3fn", "e5m2": "float8_e5m2"}


def _obj(type_: str, version: int, data: dict) -> dict:
    return {"_type": type_, "_version": version, "_data": data}


def _enum(type_: str, value: str) -> dict:
    return {"_type": type_, "_data": value}


def _dtype(name: str) -> dict:
    return {"_type": "torch.dtype", "_data": name}


def _granularity(o: QuantOption) -> dict:
    if o.per_channel:
        return _obj("PerAxis", 1, {"axis": 0}) if o.fmt == "int" else _obj("PerRow", 1, {"dim": -1})
    if o.per_tensor:
        return _obj("PerTensor", 1, {})
    return _obj("PerGroup", 1, {"group_size": o.group_size})


def torchao_config_dict(o: QuantOption) -> tuple[dict | None, str]:
    """(config_to_dict form of the torchao config for `o`, or None with the reason)."""
    if o.fmt == "keep":
        return None, ""
    if o.fmt == "int":
        if o.bits == 4 and not o.symmetric and o.group_size in INT4_TINYGEMM_GROUPS:
            return _obj("Int4WeightOnlyConfig", 2, {"group_size": o.group_size}), ""
        if o.bits == 8 and o.symmetric and o.per_channel:
            return _obj("Int8WeightOnlyConfig", 2, {"group_size": None, "granularity": _obj("PerRow", 1, {"dim": -1})}), ""
        mapping = "SYMMETRIC" if o.symmetric else "ASYMMETRIC"
        return _obj("IntxWeightOnlyConfig", 2, {"weight_dtype": _dtype(f"int{o.bits}"), "granularity": _granularity(o),
                                                 "mapping_type": _enum("MappingType", mapping)}), ""
    scheme = o.scheme
    if scheme == "nvfp4":
        return _obj("NVFP4WeightOnlyConfig", 1, {"use_dynamic_per_tensor_scale": True}), ""
    if scheme == "fp" and o.element in FP8_DTYPES:
        return _obj("Float8WeightOnlyConfig", 2, {"weight_dtype": _dtype(FP8_DTYPES[o.element]),
                                                   "granularity": _granularity(o)}), ""
    if scheme == "mx":
        return None, "torchao's MX config (MXDynamicActivationMXWeightConfig) also quantizes activations; no weight-only MX"
    return None, f"torchao has no weight-only config for {o.label}"


def torchao_mapping(plan: Plan) -> tuple[dict, list[str]]:
    """config_to_dict form of FqnToConfig for the plan, and the unsupported lines."""
    fqn, unsupported = {}, []
    for a in sorted(plan.assignments, key=lambda a: a.module):
        cfg, why = torchao_config_dict(a.option)
        if cfg is None and why:
            unsupported.append(f"{a.module} ({a.label}): {why}; left unquantized")
        fqn[a.module] = cfg
    return _obj("FqnToConfig", 1, {"fqn_to_config": fqn}), unsupported


def fqn_to_config(plan: Plan):
    """The plan as a real torchao FqnToConfig (needs torchao): pass it to quantize_(model, config,
    filter_fn=None) or transformers' TorchAoConfig(quant_type=config)."""
    try:
        from torchao.core.config import config_from_dict
    except ImportError:
        raise BadInputError("fqn_to_config needs torchao: pip install torchao "
                            f"(the JSON export does not: {step('export')} to torchao)") from None
    mapping, _ = torchao_mapping(plan)
    return config_from_dict(mapping)


SNIPPET = '''"""Quantize a model the way bitalloc plan {plan_name} says (written by `bitalloc export --to torchao`)."""
import json
from pathlib import Path

from torchao.core.config import config_from_dict
from torchao.quantization import quantize_

CONFIG = config_from_dict(json.loads((Path(__file__).parent / "{config_file}").read_text()))


def quantize(model):
    # filter_fn=None: FqnToConfig itself names the modules to quantize.
    quantize_(model, CONFIG, filter_fn=None)
    return model

# With transformers: AutoModelForCausalLM.from_pretrained(..., quantization_config=TorchAoConfig(quant_type=CONFIG))
'''


@register_export("torchao", "torchao: FqnToConfig (module -> config) as torchao JSON, plus a loader snippet")
def export_torchao(plan: Plan, out: Path, **_) -> ExportResult:
    require_whole_modules(plan, "torchao")
    mapping, unsupported = torchao_mapping(plan)
    path = write_json(out / CONFIG_FILE, mapping)
    snippet = atomic_write_text(out / SNIPPET_FILE, SNIPPET.format(plan_name=plan.model.source, config_file=CONFIG_FILE))
    types = sorted({c["_type"] for c in mapping["_data"]["fqn_to_config"].values() if c})
    notes = [f"configs: {', '.join(types) or 'none'}",
             "IntxWeightOnlyConfig runs on torchao's CPU/ExecuTorch kernels; GPU serving uses Int4WeightOnlyConfig, "
             "Int8WeightOnlyConfig, Float8WeightOnlyConfig and NVFP4WeightOnlyConfig",
             f"load: exec {snippet.name} (or torchao.core.config.config_from_dict(json.load(open('{path.name}'))))"]
    return ExportResult("torchao", [path, snippet], unsupported, notes)
