"""Constraints become masks and ties on the candidate table; every error names the constraint and the module."""

from __future__ import annotations

import numpy as np
import pytest

from bitalloc import BadInputError
from bitalloc.candidates import CandidateTable
from bitalloc.constraints import Constraints, constraint_masks, parse_rule, parse_ties
from bitalloc.options import QuantOption

OPTIONS = [QuantOption.int_(2, 64), QuantOption.int_(4, 64), QuantOption.int_(4, 128), QuantOption.int_(8, None, True),
           QuantOption.keep()]
LABELS = [o.label for o in OPTIONS]  # int2-g64-asym, int4-g64-asym, int4-g128-asym, int8-ch-sym, fp16
NAMES = [f"model.layers.{i}.{m}" for i in range(2) for m in
         ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
          "mlp.down_proj")] + ["lm_head"]


def table() -> CandidateTable:
    shapes = [(64, 192) if n.endswith("down_proj") else (64, 256) for n in NAMES]
    bits = np.array([[o.storage_bits(*s) if o.fits(s[1]) else np.nan for o in OPTIONS] for s in shapes], dtype=float)
    err = np.where(np.isfinite(bits), 1.0, np.nan)
    return CandidateTable(NAMES, shapes, OPTIONS, bits, {"fisher": err, "local": err})


def allowed_labels(masks, name):
    return [LABELS[k] for k in np.flatnonzero(masks.allowed[NAMES.index(name)])]


def test_no_constraints_keep_the_table():
    m = constraint_masks(table(), Constraints(ties=()))
    np.testing.assert_array_equal(m.allowed, table().allowed)
    assert m.ties == () and not Constraints(ties=()).active


def test_default_ties_are_the_fused_ones_and_none_lifts_them():
    assert Constraints().ties == ("fused",) and Constraints().active  # recorded in the plan
    assert parse_ties([]) == ("fused",) and parse_ties(["none"]) == () and parse_ties([r"mlp\.(\w+)"]) == (r"mlp\.(\w+)",)
    with pytest.raises(BadInputError, match="ties none lifts every tie"):
        parse_ties(["none", "fused"])
    m = constraint_masks(table(), Constraints())
    assert m.tie_kinds == ("qkv", "gate_up", "qkv", "gate_up")


def test_fused_matching_nothing_is_no_tie_not_an_error():
    # GPT-2's c_attn / c_fc are already single matrices: nothing to tie, and the default must not fail
    names = ["transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_fc"]
    bits = np.array([[o.storage_bits(64, 256) for o in OPTIONS]] * 3, dtype=float)
    t = CandidateTable(names, [(64, 256)] * 3, OPTIONS, bits, {"fisher": np.ones_like(bits)})
    m = constraint_masks(t, Constraints())
    assert m.ties == () and m.tie_kinds == ()


def test_fused_ties_each_projection_across_a_blocks_experts():
    # Qwen-MoE / DeepSeek naming: experts.N.{gate,up,down}_proj, plus a shared expert that fuses like a dense MLP
    names = [f"model.layers.{b}.mlp.experts.{e}.{p}_proj" for b in range(2) for e in range(3) for p in ("gate", "up", "down")]
    names += ["model.layers.0.mlp.shared_expert.gate_proj", "model.layers.0.mlp.shared_expert.up_proj"]
    names += [f"model.layers.0.block_sparse_moe.experts.{e}.{w}" for e in range(2) for w in ("w1", "w2", "w3")]  # Mixtral
    bits = np.array([[o.storage_bits(64, 256) for o in OPTIONS]] * len(names), dtype=float)
    t = CandidateTable(names, [(64, 256)] * len(names), OPTIONS, bits, {"fisher": np.ones_like(bits)})
    m = constraint_masks(t, Constraints())
    got = {kind: [] for kind in m.tie_kinds}
    for tie, kind in zip(m.ties, m.tie_kinds):
        got[kind].append(sorted(names[g] for g in tie))
    assert got["experts_gate_up"][0] == sorted(f"model.layers.0.mlp.experts.{e}.{p}_proj" for e in range(3) for p in ("gate", "up"))
    assert got["experts_down"][1] == [f"model.layers.1.mlp.experts.{e}.down_proj" for e in range(3)]
    assert got["experts_gate_up"][2] == sorted(f"model.layers.0.block_sparse_moe.experts.{e}.{w}" for e in range(2) for w in ("w1", "w3"))
    assert got["experts_down"][2] == [f"model.layers.0.block_sparse_moe.experts.{e}.w2" for e in range(2)]
    assert got["gate_up"] == [["model.layers.0.mlp.shared_expert.gate_proj", "model.layers.0.mlp.shared_expert.up_proj"]]
    assert len(m.ties) == 2 * 2 + 2 + 1  # per block: experts' gate/up and down; Mixtral block: 2; shared expert: 1


def test_fused_ties_on_gguf_tables_are_the_tensors_llama_cpp_stores_as_one():
    # llama.cpp keeps attn_q/attn_k/attn_v and ffn_gate/ffn_up apart (each its own type) but stores an MoE
    # block's experts as one tensor per projection: a GGUF-only table ties just those
    gguf = [QuantOption.gguf("Q4_K"), QuantOption.gguf("Q6_K"), QuantOption.keep()]
    names = NAMES[:-1] + [f"model.layers.0.mlp.experts.{e}.{p}_proj" for e in range(3) for p in ("gate", "up", "down")]
    bits = np.array([[o.storage_bits(64, 256) for o in gguf]] * len(names), dtype=float)
    t = CandidateTable(names, [(64, 256)] * len(names), gguf, bits, {"fisher": np.ones_like(bits)})
    m = constraint_masks(t, Constraints())
    assert m.tie_kinds == ("experts_gate", "experts_up", "experts_down")
    assert [sorted(names[g] for g in tie) for tie in m.ties][1] == [f"model.layers.0.mlp.experts.{e}.up_proj" for e in range(3)]
    # a table that also offers INT keeps the serving stacks' fused ties
    mixed = [QuantOption.int_(4, 64)] + gguf
    bits = np.array([[o.storage_bits(64, 256) for o in mixed]] * len(names), dtype=float)
    t = CandidateTable(names, [(64, 256)] * len(names), mixed, bits, {"fisher": np.ones_like(bits)})
    assert constraint_masks(t, Constraints()).tie_kinds[:2] == ("qkv", "gate_up")


def test_bit_bounds():
    m = constraint_masks(table(), Constraints(min_bits=4, max_bits=8))
    assert allowed_labels(m, "lm_head") == ["int4-g64-asym", "int4-g128-asym", "int8-ch-sym"]
    # g128 does not tile 192 inputs: the table's own NaN stays
    assert allowed_labels(m, "model.layers.0.mlp.down_proj") == ["int4-g64-asym", "int8-ch-sym"]


def test_empty_bounds_name_the_module_and_flags():
    with pytest.raises(BadInputError, match=r"module model\.layers\.0\.self_attn\.q_proj has no option left after "
                                            r"min_bits 6 max_bits 4"):
        constraint_masks(table(), Constraints(min_bits=6, max_bits=4))


def test_pins_win_over_bounds_and_filters():
    c = Constraints(min_bits=4, max_bits=8, pins=(("lm_head", "fp16"), (r"layers\.1\..*down", "int2-g64-asym")))
    m = constraint_masks(table(), c)
    assert allowed_labels(m, "lm_head") == ["fp16"]
    assert allowed_labels(m, "model.layers.1.mlp.down_proj") == ["int2-g64-asym"]
    assert allowed_labels(m, "model.layers.0.mlp.down_proj") == ["int4-g64-asym", "int8-ch-sym"]


@pytest.mark.parametrize("pin, needle", [
    (("nothing_like_this", "fp16"), "pin 'nothing_like_this=fp16' matches no module"),
    (("lm_head", "int3-g64-asym"), "option int3-g64-asym is not offered"),
    (("lm_head", "int4-gfoo-asym"), "cannot parse option 'int4-gfoo-asym'"),
    (("down_proj", "int4-g128-asym"), "int4-g128-asym cannot store module model.layers.0.mlp.down_proj"),
])
def test_bad_pins(pin, needle):
    with pytest.raises(BadInputError, match=needle.replace(".", r"\.").replace("(", r"\(")):
        constraint_masks(table(), Constraints(pins=(pin,)))


def test_conflicting_pins():
    with pytest.raises(BadInputError, match="both match module lm_head"):
        constraint_masks(table(), Constraints(pins=(("lm_head", "fp16"), ("head", "int8-ch-sym"))))


def test_allow_filters():
    m = constraint_masks(table(), Constraints(allow=(("mlp", r"int[48].*"),)))
    assert allowed_labels(m, "model.layers.1.mlp.up_proj") == ["int4-g64-asym", "int4-g128-asym", "int8-ch-sym"]
    assert allowed_labels(m, "lm_head") == LABELS  # untouched
    with pytest.raises(BadInputError, match="allow 'mlp=int9.*' matches no offered option"):
        constraint_masks(table(), Constraints(allow=(("mlp", "int9.*"),)))
    with pytest.raises(BadInputError, match=r"module model\.layers\.0\.mlp\.down_proj has no option left after "
                                            r"min_bits 8 max_bits 8 allow 'down=fp16'"):
        constraint_masks(table(), Constraints(min_bits=8, max_bits=8, allow=(("down", "fp16"),)))


def test_fused_ties_per_block():
    m = constraint_masks(table(), Constraints(ties=("fused",)))
    named = [[NAMES[g] for g in t] for t in m.ties]
    assert named == [
        ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj"],
        ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"],
        ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj", "model.layers.1.self_attn.v_proj"],
        ["model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj"],
    ]


def test_regex_ties_group_by_captures():
    # one tie per projection kind across layers (like "all experts' same projection")
    m = constraint_masks(table(), Constraints(ties=(r"mlp\.(\w+)_proj",)))
    assert [[NAMES[g] for g in t] for t in m.ties] == [
        ["model.layers.0.mlp.gate_proj", "model.layers.1.mlp.gate_proj"],
        ["model.layers.0.mlp.up_proj", "model.layers.1.mlp.up_proj"],
        ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"],
    ]
    with pytest.raises(BadInputError, match="tie 'lm_head' matches no two modules"):
        constraint_masks(table(), Constraints(ties=("lm_head",)))


def test_tie_without_a_shared_option():
    c = Constraints(ties=("fused",), pins=((r"layers\.0\.self_attn\.q_proj", "fp16"), (r"layers\.0\.self_attn\.k_proj", "int8-ch-sym")))
    with pytest.raises(BadInputError, match=r"tie 'fused' groups model\.layers\.0\.self_attn\.q_proj, .*share no allowed option"):
        constraint_masks(table(), c)


def test_parse_rule():
    assert parse_rule(r"layers\.[0-3]\..*=int8-ch-sym", "--pin") == (r"layers\.[0-3]\..*", "int8-ch-sym")
    with pytest.raises(BadInputError, match="write REGEX=VALUE"):
        parse_rule("lm_head", "--pin")
    with pytest.raises(BadInputError, match="not a valid regular expression"):
        parse_rule("layers.(=fp16", "--pin")


def test_to_dict_round_trips_through_json():
    import json

    c = Constraints(min_bits=3, pins=(("lm_head", "fp16"),), ties=("fused",), max_latency=0.01)
    d = json.loads(json.dumps(c.to_dict()))
    assert d == {"allow": [], "max_bits": None, "max_latency": 0.01, "min_bits": 3, "pins": [["lm_head", "fp16"]],
                 "ties": ["fused"]}
