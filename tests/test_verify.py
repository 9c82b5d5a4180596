"""Issue 13 item 3: plans verified against measured loss on held-back calibration windows, repaired,
and never returned worse there than the best fitting uniform option."""

from __future__ import annotations

import copy
import importlib
import json

import jsonschema
import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import bitalloc
from bitalloc.api import plan_from_table, prepare
from bitalloc.calibration import calibration_from_tokens, make_calibration, sequential_windows, tokenize
from bitalloc.config import DEFAULT_ERROR_MODEL
from bitalloc.errors import BadInputError
from bitalloc.models import weights_hash
from bitalloc.options import QuantOption
from bitalloc.plan import SCHEMA_PATH, Plan
from bitalloc.verify import VerifySettings, fit_family_scales, option_family

from conftest import CALIB_TEXT, make_llama


@pytest.fixture(scope="module")
def setup():
    ids = torch.randint(0, 256, (6, 32), generator=torch.Generator().manual_seed(1234))
    calib = calibration_from_tokens(ids[:4], held_out=ids[4:])  # profile on 4 windows, verify on the other 2
    table, loaded, calib = prepare(make_llama(), calib, cache_dir=False, quantizer="awq")  # swaps hold applied weights
    return table, loaded, calib


def crafted(table, factor_of):
    """The table with each module's predicted errors (under the default error model) multiplied by factor_of(name)."""
    t = copy.copy(table)
    errors = table.errors[DEFAULT_ERROR_MODEL].copy()
    for g, name in enumerate(table.groups):
        errors[g] *= factor_of(name)
    t.errors = {**table.errors, DEFAULT_ERROR_MODEL: errors}
    return t


def wrong_attention(name: str) -> float:
    # v/o projections predicted 100x too cheap, q/k 100x too dear: the additive prediction is wrong where it matters
    return 0.01 if ("v_proj" in name or "o_proj" in name) else 100.0 if ("q_proj" in name or "k_proj" in name) else 1.0


def measured_kl(plan: Plan, loaded, calib) -> float:
    """The plan's KL to the unquantized model on verify's slice (the last 2 held-back windows), measured
    from scratch on a copy (quantized with the profile's windows: imatrix plans need them)."""
    quantized = bitalloc.apply(copy.deepcopy(loaded.model), plan, calibration=calib.tokens)
    return bitalloc.evaluate(quantized, calib.held_out[-2:], reference=loaded.model).kl


def test_held_out_windows_are_the_unused_ones_and_leave_the_profile_as_it_was(tokenizer):
    calib = make_calibration(tokenizer, CALIB_TEXT, seq_len=16, tokens=64, seed=3)
    all_windows = sequential_windows(tokenize(tokenizer, CALIB_TEXT), 16)
    used = {tuple(w.tolist()) for w in calib.tokens}
    assert calib.n_windows == 4 and len(calib.held_out_index) == all_windows.shape[0] - 4 > 4
    for i, w in zip(calib.held_out_index, calib.held_out):
        assert torch.equal(all_windows[i], w) and tuple(w.tolist()) not in used
    # what profiling sees (windows and settings, hence the cache key) is what random_windows always picked
    assert torch.equal(calib.tokens, bitalloc.calibration.random_windows(tokenize(tokenizer, CALIB_TEXT), 16, 4, 3))
    assert "held_out" not in json.dumps(calib.settings())


def test_guarantee_fires_when_the_repair_is_not_allowed_to_run(setup):
    table, loaded, calib = setup
    before = weights_hash(loaded.model)
    plan = plan_from_table(crafted(table, wrong_attention), "4bits", loaded, calib,
                           verify=VerifySettings(max_rounds=0, uniform_candidates=2))
    v = plan.verification
    best_uniform = min(v.uniform, key=lambda u: u.loss.kl)
    # the solved plan measured worse than uniform int3-g32-asym, so the uniform plan is returned
    assert v.solved.kl > best_uniform.loss.kl
    assert v.outcome == "uniform" and plan.solver.name == "uniform"
    assert {a.label for a in plan.assignments} == {best_uniform.label}
    assert v.final.kl == best_uniform.loss.kl
    assert plan.summary.storage_bits_per_weight <= 4.0
    assert measured_kl(plan, loaded, calib) == pytest.approx(v.final.kl, rel=1e-4)
    assert weights_hash(loaded.model) == before  # the model is left as it was


def test_repair_finds_the_mispredicted_modules_and_beats_uniform(setup):
    table, loaded, calib = setup
    plan = plan_from_table(crafted(table, wrong_attention), "4bits", loaded, calib,
                           verify=VerifySettings(max_rounds=2))
    v = plan.verification
    assert v.outcome == "repaired"
    # each round located a module that the crafted table under-predicts, with measured >> predicted
    for r in v.rounds:
        assert r.module.endswith(("v_proj", "o_proj")) and r.module_measured > 10 * r.module_predicted
    solved_kl, best_uniform_kl = v.solved.kl, min(u.loss.kl for u in v.uniform)
    assert v.final.kl <= best_uniform_kl < solved_kl
    assert v.final.kl < 0.7 * solved_kl
    assert measured_kl(plan, loaded, calib) == pytest.approx(v.final.kl, rel=1e-4)
    assert plan.summary.storage_bits_per_weight <= 4.0
    # the plan states the table's own predictions; the calibrated ones are in verification
    rows = {g: table.errors[DEFAULT_ERROR_MODEL][g] * wrong_attention(n) for g, n in enumerate(table.groups)}
    for g, a in enumerate(plan.assignments):
        assert a.predicted_delta_loss == pytest.approx(rows[g][table.option_index(a.option)], rel=1e-5)
    assert v.final.calibrated_delta_nll > v.final.predicted_delta_nll  # the corrections raised the predictions


def test_one_module_predicted_100x_too_cheap_is_found_and_given_bits(setup):
    table, loaded, calib = setup
    target = "model.layers.0.self_attn.o_proj"
    mis = crafted(table, lambda n: 1e-4 if n == target else 1.0)
    g = table.groups.index(target)
    unverified = plan_from_table(mis, "3.5bits", loaded, calib)
    assert unverified.assignments[g].option.bits == 2  # the solver trusted the prediction
    plan = plan_from_table(mis, "3.5bits", loaded, calib, verify=VerifySettings(max_rounds=1))
    v = plan.verification
    assert v.rounds[0].module == target
    assert plan.assignments[g].option.bits > 2
    assert v.final.kl < v.solved.kl and v.final.kl <= min(u.loss.kl for u in v.uniform)


def test_verified_plans_are_byte_identical_and_schema_valid(setup, tmp_path):
    table, loaded, calib = setup
    mis = crafted(table, wrong_attention)
    a = plan_from_table(mis, "4bits", loaded, calib, verify=True).save(tmp_path / "a.json")
    b = plan_from_table(mis, "4bits", loaded, calib, verify=True).save(tmp_path / "b.json")
    assert a.read_bytes() == b.read_bytes()
    raw = json.loads(a.read_text())
    jsonschema.validate(raw, json.loads(SCHEMA_PATH.read_text()))
    assert Plan.load(a).verification == Plan.from_json(a.read_text()).verification
    assert raw["verification"]["slice"]["windows"] == 2
    # an unverified plan is written exactly as before: no verification key at all
    assert "verification" not in json.loads(plan_from_table(table, "4bits", loaded, calib).to_json())


def test_an_awq_gptq_plan_is_verified_with_the_awq_weights_its_table_measured(setup):
    """awq-gptq's table holds awq's errors (quantizers.measuring_quantizer), so the repair loop swaps awq's weights
    in, as for the awq plan of the same table, and the plan says so; only the recorded quantizer differs."""
    table, loaded, calib = setup
    assert table.quantizer == "awq"
    mis = crafted(table, wrong_attention)
    stand_in = copy.copy(mis)
    stand_in.quantizer = "awq-gptq"
    awq_plan = plan_from_table(mis, "4bits", loaded, calib, verify=True)
    plan = plan_from_table(stand_in, "4bits", loaded, calib, verify=VerifySettings(applied=False))
    assert plan.quantizer == "awq-gptq" and plan.verification.slice["measured_with"] == "awq"
    assert "measured_with" not in awq_plan.verification.slice
    assert plan.assignments == awq_plan.assignments
    assert plan.verification.final == awq_plan.verification.final and plan.verification.outcome != "solved"
    assert awq_plan.verification.applied is None and plan.verification.applied is None
    # with the applied check (the default) the measurements with awq's weights are the same; GPTQ has the last word
    checked = plan_from_table(stand_in, "4bits", loaded, calib, verify=True).verification
    assert (checked.solved, checked.rounds, checked.uniform) == (awq_plan.verification.solved, awq_plan.verification.rounds,
                                                                  awq_plan.verification.uniform)
    assert checked.applied.quantizer == "awq-gptq"


def gptq_kl(plan: Plan, loaded, calib) -> float:
    """KL on verify's slice of `plan` applied from scratch with awq-gptq (the profile's windows are its Hessian text)."""
    assert plan.quantizer == "awq-gptq"
    return measured_kl(plan, loaded, calib)


def mlp_too_cheap(name: str) -> float:
    return 0.01 if "mlp" in name else 1.0


def attention_out_too_cheap(name: str) -> float:
    return 0.01 if ("v_proj" in name or "o_proj" in name) else 1.0


@pytest.mark.parametrize("craft, budget, stand_in_picks, gptq_picks, float_target, token_weighted", [
    (mlp_too_cheap, "4.25bits", "solved", "uniform", 0.5, True),
    # a quarter toward the float model (the built-in set's default): with halfway, no crafted table measured
    # (five crafts, 4.5 to 6 bits) turned a uniform pick with awq's weights into a solved one with GPTQ's; and every
    # token alike (the built-in set's default too): token-weighted, GPTQ picks uniform here as well
    (attention_out_too_cheap, "5bits", "uniform", "solved", 0.25, False)])
def test_gptq_applied_decides_between_the_plan_and_uniform_where_awqs_weights_stood_in(setup, craft, budget,
                                                                                        stand_in_picks, gptq_picks,
                                                                                        float_target, token_weighted,
                                                                                        monkeypatch):
    """The repair loop and the uniform check of an awq-gptq plan measure awq's weights; GPTQ lowers the plan's and the
    uniform option's losses by different amounts, so both are applied with awq-gptq and the better one there is
    returned. On these crafted tables the two measures rank them oppositely, both ways round."""
    # the token ids count as supplied text (bitalloc.apply is also the name of the function)
    monkeypatch.setattr(importlib.import_module("bitalloc.apply"), "FLOAT_TARGET_WIDENED", float_target)
    monkeypatch.setattr(importlib.import_module("bitalloc.apply"), "TOKEN_WEIGHTED_ON_TEXT", token_weighted)
    table, loaded, calib = setup
    stand_in = copy.copy(crafted(table, craft))
    stand_in.quantizer = "awq-gptq"
    unchecked = plan_from_table(stand_in, budget, loaded, calib, verify=VerifySettings(max_rounds=0, applied=False))
    plan = plan_from_table(stand_in, budget, loaded, calib, verify=VerifySettings(max_rounds=0))
    assert unchecked.verification.outcome == stand_in_picks and unchecked.verification.applied is None
    v, a = plan.verification, plan.verification.applied
    best_uniform = min(v.uniform, key=lambda u: u.loss.kl)
    assert (best_uniform.loss.kl < v.solved.kl) == (stand_in_picks == "uniform")  # with awq's weights
    assert a.quantizer == "awq-gptq" and a.uniform.label == best_uniform.label and a.settings["float_target"] == float_target
    assert a.settings["token_weighted"] == token_weighted
    assert (a.uniform.loss.kl < a.plan.kl) == (gptq_picks == "uniform")  # applied with GPTQ: the other way round
    assert v.outcome == gptq_picks
    solved = unchecked if stand_in_picks == "solved" else plan
    uniform = plan if gptq_picks == "uniform" else unchecked
    assert {x.label for x in uniform.assignments} == {a.uniform.label}
    assert {x.label for x in solved.assignments} != {a.uniform.label}
    # the recorded applied losses are those of the plans as `apply` writes them, measured from scratch
    assert gptq_kl(solved, loaded, calib) == pytest.approx(a.plan.kl, rel=1e-4)
    assert gptq_kl(uniform, loaded, calib) == pytest.approx(a.uniform.loss.kl, rel=1e-4)
    assert gptq_kl(plan, loaded, calib) == pytest.approx(min(a.plan.kl, a.uniform.loss.kl), rel=1e-4)
    assert plan.summary.storage_bits_per_weight <= float(budget[:-4])
    again = plan_from_table(stand_in, budget, loaded, calib, verify=VerifySettings(max_rounds=0))
    assert again.to_json() == plan.to_json()
    raw = json.loads(plan.to_json())
    jsonschema.validate(raw, json.loads(SCHEMA_PATH.read_text()))
    assert Plan.from_json(plan.to_json()).verification == v
    assert "applied" not in json.loads(unchecked.to_json())["verification"]  # written as before the check existed


def test_bad_verify_input_is_one_clear_error(setup):
    table, loaded, _ = setup
    no_held_out = calibration_from_tokens(torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1234)))
    with pytest.raises(BadInputError, match="calibration windows that profiling did not use"):
        plan_from_table(table, "4bits", loaded, no_held_out, verify=True)
    with pytest.raises(BadInputError, match="unknown verify metric"):
        VerifySettings(metric="ppl")
    with pytest.raises(BadInputError, match="latency"):
        latency = np.where(table.allowed, table.storage_bits * 1e-12, np.nan)
        plan_from_table(table, "4bits", loaded, setup[2], latency=latency, max_latency=1.0, verify=True)
    gptq = copy.copy(table)
    gptq.quantizer = "gptq"  # quantizes block by block: single modules cannot be swapped in and measured
    with pytest.raises(BadInputError, match="cannot follow the gptq quantizer"):
        plan_from_table(gptq, "4bits", loaded, setup[2], verify=True)


def test_family_scales_attribute_measured_cost_by_predicted_share():
    raw = np.array([[1.0, 4.0], [2.0, 8.0], [3.0, 12.0]])  # 3 modules x 2 options (families a, b)
    family = ["a", "b"]
    choice = np.array([0, 1, 1])
    # part {0}: all family a, measured 2x; part {1, 2}: all family b, measured 0.5x
    scales = fit_family_scales([(np.array([0]), 2.0, choice), (np.array([1, 2]), 10.0, choice)], raw, family)
    assert scales == {"a": 2.0, "b": 0.5}
    # a mixed part splits its cost by predicted share: 1 of 9 to a, 8 of 9 to b; clipped to [0.25, 4]
    assert fit_family_scales([(np.array([0, 1]), 900.0, choice)], raw, family) == {"a": 4.0, "b": 4.0}
    assert option_family(bitalloc.QuantOption("int", 3, 64, False)) == "int3"


def test_cli_verify_writes_the_measurements(model_dir, tmp_path):
    import os

    from test_cli import run_cli

    env = {**os.environ, "BITALLOC_CACHE_DIR": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONWARNINGS": "ignore"}

    def run(*args):
        return run_cli(env, *args)

    out = tmp_path / "plan.json"
    r = run("plan", model_dir, "--budget", "4bits", "--calib", model_dir / "calib.txt", "--seq-len", "16",
            "--calib-tokens", "64", "--verify", "--verify-windows", "3", "--out", out)
    assert r.returncode == 0, r.stderr
    v = Plan.load(out).verification
    assert v.slice["windows"] == 3 and v.slice["seq_len"] == 16 and v.slice["source"] == "calib.txt"
    assert "verified on 3×16 held-back calibration tokens" in r.stdout.replace("\n", " ")
    # the default quantizer, awq-gptq, was planned from awq's errors: GPTQ applied has the last word
    a = v.applied
    assert Plan.load(out).quantizer == a.quantizer == "awq-gptq" and a.settings["hessian_tokens"] == 16 * 64
    returned = a.uniform.loss if v.outcome == "uniform" else a.plan
    assert returned.kl == min(a.plan.kl, a.uniform.loss.kl)


def test_the_applied_checks_hessian_text_is_the_calibration_text_less_the_slice(tokenizer):
    from bitalloc.calibration import widened
    from bitalloc.verify import _without_slice, held_out_slice

    calib = make_calibration(tokenizer, CALIB_TEXT, seq_len=16, tokens=64, seed=3)
    every = sequential_windows(tokenize(tokenizer, CALIB_TEXT), 16)
    slice_tokens, record = held_out_slice(calib, 2)
    as_rows = lambda t: {tuple(w.tolist()) for w in t}  # noqa: E731
    whole = widened(calib, 16 * every.shape[0])  # asks for more than the text holds: all of it
    assert as_rows(whole.tokens) == as_rows(every) >= as_rows(slice_tokens)
    text = widened(_without_slice(calib, 2), 16 * every.shape[0])
    assert as_rows(text.tokens) == as_rows(every) - as_rows(slice_tokens)
    assert torch.equal(_without_slice(calib, 2).tokens, calib.tokens)  # the profile's windows, hence the fold, stay
    assert [tuple(every[i].tolist()) for i in record["window_index"]] == [tuple(w.tolist()) for w in slice_tokens]


def test_gguf_uniform_baselines_follow_llama_cpps_fallback():
    """K-quants do not fit 96-wide rows (blocks of 256), so no GGUF type below 4.5 bits is uniform on such a
    model and, before fallbacks, --verify checked nothing (solved-unchecked). A uniform baseline is now what
    llama-quantize writes for a uniform type: the type where rows fit it, its fallback elsewhere."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=256, hidden_size=96, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)).eval()
    ids = torch.randint(0, 256, (6, 32), generator=torch.Generator().manual_seed(7))
    options = [QuantOption.gguf(t) for t in ("Q5_0", "Q4_0", "Q4_K", "Q3_K", "Q2_K")]
    table, loaded, calib = prepare(model, calibration_from_tokens(ids[:4], held_out=ids[4:]), options=options,
                                   cache_dir=False)
    assert table.quantizer == "imatrix"  # the default of a GGUF grid, which verify measures as it applies
    down = [g for g, n in enumerate(table.groups) if n.endswith("down_proj")]
    k_quants = [table.option_index(QuantOption.gguf(t)) for t in ("Q4_K", "Q3_K", "Q2_K")]
    assert all(np.isfinite(table.storage_bits[g, k]) == (g in down) for g in range(len(table.groups)) for k in k_quants)
    # Q2_K on down_proj predicted free and Q5_0 on attention 1000x too dear: the solver takes Q2_K there and
    # spends the bits saved on Q5_0 in the MLP, which measures worse than llama-quantize's uniform Q3_K file
    att = [g for g, n in enumerate(table.groups) if "self_attn" in n]
    mis = copy.copy(table)
    errors = table.errors["fisher-tw"].copy()
    errors[down, table.option_index(QuantOption.gguf("Q2_K"))] *= 1e-6
    errors[att, table.option_index(QuantOption.gguf("Q5_0"))] *= 1e3
    mis.errors = {**table.errors, "fisher-tw": errors}
    plan = plan_from_table(mis, "4.3bits", loaded, calib, verify=VerifySettings(max_rounds=0, uniform_candidates=3))
    v = plan.verification
    # Q4_K's baseline (Q5_0 where rows do not fit) is over the budget
    assert sorted(u.label for u in v.uniform) == ["Q2_K (Q4_0 where rows do not fit)", "Q3_K (Q4_0 where rows do not fit)"]
    assert v.solved.kl > min(u.loss.kl for u in v.uniform)
    assert v.outcome == "uniform" and v.final.kl == min(u.loss.kl for u in v.uniform)
    # the plan is that baseline's file: Q3_K on down_proj, Q4_0 on the rest, within the budget
    assert [a.label for a in plan.assignments] == ["Q3_K" if g in down else "Q4_0" for g in range(len(table.groups))]
    assert plan.summary.storage_bits_per_weight == pytest.approx(4.242424, abs=1e-6)
    assert measured_kl(plan, loaded, calib) == pytest.approx(v.final.kl, rel=1e-4)
