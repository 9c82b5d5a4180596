"""rtn-w applied as it was planned: diag H of the unquantized model's inputs from one forward pass.

The candidate table measures rtn-w's ΔW with H from the profile's calibration windows on the
unquantized model. Applying the plan, swapping modules in for a scoring solver or for --verify, and
measuring interactions must quantize with exactly that H, or the plan's predicted errors describe
other weights than the ones the user gets.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import bitalloc
from bitalloc.api import plan_from_table, prepare
from bitalloc.calibration import calibration_from_tokens
from bitalloc.models import weight_matrix
from bitalloc.objective import CalibrationScore
from bitalloc.profile.interactions import measure_interactions
from bitalloc.profile.statistics import collect_statistics, input_importance
from bitalloc.quantizers import quantize_weight
from bitalloc.quantizers.materialize import quantize_model

from conftest import make_llama, make_qwen2

NAMES = ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj", "model.layers.1.self_attn.o_proj",
         "lm_head", "model.embed_tokens"]


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, 256, (6, 32), generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("make", [make_llama, make_qwen2])
def test_input_importance_is_the_diagonal_of_the_profiled_hessian_bit_for_bit(make, ids):
    model = make().eval()
    stats = collect_statistics(model, NAMES, calibration_from_tokens(ids[:4]))
    importance = input_importance(model, NAMES, ids[:4])
    assert importance["model.embed_tokens"] is None  # one-hot inputs: the table rounds embeddings to nearest
    for n in NAMES[:-1]:
        assert torch.equal(importance[n], torch.diagonal(stats[n].hessian)), n
    # other windows give another diagonal: the check above can fail
    other = input_importance(model, NAMES[:1], ids[4:])
    assert not torch.equal(other[NAMES[0]], importance[NAMES[0]])


@pytest.fixture(scope="module")
def rtn_w_setup(ids):
    calib = calibration_from_tokens(ids[:4], held_out=ids[4:])
    table, loaded, calib = prepare(make_llama(), calib, cache_dir=False, quantizer="rtn-w")
    return table, loaded, calib


def test_an_applied_rtn_w_plan_holds_the_weights_whose_errors_the_table_predicts(rtn_w_setup):
    table, loaded, calib = rtn_w_setup
    plan = plan_from_table(table, "3.5bits", loaded, calib)
    assert plan.quantizer == "rtn-w"
    stats = collect_statistics(loaded.model, list(table.groups), calib)
    applied = copy.deepcopy(loaded.model)
    got = quantize_model(applied, plan.options_by_module(), "rtn-w", calib.tokens)
    sequential_differs = 0
    for name, option in plan.options_by_module().items():
        w = weight_matrix(loaded.model.get_submodule(name)).detach()
        expected = quantize_weight(w, option, "rtn-w", hessian=stats[name].hessian)  # the table's ΔW
        assert torch.equal(got[name].values, expected.values), name
        assert torch.equal(weight_matrix(applied.get_submodule(name)), expected.values.to(w.dtype)), name
        sequential_differs += not torch.equal(expected.values, quantize_weight(w, option, "rtn").values)
    assert sequential_differs > 0  # rtn-w's searched scales, not rtn's


def test_scoring_trials_and_interactions_hold_rtn_w_weights(rtn_w_setup):
    table, loaded, calib = rtn_w_setup
    stats = collect_statistics(loaded.model, list(table.groups), calib)
    score = CalibrationScore(loaded.model, table, calib.held_out[:1], importance_tokens=calib.tokens)
    k = table.option_index(next(o for o in table.options if o.fmt == "int" and o.bits == 3))
    for g, name in enumerate(table.groups[:3]):
        w = weight_matrix(loaded.model.get_submodule(name)).detach()
        expected = quantize_weight(w, table.options[k], "rtn-w", hessian=stats[name].hessian).values
        assert torch.equal(score._quantized(g, k), expected.to(w.dtype)), name
    # the evolutionary solver, which used to refuse rtn-w tables, scores them now
    plan = plan_from_table(table, "3.5bits", loaded, calib, solver="evolutionary",
                           solver_settings={"trials": 4})
    assert plan.quantizer == "rtn-w" and plan.summary.storage_bits_per_weight <= 3.5
    # interactions: the swapped weights are rtn-w's, so a single ablation differs from rtn's
    importance = input_importance(loaded.model, list(table.groups), calib.tokens)
    pair = [(table.groups[0], table.groups[1], "sibling")]
    option = table.options[k]
    got_w = measure_interactions(loaded.model, pair, option, calib.held_out, quantizer="rtn-w", importance=importance)
    got_r = measure_interactions(loaded.model, pair, option, calib.held_out, quantizer="rtn")
    assert got_w[0].single_a != got_r[0].single_a
    assert np.isfinite(got_w[0].joint)


def test_a_default_plan_applies_right_after_planning_and_a_loaded_one_asks_for_its_windows(ids):
    """awq-gptq (GPTQ on the equalized model) is the default quantizer on calibration the caller supplies: a plan
    made in this process carries the windows it was profiled on
    (never saved), so apply(model, plan) needs nothing more; the same plan read back from JSON must be given
    them, and says how."""
    model = make_llama()
    plan = bitalloc.plan(model, "3.5bits", ids[:4], cache_dir=False)
    assert plan.quantizer == "awq-gptq" and plan.error_model == "fisher-tw"
    assert torch.equal(plan.calibration_windows.tokens, ids[:4])
    remembered = bitalloc.apply(copy.deepcopy(model), plan)
    given = bitalloc.apply(copy.deepcopy(model), plan, calibration=ids[:4])
    other = bitalloc.apply(copy.deepcopy(model), plan, calibration=ids[2:6])  # other windows, other scales
    names = [a.module for a in plan.assignments if a.option.fmt == "int"]
    assert names
    assert all(torch.equal(weight_matrix(remembered.get_submodule(n)), weight_matrix(given.get_submodule(n))) for n in names)
    assert any(not torch.equal(weight_matrix(remembered.get_submodule(n)), weight_matrix(other.get_submodule(n))) for n in names)
    loaded = bitalloc.Plan.from_json(plan.to_json())
    assert loaded == plan and loaded.to_json() == plan.to_json() and loaded.calibration_windows is None
    with pytest.raises(bitalloc.BadInputError, match="awq-gptq quantizer needs calibration windows.*calibration=ids.*tokenizer="):
        bitalloc.apply(copy.deepcopy(model), loaded)
