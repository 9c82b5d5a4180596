"""Planning from a saved profile folder: same plans as from the model, no model needed, mismatches and damage
refused, constraints / pareto / solvers / error models, spike protection."""

from __future__ import annotations

import json
import re
import time

import numpy as np
import pytest
import torch

import bitalloc
from bitalloc import models
from bitalloc.profile import statistics
from bitalloc.api import plan_from_table, profile_model
from bitalloc.calibration import calibration_from_tokens
from bitalloc.constraints import Constraints
from bitalloc.errors import BadInputError, BudgetInfeasibleError, ProfileMismatchError
from bitalloc.models import LoadedModel
from bitalloc.options import QuantOption, parse_option
from bitalloc.replan import flagged_modules, pareto_from_profile, plan_from_profile, spike_constraints

from conftest import make_llama
from test_cli import run_cli_here as run_cli
from test_signals import SPIKE_TOKEN, plant_spike

OPTIONS = [QuantOption.int_(2, 32, False), QuantOption.int_(3, 32, False), QuantOption.int_(4, 32, True),
           parse_option("int8-ch-sym"), parse_option("fp8e4m3-ch"), QuantOption.keep()]
SIGNALS = ("fisher", "spikes", "table")


@pytest.fixture(scope="module")
def spiked(tmp_path_factory):
    """A tiny Llama with a planted activation spike at layer 0's q/k/v input, its calibration, and its profile."""
    model = make_llama()
    plant_spike(model)
    ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1234))
    ids[0, 3] = ids[2, 10] = SPIKE_TOKEN
    out = tmp_path_factory.mktemp("prof") / "p"
    # rtn-w: awq's equalization would divide the spiking channel by its scale, which is what it is for
    prof = profile_model(model, ids, out, signals=SIGNALS, options=OPTIONS, include_lm_head=True, quantizer="rtn-w")
    return model, ids, out, prof


def no_model_loading(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("planning from a profile loaded a model")

    monkeypatch.setattr(models, "as_loaded", refuse)
    monkeypatch.setattr(models, "load_model", refuse)
    monkeypatch.setattr(statistics, "collect_statistics", refuse)


def test_plan_from_profile_equals_plan_from_the_model(spiked, monkeypatch):
    model, ids, out, prof = spiked
    reference = {b: plan_from_table(prof.table, b, LoadedModel(model), calibration_from_tokens(ids))
                 for b in ("3bits", "4.5bits", "6bits")}
    no_model_loading(monkeypatch)
    for budget, ref in reference.items():
        got = plan_from_profile(out, budget)
        assert got.to_json() == ref.to_json()  # assignments, summary, model record, calibration, tied names
    head = [a for a in got.assignments if a.module == "lm_head"]
    assert head and head[0].tied_to == ["model.embed_tokens"]  # tied embeddings known without the model
    assert got.model.content_hash == models.weights_hash(model) and got.model.architecture == "LlamaForCausalLM"
    # budgets change the plan (the check is not vacuous)
    assert reference["3bits"].summary.storage_bits_per_weight < reference["6bits"].summary.storage_bits_per_weight


def test_replanning_from_a_profile_is_fast_and_solver_error_model_constraints_apply(spiked, monkeypatch):
    _, _, out, _ = spiked
    no_model_loading(monkeypatch)
    start = time.perf_counter()
    plan_from_profile(out, "4bits")
    assert time.perf_counter() - start < 1.0
    local = plan_from_profile(out, "4bits", error_model="local")
    assert local.error_model == "local"
    lag = plan_from_profile(out, "4bits", solver="lagrangian")
    assert lag.solver.name == "lagrangian" and lag.summary.storage_bits_per_weight <= 4.0 + 1e-9
    pinned = plan_from_profile(out, "4bits", constraints=Constraints(pins=(("down_proj", "int8-ch-sym"),)))
    assert all(a.label == "int8-ch-sym" for a in pinned.assignments if a.module.endswith("down_proj"))
    assert pinned.constraints["pins"] == [["down_proj", "int8-ch-sym"]]
    sweep = pareto_from_profile(out, "3.0:5.0:1.0bits")
    losses = [p.summary.predicted_delta_loss for p in sweep.plans]
    assert len(sweep.plans) == 3 and losses[0] > losses[1] > losses[2]
    with pytest.raises(BudgetInfeasibleError):
        plan_from_profile(out, "1bits")


def test_search_solver_needs_the_model_and_scores_on_the_profiles_calibration(spiked):
    model, _, out, prof = spiked
    with pytest.raises(BadInputError, match="pass the model"):
        plan_from_profile(out, "4bits", solver="evolutionary")
    evo = plan_from_profile(out, "4bits", solver="evolutionary", model=model,
                            solver_settings={"trials": 3, "population": 2})
    assert evo.solver.name == "evolutionary" and evo.summary.storage_bits_per_weight <= 4.0 + 1e-9
    assert prof.calibration_tokens.shape == (4, 32)


def test_mismatched_model_or_calibration_is_refused(spiked, tmp_path):
    model, _, out, _ = spiked
    plan_from_profile(out, "4bits", model=model)  # the same weights: accepted
    other = make_llama(seed=1)
    with pytest.raises(ProfileMismatchError, match="other weights.*re-run `bitalloc\\.profile\\(\\)`"):
        plan_from_profile(out, "4bits", model=other)
    text = tmp_path / "other.txt"
    text.write_text("some other calibration text\n", encoding="utf-8")
    with pytest.raises(ProfileMismatchError, match="calibrated on"):
        plan_from_profile(out, "4bits", calibration=text)


def test_damaged_profile_is_refused_with_the_fix(spiked, tmp_path):
    _, _, out, _ = spiked
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "profile.json").write_bytes((out / "profile.json").read_bytes())
    # a valid .npz whose table differs by one value: only the checksum can tell
    dtype, _, offset = json.loads((out / "profile.json").read_text())["arrays"]["table/errors/fisher"]
    with np.load(out / "tensors.npz") as z:
        packed = z["packed"].copy()
    first = packed[offset:offset + np.dtype(dtype).itemsize].view(dtype)
    first[0] *= 0.5
    np.savez(bad / "tensors.npz", packed=packed)
    with pytest.raises(BadInputError, match="checksum.*re-run `bitalloc\\.profile\\(\\)`"):
        plan_from_profile(bad, "4bits")
    (bad / "tensors.npz").write_bytes((out / "tensors.npz").read_bytes()[:100])  # truncated
    with pytest.raises(BadInputError, match="damaged.*re-run `bitalloc\\.profile\\(\\)`"):
        plan_from_profile(bad, "4bits")


def test_profile_without_table_is_refused(tmp_path, calib_ids):
    out = tmp_path / "p"
    profile_model(make_llama(), calib_ids, out, signals=("spikes",), options=OPTIONS)
    with pytest.raises(BadInputError, match="no candidate table.*table"):
        plan_from_profile(out, "4bits")


# ---- spike protection ---------------------------------------------------------------------------------


def test_spike_protection_keeps_flagged_projections_and_leaves_the_rest_free(spiked):
    _, _, out, prof = spiked
    qkv = [f"model.layers.0.self_attn.{p}_proj" for p in "qkv"]
    assert flagged_modules(prof) == qkv
    free = plan_from_profile(out, "3bits")
    chosen = {a.module: a for a in free.assignments}
    assert all(chosen[n].option.bits < 8 for n in qkv)  # unprotected, the tight budget squeezes them

    for precision, allowed in (("fp16", {"fp16"}), ("8bits", {"int8-ch-sym", "fp8e4m3-ch", "fp16"}),
                               ("fp8", {"fp8e4m3-ch", "fp16"})):
        plan = plan_from_profile(out, "5bits", protect_spikes=precision)
        chosen = {a.module: a for a in plan.assignments}
        assert all(chosen[n].label in allowed for n in qkv), precision
        others = [a for a in plan.assignments if a.module not in qkv]
        assert any(a.option.bits < 8 for a in others)  # the others stay free to go low
        (modules, options), = plan.constraints["allow"]
        assert sorted(n for n in chosen if re.fullmatch(modules, n)) == sorted(qkv)
        assert {lbl for lbl in (o.label for o in OPTIONS) if re.fullmatch(options, lbl)} == allowed
    # fp16 on q/k/v at 2.5 bits/weight is not affordable: the error says the constraints bind
    with pytest.raises(BudgetInfeasibleError, match="under these constraints"):
        plan_from_profile(out, "2.5bits", protect_spikes="fp16")


def test_spike_protection_combines_with_user_constraints_and_checks_its_input(spiked, tmp_path, calib_ids):
    _, _, out, prof = spiked
    c = spike_constraints(prof, "fp16", Constraints(min_bits=3))
    assert c.min_bits == 3 and len(c.allow) == 1
    with pytest.raises(BadInputError, match="unknown spike protection"):
        spike_constraints(prof, "fp4")
    clean = tmp_path / "clean"
    profile_model(make_llama(), calib_ids, clean, signals=SIGNALS, options=OPTIONS)
    plain = plan_from_profile(clean, "3bits")
    assert plan_from_profile(clean, "3bits", protect_spikes="fp16").to_json() == plain.to_json()  # nothing flagged
    no_spikes = tmp_path / "nospikes"
    profile_model(make_llama(), calib_ids, no_spikes, signals=("fisher", "table"), options=OPTIONS)
    with pytest.raises(BadInputError, match="no activation spikes"):
        plan_from_profile(no_spikes, "4bits", protect_spikes="fp16")


# ---- CLI ------------------------------------------------------------------------------------------------


def test_cli_plan_from_profile(spiked, tmp_path):
    _, _, out, _ = spiked
    r = run_cli("plan", "--profile", out, "--budget", "5bits", "--protect-spikes", "fp16", "--out", "p.json",
                cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    plan = bitalloc.Plan.load(tmp_path / "p.json")
    assert plan.to_json() == plan_from_profile(out, "5bits", protect_spikes="fp16").to_json()
    r = run_cli("plan", "--profile", out, "--pareto", "3:4:0.5bits", "--out", "sweep", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert len(json.loads((tmp_path / "sweep" / "pareto.json").read_text())["points"]) == 3
    # flags that the profile fixes, protection without a profile, no model and no profile: one-line errors, exit 2
    r = run_cli("plan", "--profile", out, "--budget", "4bits", "--bits", "4,8", cwd=tmp_path)
    assert r.returncode == 2 and "--profile fixes the options" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("plan", "--budget", "4bits", "--protect-spikes", "fp16", cwd=tmp_path)
    assert r.returncode == 2 and "add --profile" in r.stderr
    r = run_cli("plan", "--budget", "4bits", cwd=tmp_path)
    assert r.returncode == 2 and "--profile DIR" in r.stderr


def test_latency_target_from_a_profile_matches_planning_from_the_model(tmp_path, calib_ids):
    from bitalloc.latency.planning import LatencyTarget
    from test_latency_planning import OPTIONS as LAT_OPTIONS, OTHER_S, synthetic_profile

    model = make_llama()
    hardware = synthetic_profile(model)
    profile_model(model, calib_ids, tmp_path / "p", signals=("fisher", "table"), options=LAT_OPTIONS)
    untied = Constraints(ties=())  # the limit below is 0.8x an untied plan's latency: ties would make it infeasible
    free = plan_from_profile(tmp_path / "p", "5bits", latency_target=LatencyTarget(hardware, tokens=1), constraints=untied)
    assert free.latency.predicted_s == pytest.approx(OTHER_S + free.latency.layers_s, rel=1e-5)
    limit = OTHER_S + 0.8 * free.latency.layers_s
    target = LatencyTarget(hardware, tokens=1, max_latency=limit)
    direct = bitalloc.plan(model, "5bits", calib_ids, options=LAT_OPTIONS, cache_dir=False, latency_target=target,
                           constraints=untied)
    got = plan_from_profile(tmp_path / "p", "5bits", latency_target=target, constraints=untied)
    assert got.to_json() == direct.to_json()
    assert got.latency.predicted_s <= limit * (1 + 1e-6) < free.latency.predicted_s  # the limit binds
