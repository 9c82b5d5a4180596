"""Exports to gguf, modelopt, gptqmodel, autoround and torchao: each produced file is read back with
the consuming library's own code where it is installed here (gguf; torchao when present) and checked
against a JSON Schema written from the target's documented format otherwise.

Plans are built by hand with SmolLM2-135M's shapes (hidden 576, MLP 1536): 576 is not a multiple
of the 256-weight K-quant block, 1536 is, so both sides of the GGUF width rule are exercised.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
from pathlib import Path

import jsonschema
import numpy as np
import pytest

from bitalloc.errors import BadInputError
from bitalloc.exports import available_exports, export_plan
from bitalloc.exports import gguf as gguf_export
from bitalloc.exports.common import untied_fused_groups
from bitalloc.options import parse_option
from bitalloc.plan import Assignment, BudgetSpec, ModelSpec, Plan, SolverSpec, summarize

HIDDEN, KV, MLP = 576, 192, 1536
SHAPES = {  # leaf -> [out, in]
    "self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.k_proj": (KV, HIDDEN), "self_attn.v_proj": (KV, HIDDEN),
    "self_attn.o_proj": (HIDDEN, HIDDEN), "mlp.gate_proj": (MLP, HIDDEN), "mlp.up_proj": (MLP, HIDDEN),
    "mlp.down_proj": (HIDDEN, MLP),
}


def make_plan(labels: dict[str, str], arch: str = "LlamaForCausalLM", source: str = "HuggingFaceTB/SmolLM2-135M",
              extra: dict[str, tuple[tuple[int, int], list[str]]] | None = None) -> Plan:
    """A plan giving module -> label; modules are 'model.layers.N.<leaf>' unless listed in `extra`
    (name -> (shape, tied_to))."""
    assignments = []
    for module, label in sorted(labels.items()):
        if extra and module in extra:
            shape, tied = extra[module]
        else:
            shape, tied = SHAPES[module.split(".", 3)[3]], []
        o = parse_option(label)
        assignments.append(Assignment(module=module, shape=shape, option=o, label=o.label,
                                      storage_bits=o.storage_bits(*shape), predicted_delta_loss=0.0, tied_to=tied))
    weights = sum(a.shape[0] * a.shape[1] for a in assignments)
    return Plan(
        bitalloc_version="0.test", model=ModelSpec(source=source, architecture=arch, content_hash="0" * 16),
        calibration={}, error_model="fisher", options=sorted({a.label for a in assignments}),
        solver=SolverSpec(name="ilp", settings={}, status="optimal", objective=0.0), seed=0,
        budget=BudgetSpec(kind="bits", value=4.0, text="4bits", max_storage_bits=4.0 * weights),
        summary=summarize(assignments), assignments=assignments)


def layers(n_layers: int, label_of) -> dict[str, str]:
    """label_of(layer, leaf) -> label, for every module of n_layers blocks."""
    return {f"model.layers.{i}.{leaf}": label_of(i, leaf) for i in range(n_layers) for leaf in SHAPES}


def tied(label_of):
    """Make q/k/v and gate/up share the q resp. gate label, as `--tie fused` plans do."""
    def f(i, leaf):
        if leaf in ("self_attn.k_proj", "self_attn.v_proj"):
            leaf = "self_attn.q_proj"
        if leaf == "mlp.up_proj":
            leaf = "mlp.gate_proj"
        return label_of(i, leaf)
    return f


# ---- gguf ------------------------------------------------------------------------------------

gguf = pytest.importorskip("gguf")
QuantError = gguf.quants.QuantError


def read_tensor_type_file(path: Path) -> list[tuple[str, str]]:
    """Split the file as llama-quantize does (whitespace-separated PATTERN=TYPE)."""
    pairs = []
    for arg in path.read_text().split():
        pattern, _, type_name = arg.partition("=")
        assert pattern and type_name, arg
        pairs.append((pattern, type_name))
    return pairs


def gguf_names(arch: str, n_blocks: int) -> set[str]:
    """Every tensor name gguf's tables define for the architecture and block count."""
    a = gguf_export.gguf_arch(arch)
    return {gguf.TENSOR_NAMES[t].format(bid=b) + ".weight" for t in gguf.MODEL_TENSORS[a] for b in range(n_blocks)}


def fits_with_gguf(type_name: str, width: int) -> bool:
    """gguf's own quantizer checks the row against the type's block before anything else."""
    try:
        gguf.quants.quantize(np.zeros((1, width), dtype=np.float32), gguf.GGMLQuantizationType[type_name])
    except QuantError:
        return False
    except NotImplementedError:  # K-quants have no Python quantizer, but the shape check passed
        pass
    return True


MIXED = {"self_attn.q_proj": "int4-g64-asym", "self_attn.k_proj": "int3-g32-sym", "self_attn.v_proj": "int6-g64-asym",
         "self_attn.o_proj": "int4-g64-sym", "mlp.gate_proj": "int8-ch-sym", "mlp.up_proj": "fp16",
         "mlp.down_proj": "int4-g64-asym"}


def test_gguf_file_parses_with_gguf_names_types_and_blocks(tmp_path):
    plan = make_plan(layers(3, lambda i, leaf: MIXED[leaf]))
    result = export_plan(plan, "gguf", tmp_path)
    pairs = read_tensor_type_file(tmp_path / "tensor-types.txt")
    assert result.files == [tmp_path / "tensor-types.txt"] and len(pairs) == 21
    known = gguf_names("LlamaForCausalLM", 3)
    widths = {f"blk.{i}.{n}.weight": w for i in range(3) for n, w in
              [("attn_q", 576), ("attn_k", 576), ("attn_v", 576), ("attn_output", 576), ("ffn_gate", 576),
               ("ffn_up", 576), ("ffn_down", 1536)]}
    seen = {}
    for pattern, type_name in pairs:
        m = re.fullmatch(r"\^(.+)\$", pattern)
        tensor = m[1].replace("\\.", ".")
        assert re.fullmatch(pattern, tensor) and tensor in known, pattern
        assert type_name in gguf.GGMLQuantizationType.__members__
        assert fits_with_gguf(type_name, widths[tensor]), (tensor, type_name)
        seen[tensor] = type_name
    assert seen["blk.1.ffn_down.weight"] == "Q4_K"  # 1536 = 6 x 256: the K-quant fits
    assert seen["blk.1.attn_q.weight"] == "Q4_1"  # 576: asymmetric 4-bit in blocks of 32
    assert seen["blk.1.attn_k.weight"] == "Q4_0"  # int3-sym: no 3-bit type fits 576; round up, not down
    assert seen["blk.1.attn_v.weight"] == "Q8_0"  # int6: Q6_K does not fit; never below 6 bits
    assert seen["blk.1.attn_output.weight"] == "Q4_0"  # symmetric 4-bit: Q4_0 fits, no fallback
    assert seen["blk.1.ffn_gate.weight"] == "Q8_0" and seen["blk.1.ffn_up.weight"] == "F16"


def test_gguf_lists_every_tensor_whose_width_forces_a_fallback(tmp_path):
    plan = make_plan(layers(2, lambda i, leaf: MIXED[leaf]))
    result = export_plan(plan, "gguf", tmp_path)
    rows, _ = gguf_export.gguf_tensor_types(plan)
    fallen = {r.tensor for r in rows if r.fallback}
    # q (Q4_K), k (Q3_K), v (Q6_K) cannot tile 576 with 256-blocks; o, gate, up, down need no fallback
    assert fallen == {f"blk.{i}.{n}.weight" for i in range(2) for n in ("attn_q", "attn_k", "attn_v")}
    assert len(result.unsupported) == 6
    for r in rows:
        if r.fallback:
            blind = re.search(r"\((\w+)\); using", r.fallback)[1]
            assert not fits_with_gguf(blind, r.row_width), "listed as a fallback, but the planned type fits"
            assert f"{r.tensor} ({r.module}, {r.label})" in " ".join(result.unsupported)
    assert "6 of 14 tensors fell back" in result.notes[0]


def test_gguf_at_widths_of_256_keeps_the_k_quants(tmp_path):
    plan = make_plan({"model.layers.0.mlp.down_proj": "int3-g64-asym", "model.layers.1.mlp.down_proj": "int6-ch-sym",
                      "model.layers.2.mlp.down_proj": "int2-g32-asym", "model.layers.3.mlp.down_proj": "int5-g64-asym"})
    rows, _ = gguf_export.gguf_tensor_types(plan)
    assert [r.ggml_type for r in rows] == ["Q3_K", "Q6_K", "Q2_K", "Q5_K"] and not any(r.fallback for r in rows)


def test_gguf_fp_options_and_tied_head(tmp_path):
    head = {"lm_head": ((49152, HIDDEN), ["model.embed_tokens"])}
    plan = make_plan({"model.layers.0.self_attn.q_proj": "fp8e4m3-ch", "model.layers.0.self_attn.o_proj": "mxfp4",
                      "model.layers.0.mlp.down_proj": "nvfp4", "lm_head": "int8-ch-sym"}, extra=head)
    rows, _ = gguf_export.gguf_tensor_types(plan)
    by_module = {r.module: r for r in rows}
    assert by_module["model.layers.0.self_attn.q_proj"].ggml_type == "Q8_0"
    assert "GGUF has no fp8e4m3-ch type" in by_module["model.layers.0.self_attn.q_proj"].fallback
    assert by_module["model.layers.0.self_attn.o_proj"].ggml_type == "MXFP4"
    assert by_module["model.layers.0.mlp.down_proj"].ggml_type == "NVFP4"
    # SmolLM2's GGUF has no output.weight: the tied head is token_embd
    assert by_module["lm_head"].tensor == "token_embd.weight"


def test_gguf_command_line(tmp_path):
    plan = make_plan(layers(2, lambda i, leaf: "int4-g32-asym" if leaf != "mlp.down_proj" else "int8-ch-sym"),
                     source="/models/SmolLM2-135M-Instruct.Q4_1.gguf")
    result = export_plan(plan, "gguf", tmp_path)
    run = next(n for n in result.notes if n.startswith("run: "))
    assert run == (f"run: llama-quantize --tensor-type-file {tmp_path / 'tensor-types.txt'} "
                   "SmolLM2-135M-Instruct-F16.gguf SmolLM2-135M-Instruct-bitalloc.gguf Q4_1")
    assert any("convert_hf_to_gguf.py" in n for n in result.notes)


def test_gguf_unknown_architecture_is_bad_input(tmp_path):
    with pytest.raises(BadInputError, match="no GGUF conversion for OPTForCausalLM"):
        export_plan(make_plan(layers(1, lambda i, leaf: "int4-g64-asym"), arch="OPTForCausalLM"), "gguf", tmp_path)


# ---- JSON targets: schemas written from each target's documented format --------------------

INT_FIELDS = {"bits": {"type": "integer", "enum": [2, 3, 4, 8]}, "group_size": {"type": "integer", "minimum": -1},
              "sym": {"type": "boolean"}, "desc_act": {"type": "boolean"}}

MODELOPT_SCHEMA = {
    "type": "object", "required": ["producer", "quantization"],
    "properties": {
        "producer": {"type": "object", "required": ["name", "version"],
                     "properties": {"name": {"const": "modelopt"}, "version": {"type": "string"}}},
        "quantization": {
            "type": "object", "required": ["quant_algo", "quantized_layers"], "additionalProperties": False,
            "properties": {
                "quant_algo": {"const": "MIXED_PRECISION"},
                "kv_cache_quant_algo": {"type": ["string", "null"]},
                "exclude_modules": {"type": "array", "items": {"type": "string"}},
                "quantized_layers": {"type": "object", "minProperties": 1, "additionalProperties": {
                    "type": "object", "required": ["quant_algo"],
                    "properties": {
                        # TensorRT-LLM QuantAlgo members ModelOpt writes per layer
                        "quant_algo": {"enum": ["FP8", "FP8_PER_CHANNEL_PER_TOKEN", "NVFP4", "W4A16_NVFP4", "MXFP8",
                                                "W4A16_AWQ", "W4A16", "W8A16"]},
                        "group_size": {"type": "integer", "minimum": 1},
                        "has_zero_point": {"type": "boolean"}, "pre_quant_scale": {"type": "boolean"}},
                    "allOf": [{"if": {"properties": {"quant_algo": {"enum": ["NVFP4", "W4A16_AWQ"]}}},
                               "then": {"required": ["group_size"]}}],
                    "additionalProperties": False}}}}}}

GPTQMODEL_SCHEMA = {
    "type": "object", "required": ["bits", "group_size", "sym", "desc_act", "quant_method", "dynamic"],
    "properties": {**INT_FIELDS, "quant_method": {"const": "gptq"}, "checkpoint_format": {"enum": ["gptq", "gptq_v2"]},
                   "meta": {"type": "object"},
                   "dynamic": {"type": "object",
                               "patternProperties": {r"^\+:": {"type": "object", "properties": INT_FIELDS,
                                                               "additionalProperties": False, "minProperties": 1},
                                                     r"^-:": {"type": "object", "maxProperties": 0}},
                               "additionalProperties": False}}}

AUTOROUND_SCHEMA = {
    "type": "object", "required": ["quant_method", "bits", "group_size", "sym", "extra_config"],
    "properties": {"quant_method": {"const": "auto-round"}, "packing_format": {"const": "auto_round:auto_gptq"},
                   "bits": INT_FIELDS["bits"], "group_size": INT_FIELDS["group_size"], "sym": {"type": "boolean"},
                   "data_type": {"const": "int"}, "act_bits": {"const": 16},
                   "extra_config": {"type": "object", "additionalProperties": {"oneOf": [
                       {"type": "object", "required": ["bits", "group_size", "sym", "data_type"], "additionalProperties": False,
                        "properties": {**{k: INT_FIELDS[k] for k in ("bits", "group_size", "sym")}, "data_type": {"const": "int"}}},
                       {"type": "object", "required": ["bits"], "additionalProperties": False,
                        "properties": {"bits": {"const": 16}}}]}}}}

_AO = {"type": "object", "required": ["_type", "_data"], "properties": {"_type": {"type": "string"}, "_version": {"type": "integer"}}}
TORCHAO_SCHEMA = {
    "type": "object", "required": ["_type", "_version", "_data"],
    "properties": {"_type": {"const": "FqnToConfig"}, "_version": {"const": 1},
                   "_data": {"type": "object", "required": ["fqn_to_config"], "properties": {"fqn_to_config": {
                       "type": "object", "additionalProperties": {"oneOf": [{"type": "null"}, {**_AO, "properties": {
                           "_type": {"enum": ["Int4WeightOnlyConfig", "Int8WeightOnlyConfig", "IntxWeightOnlyConfig",
                                              "Float8WeightOnlyConfig", "NVFP4WeightOnlyConfig"]},
                           "_version": {"type": "integer"}, "_data": {"type": "object"}}}]}}}}}}

SCHEMAS = {"modelopt": ("hf_quant_config.json", MODELOPT_SCHEMA), "gptqmodel": ("quantize_config.json", GPTQMODEL_SCHEMA),
           "autoround": ("quantization_config.json", AUTOROUND_SCHEMA), "torchao": ("torchao_config.json", TORCHAO_SCHEMA)}

TIED_MIX = tied(lambda i, leaf: {"self_attn.q_proj": ["int4-g64-sym", "int8-ch-sym"][i % 2], "self_attn.o_proj": "int4-g64-asym",
                                 "mlp.gate_proj": "int3-g64-asym", "mlp.down_proj": ["fp8e4m3-tensor", "fp16"][i % 2]}[leaf])


def load_validated(target: str, out: Path, plan: Plan) -> tuple[dict, object]:
    result = export_plan(plan, target, out)
    name, schema = SCHEMAS[target]
    doc = json.loads((out / name).read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.validate(doc, schema)
    return doc, result


@pytest.mark.parametrize("target", sorted(SCHEMAS))
def test_json_targets_match_their_schema_and_reject_mutations(tmp_path, target):
    doc, result = load_validated(target, tmp_path, make_plan(layers(2, TIED_MIX)))
    assert result.target == target and all(f.is_file() for f in result.files)
    validator = jsonschema.Draft202012Validator(SCHEMAS[target][1])
    bad = json.loads(json.dumps(doc))
    bad.pop(next(iter(SCHEMAS[target][1]["required"])))
    assert list(validator.iter_errors(bad)), "the schema accepts a file missing a required field"


@pytest.mark.parametrize("target", sorted(SCHEMAS) + ["gguf"])
def test_exports_are_byte_identical_across_runs(tmp_path, target):
    plan = make_plan(layers(2, TIED_MIX))
    first = export_plan(plan, target, tmp_path / "a")
    second = export_plan(plan, target, tmp_path / "b")
    assert [f.read_bytes() for f in first.files] == [f.read_bytes().replace(b"/b/", b"/a/") for f in second.files]
    assert not list((tmp_path / "a").glob(".*.tmp"))  # atomic writes leave no temporaries


def test_modelopt_layers_and_what_it_cannot_express(tmp_path):
    plan = make_plan({"model.layers.0.self_attn.o_proj": "fp8e4m3-tensor", "model.layers.0.mlp.down_proj": "nvfp4",
                      "model.layers.1.mlp.down_proj": "int4-g128-sym", "model.layers.1.self_attn.o_proj": "int4-g64-asym",
                      "model.layers.2.self_attn.o_proj": "mxfp4", "model.layers.2.mlp.down_proj": "fp16",
                      "model.layers.3.self_attn.o_proj": "int3-g64-sym", "model.layers.3.mlp.down_proj": "fp8e4m3-ch"})
    doc, result = load_validated("modelopt", tmp_path, plan)
    q = doc["quantization"]
    assert q["quantized_layers"] == {
        "model.layers.0.self_attn.o_proj": {"quant_algo": "FP8"},
        "model.layers.0.mlp.down_proj": {"quant_algo": "NVFP4", "group_size": 16},
        "model.layers.1.mlp.down_proj": {"quant_algo": "W4A16_AWQ", "group_size": 128, "has_zero_point": False,
                                            "pre_quant_scale": True},
        "model.layers.3.mlp.down_proj": {"quant_algo": "FP8_PER_CHANNEL_PER_TOKEN"}}
    assert sorted(q["exclude_modules"]) == ["model.layers.1.self_attn.o_proj", "model.layers.2.mlp.down_proj",
                                            "model.layers.2.self_attn.o_proj", "model.layers.3.self_attn.o_proj"]
    lines = "\n".join(result.unsupported)
    assert len(result.unsupported) == 3  # fp16 is not unsupported, just unquantized
    assert "model.layers.1.self_attn.o_proj (int4-g64-asym): ModelOpt's integer algorithms are symmetric" in lines
    assert "model.layers.2.self_attn.o_proj (mxfp4)" in lines and "model.layers.3.self_attn.o_proj (int3-g64-sym)" in lines
    assert any("TensorRT-LLM" in n and "W4A16_AWQ" in n for n in result.notes)


def dynamic_get(dynamic: dict, module: str):
    """GPTQModel's QuantizeConfig.dynamic_get / vLLM's get_dynamic_override: first re.match wins;
    "-:" -> False (not quantized), "+:" -> the overrides, no match -> None (base config)."""
    for pattern, overrides in dynamic.items():
        if pattern.startswith("-:"):
            if re.match(pattern[2:], module):
                return False
        elif re.match(pattern.removeprefix("+:"), module):
            return overrides
    return None


def test_gptqmodel_dynamic_map_resolves_every_module_to_its_option(tmp_path):
    plan = make_plan(layers(2, TIED_MIX))
    doc, result = load_validated("gptqmodel", tmp_path, plan)
    base = {k: doc[k] for k in ("bits", "group_size", "sym")}
    for a in plan.assignments:
        o = a.option
        got = dynamic_get(doc["dynamic"], a.module)
        if o.fmt != "int":  # fp8, fp16: left unquantized
            assert got is False, a.module
            continue
        fields = base if got is None else {k: got[k] for k in ("bits", "group_size", "sym")}
        assert fields == {"bits": o.bits, "group_size": -1 if o.group_size is None else o.group_size, "sym": o.symmetric}
    # vLLM looks up its fused names: both blocks' tied q/k/v resolve there too
    for i, bits in ((0, 4), (1, 8)):
        got = dynamic_get(doc["dynamic"], f"model.layers.{i}.self_attn.qkv_proj")
        assert (got is None and doc["bits"] == bits) or got["bits"] == bits
    # the base is the option covering the most weights: gate/up's int3-g64-asym (2 x 1536 x 576 per block)
    assert (doc["bits"], doc["group_size"], doc["sym"]) == (3, 64, False)
    assert dynamic_get(doc["dynamic"], "model.layers.0.mlp.gate_up_proj") is None
    assert dynamic_get(doc["dynamic"], "model.layers.0.mlp.down_proj") is False
    lines = "\n".join(result.unsupported)
    assert "model.layers.0.mlp.down_proj (fp8e4m3-tensor): GPTQ stores integers only" in lines
    assert "Marlin kernels run only 4/8-bit symmetric weights: 4 module(s) with int3-g64-asym" in lines
    assert "2 module(s) with int4-g64-asym" in lines


def test_gptqmodel_five_bit_is_unsupported_not_rounded(tmp_path):
    plan = make_plan({"model.layers.0.mlp.down_proj": "int5-g64-asym", "model.layers.1.mlp.down_proj": "int4-g128-sym"})
    doc, result = load_validated("gptqmodel", tmp_path, plan)
    assert dynamic_get(doc["dynamic"], "model.layers.0.mlp.down_proj") is False
    assert doc["bits"] == 4 and doc["group_size"] == 128 and doc["sym"] is True
    assert result.unsupported == ["model.layers.0.mlp.down_proj (int5-g64-asym): GPTQ stores 2/3/4/8-bit integers; "
                                  "left unquantized"]


def test_autoround_extra_config_names_every_module(tmp_path):
    plan = make_plan(layers(2, TIED_MIX))
    doc, result = load_validated("autoround", tmp_path, plan)
    extra = doc["extra_config"]
    assert sorted(extra) == sorted(a.module for a in plan.assignments)
    for a in plan.assignments:
        o = a.option
        if o.fmt == "int":
            assert extra[a.module] == {"bits": o.bits, "group_size": -1 if o.group_size is None else o.group_size,
                                       "sym": o.symmetric, "data_type": "int"}
        else:
            assert extra[a.module] == {"bits": 16}
    # vLLM's get_layer_config: fused shards must agree, which a tied plan guarantees
    for i in range(2):
        qkv = {json.dumps(extra[f"model.layers.{i}.self_attn.{p}"], sort_keys=True) for p in ("q_proj", "k_proj", "v_proj")}
        assert len(qkv) == 1
    assert result.unsupported == ["model.layers.0.mlp.down_proj (fp8e4m3-tensor): the auto_round:auto_gptq packing "
                                  "stores integers only; left unquantized (bits 16)"]


@pytest.mark.parametrize("target", ["modelopt", "gptqmodel", "autoround"])
def test_untied_fused_layers_are_an_error_naming_the_fix(tmp_path, target):
    untied = layers(2, lambda i, leaf: "int4-g64-sym" if leaf != "self_attn.k_proj" else "int8-ch-sym")
    plan = make_plan(untied)
    assert untied_fused_groups(plan) == [
        f"model.layers.{i}.self_attn.qkv_proj: q_proj=int4-g64-sym, k_proj=int8-ch-sym, v_proj=int4-g64-sym"
        for i in range(2)]
    with pytest.raises(BadInputError, match=r"ties fused.*allow_untied"):  # the API's names; the CLI's below
        export_plan(plan, target, tmp_path)
    assert not (tmp_path / SCHEMAS[target][0]).exists()
    result = export_plan(plan, target, tmp_path, allow_untied=True)
    assert sum("fused layer model.layers." in u for u in result.unsupported) == 2


def test_fused_shards_are_compared_by_option_not_label():
    """Two options with one label (int4-g64-sym with fp16 vs fp32 scales) are two schemes to vLLM."""
    plan = make_plan(layers(1, tied(lambda i, leaf: "int4-g64-sym")))
    assert untied_fused_groups(plan) == []
    k = next(i for i, a in enumerate(plan.assignments) if a.module.endswith("k_proj"))
    wide = dataclasses.replace(plan.assignments[k].option, scale_bits=32)
    assert wide.label == plan.assignments[k].label
    edited = plan.model_copy(update={"assignments": [a.model_copy(update={"option": wide}) if i == k else a
                                                     for i, a in enumerate(plan.assignments)]})
    assert untied_fused_groups(edited) == [
        "model.layers.0.self_attn.qkv_proj: q_proj=int4-g64-sym, k_proj=int4-g64-sym, v_proj=int4-g64-sym"]


def test_torchao_configs_by_option(tmp_path):
    plan = make_plan({"model.layers.0.self_attn.o_proj": "int4-g64-asym", "model.layers.0.mlp.down_proj": "int8-ch-sym",
                      "model.layers.1.self_attn.o_proj": "int3-g32-sym", "model.layers.1.mlp.down_proj": "fp8e4m3-tensor",
                      "model.layers.2.self_attn.o_proj": "mxfp4", "model.layers.2.mlp.down_proj": "nvfp4",
                      "model.layers.3.self_attn.o_proj": "fp16", "model.layers.3.mlp.down_proj": "int6-ch-asym"})
    doc, result = load_validated("torchao", tmp_path, plan)
    fqn = doc["_data"]["fqn_to_config"]
    assert fqn["model.layers.0.self_attn.o_proj"] == {"_type": "Int4WeightOnlyConfig", "_version": 2, "_data": {"group_size": 64}}
    assert fqn["model.layers.0.mlp.down_proj"]["_type"] == "Int8WeightOnlyConfig"
    intx = fqn["model.layers.1.self_attn.o_proj"]["_data"]
    assert intx["weight_dtype"]["_data"] == "int3" and intx["granularity"]["_data"] == {"group_size": 32}
    assert intx["mapping_type"]["_data"] == "SYMMETRIC"
    assert fqn["model.layers.1.mlp.down_proj"]["_data"]["granularity"]["_type"] == "PerTensor"
    assert fqn["model.layers.2.mlp.down_proj"]["_type"] == "NVFP4WeightOnlyConfig"
    assert fqn["model.layers.3.mlp.down_proj"]["_data"]["mapping_type"]["_data"] == "ASYMMETRIC"
    assert fqn["model.layers.2.self_attn.o_proj"] is None and fqn["model.layers.3.self_attn.o_proj"] is None
    assert len(result.unsupported) == 1 and result.unsupported[0].startswith("model.layers.2.self_attn.o_proj (mxfp4)")
    assert (tmp_path / "torchao_config.py").is_file()


def test_torchao_json_rebuilds_with_torchao_itself(tmp_path):
    """Runs where torchao is installed (it is not a dependency: transformers imports it on every load)."""
    torchao_config = pytest.importorskip("torchao.core.config")
    from bitalloc.exports.torchao import fqn_to_config
    plan = make_plan({"model.layers.0.self_attn.o_proj": "int4-g64-asym", "model.layers.0.mlp.down_proj": "int8-ch-sym",
                      "model.layers.1.self_attn.o_proj": "int3-g32-sym", "model.layers.1.mlp.down_proj": "fp8e4m3-tensor",
                      "model.layers.2.mlp.down_proj": "nvfp4", "model.layers.3.mlp.down_proj": "int6-ch-asym",
                      "model.layers.3.self_attn.o_proj": "fp16"})
    config = fqn_to_config(plan)
    assert type(config).__name__ == "FqnToConfig"
    built = config.fqn_to_config
    assert built["model.layers.0.self_attn.o_proj"].group_size == 64
    assert str(built["model.layers.1.self_attn.o_proj"].weight_dtype) == "torch.int3"
    assert built["model.layers.3.self_attn.o_proj"] is None
    # torchao's own serializer writes what we wrote (plus its defaults)
    ours = json.loads((export_plan(plan, "torchao", tmp_path).files[0]).read_text())["_data"]["fqn_to_config"]
    theirs = torchao_config.config_to_dict(config)["_data"]["fqn_to_config"]
    for fqn, cfg in ours.items():
        if cfg is None:
            assert theirs[fqn] is None
            continue
        assert theirs[fqn]["_type"] == cfg["_type"] and theirs[fqn]["_version"] == cfg["_version"]
        assert {k: theirs[fqn]["_data"][k] for k in cfg["_data"]} == cfg["_data"]


# ---- API and CLI -----------------------------------------------------------------------------


def test_registry_lists_the_targets_and_rejects_unknown_ones(tmp_path):
    assert {"gguf", "modelopt", "gptqmodel", "autoround", "torchao"} <= set(available_exports())
    with pytest.raises(BadInputError, match=r"unknown export target 'vllm'; choose one of .*gguf.*torchao"):
        export_plan(make_plan(layers(1, lambda i, leaf: "int4-g64-asym")), "vllm", tmp_path)


def run_main(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    from bitalloc import cli
    monkeypatch.setattr(sys, "argv", ["bitalloc", *map(str, args)])
    try:
        cli.main()
        code = 0
    except SystemExit as e:
        code = e.code or 0
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_export(tmp_path, monkeypatch, capsys):
    plan_path = make_plan(layers(2, TIED_MIX)).save(tmp_path / "plan.json")
    code, out, err = run_main(monkeypatch, capsys, "export", plan_path, "--to", "gguf")
    assert code == 0 and f"wrote {tmp_path / 'plan-gguf' / 'tensor-types.txt'}" in out
    assert "run: llama-quantize --tensor-type-file" in out
    assert "warning: blk.0.attn_q.weight (model.layers.0.self_attn.q_proj, int4-g64-sym)" not in err  # Q4_0 fits
    assert "warning: blk.0.attn_output.weight (model.layers.0.self_attn.o_proj, int4-g64-asym): row width 576" in err

    code, out, err = run_main(monkeypatch, capsys, "export", plan_path, "--to", "nope")
    assert code == 2 and "error: unknown export target 'nope'; choose one of autoround, compressed-tensors, gguf, gptqmodel, modelopt, torchao" in err

    code, out, _ = run_main(monkeypatch, capsys, "export", "--list")
    assert code == 0 and all(re.search(rf"^{t}\s", out, re.M) for t in ("gguf", "modelopt", "gptqmodel", "autoround", "torchao"))

    untied = make_plan(layers(1, lambda i, leaf: "int4-g64-sym" if leaf != "mlp.up_proj" else "int8-ch-sym"))
    untied_path = untied.save(tmp_path / "untied.json")
    code, _, err = run_main(monkeypatch, capsys, "export", untied_path, "--to", "modelopt", "--out", tmp_path / "mo")
    assert code == 2 and "gate_up_proj: gate_proj=int4-g64-sym, up_proj=int8-ch-sym" in err and "--tie fused" in err
    code, out, err = run_main(monkeypatch, capsys, "export", untied_path, "--to", "modelopt", "--out", tmp_path / "mo",
                              "--allow-untied")
    assert code == 0 and (tmp_path / "mo" / "hf_quant_config.json").is_file() and "fused layer" in err

    # A refusal names the grid settings; the CLI spells them as its flags, the API as its keywords.
    fp8 = make_plan(layers(1, lambda i, leaf: "fp8e4m3-ch")).save(tmp_path / "fp8.json")
    code, _, err = run_main(monkeypatch, capsys, "export", fp8, "--to", "gptqmodel", "--out", tmp_path / "gq")
    assert code == 2 and err.strip().endswith("re-plan with e.g. --formats int and --bits 2,3,4,8"), err
    with pytest.raises(BadInputError, match=r"re-plan with e.g. formats int and bits 2,3,4,8$"):
        export_plan(Plan.load(fp8), "gptqmodel", tmp_path / "gq")


def test_transformers_reads_the_gptq_and_autoround_configs(tmp_path):
    """transformers' own config classes (what from_pretrained builds from quantization_config)."""
    from transformers.utils.quantization_config import AutoRoundConfig, GPTQConfig, QuantizationMethod
    plan = make_plan(layers(2, TIED_MIX))
    export_plan(plan, "gptqmodel", tmp_path)
    export_plan(plan, "autoround", tmp_path)
    gptq = GPTQConfig.from_dict(json.loads((tmp_path / "quantize_config.json").read_text()))
    assert (gptq.quant_method, gptq.bits, gptq.group_size, gptq.sym, gptq.format) == (QuantizationMethod.GPTQ, 3, 64, False, "gptq")
    # transformers 5.x's GPTQConfig keeps no `dynamic` map: per-module bits reach GPTQModel and vLLM only
    assert "dynamic" not in gptq.to_dict()
    autoround = AutoRoundConfig.from_dict(json.loads((tmp_path / "quantization_config.json").read_text()))
    assert (autoround.quant_method, autoround.bits, autoround.group_size, autoround.sym) == (QuantizationMethod.AUTOROUND, 3, 64, False)
    extra = autoround.to_dict()["extra_config"]
    assert len(extra) == 14 and extra["model.layers.1.self_attn.k_proj"] == {"bits": 8, "group_size": -1, "sym": True, "data_type": "int"}


@pytest.mark.parametrize("target, label", [("gptqmodel", "int5-g64-asym"), ("autoround", "fp8e4m3-ch"), ("modelopt", "int4-g64-asym")])
def test_a_plan_the_target_can_store_nothing_of_is_bad_input(tmp_path, target, label):
    plan = make_plan({"model.layers.0.mlp.down_proj": label, "model.layers.1.mlp.down_proj": "fp16"})
    with pytest.raises(BadInputError, match="re-plan with"):
        export_plan(plan, target, tmp_path)
    assert not any(tmp_path.iterdir())


SMOLLM2_GGUF = os.environ.get("BITALLOC_SMOLLM2_GGUF", "")


@pytest.mark.slow  # ~13 s: GGUFReader parses the 49k-token vocabulary in the metadata
@pytest.mark.skipif(not Path(SMOLLM2_GGUF).is_file(), reason="set BITALLOC_SMOLLM2_GGUF (scripts/fetch_smollm2.sh)")
def test_gguf_patterns_name_the_real_smollm2_tensors(tmp_path):
    """Reading only the GGUF's tensor table (no model load): every pattern matches exactly one tensor,
    whose row width (ne[0]) is the one the type was chosen for."""
    reader = gguf.GGUFReader(SMOLLM2_GGUF)
    real = {t.name: int(t.shape[0]) for t in reader.tensors}
    n_blocks = 1 + max(int(m[1]) for n in real if (m := re.match(r"blk\.(\d+)\.", n)))
    labels = layers(n_blocks, lambda i, leaf: ["int3-g64-asym", "int4-g32-sym", "int6-ch-sym"][i % 3])
    # SmolLM2 ties its head to the embedding: the GGUF has token_embd.weight and no output.weight
    plan = make_plan(labels | {"lm_head": "int8-ch-sym"}, source=SMOLLM2_GGUF,
                     extra={"lm_head": ((49152, HIDDEN), ["model.embed_tokens"])})
    export_plan(plan, "gguf", tmp_path)
    rows = {r.tensor: r for r in gguf_export.gguf_tensor_types(plan)[0]}
    for pattern, type_name in read_tensor_type_file(tmp_path / "tensor-types.txt"):
        hits = [n for n in real if re.search(pattern, n)]
        assert len(hits) == 1, pattern
        assert real[hits[0]] == rows[hits[0]].row_width and fits_with_gguf(type_name, real[hits[0]])
    assert len(rows) == 7 * n_blocks + 1 and rows["token_embd.weight"].ggml_type == "Q8_0"


def test_autoround_resolves_both_files_with_its_own_layer_config(tmp_path):
    """Runs where auto-round is installed: its get_layer_config (what it runs when loading a
    checkpoint) reads extra_config, and GPTQ `dynamic` maps through its converter."""
    convert_model = pytest.importorskip("auto_round.inference.convert_model")
    from types import SimpleNamespace

    from transformers.utils.quantization_config import AutoRoundConfig

    from conftest import make_llama
    plan = make_plan(layers(2, TIED_MIX))
    export_plan(plan, "autoround", tmp_path)
    export_plan(plan, "gptqmodel", tmp_path)
    model = make_llama()  # same module names; get_layer_config reads names, not shapes
    resolved = {
        "autoround": convert_model.get_layer_config(
            model, AutoRoundConfig.from_dict(json.loads((tmp_path / "quantization_config.json").read_text()))),
        "gptqmodel": convert_model.get_layer_config(
            model, SimpleNamespace(**json.loads((tmp_path / "quantize_config.json").read_text()))),
    }
    for target, per_layer in resolved.items():
        for a in plan.assignments:
            o, got = a.option, per_layer[a.module]
            if o.fmt == "int":
                assert (got.bits, got.group_size, got.sym) == (o.bits, -1 if o.group_size is None else o.group_size,
                                                              o.symmetric), (target, a.module)
            else:
                assert got.bits >= 16, (target, a.module)


@pytest.mark.parametrize("target", sorted(SCHEMAS) + ["gguf"])
def test_row_group_plans_are_refused_not_collapsed(tmp_path, target):
    plan = make_plan({"model.layers.0.mlp.down_proj": "int4-g64-asym"})
    a = plan.assignments[0]
    halves = [a.model_copy(update={"rows": (0, 288), "shape": (288, MLP)}), a.model_copy(update={"rows": (288, 576), "shape": (288, MLP)})]
    split = plan.model_copy(update={"assignments": halves})
    with pytest.raises(BadInputError, match="splits model.layers.0.mlp.down_proj into row groups"):
        export_plan(split, target, tmp_path)
