"""The API side of issue 4: latency plumbing, the true-objective callback, sweeps."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import bitalloc
from bitalloc.api import plan_from_table, prepare
from bitalloc.errors import BadInputError, BudgetInfeasibleError
from bitalloc.models import weight_matrix
from bitalloc.objective import CalibrationScore, mean_nll

from conftest import make_llama


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1234))
    table, loaded, calib = prepare(make_llama(), ids, cache_dir=False)
    return table, loaded, calib


def test_latency_limit_is_honoured_and_named(setup):
    table, loaded, calib = setup
    # a latency model where fewer bits are faster, proportional to the weights moved
    latency = np.where(table.allowed, table.storage_bits * 1e-12, np.nan)
    free = plan_from_table(table, "6bits", loaded, calib)
    limit = 0.9 * sum(latency[g, table.options.index(a.option)] for g, a in enumerate(free.assignments))
    capped = plan_from_table(table, "6bits", loaded, calib, latency=latency, max_latency=limit)
    used = sum(latency[g, table.options.index(a.option)] for g, a in enumerate(capped.assignments))
    assert used <= limit * (1 + 1e-9)
    assert capped.summary.predicted_delta_loss >= free.summary.predicted_delta_loss
    with pytest.raises(BudgetInfeasibleError, match="binding: latency"):
        plan_from_table(table, "6bits", loaded, calib, latency=latency, max_latency=1e-12)
    with pytest.raises(BadInputError, match="needs a latency matrix"):
        plan_from_table(table, "6bits", loaded, calib, max_latency=1.0)
    # the constraint records the limit when it comes through Constraints
    c = bitalloc.Constraints(max_latency=limit)
    assert plan_from_table(table, "6bits", loaded, calib, latency=latency, constraints=c).constraints["max_latency"] == limit


def test_calibration_score_swaps_and_restores(setup):
    table, loaded, calib = setup
    model = loaded.model
    before = {n: weight_matrix(model.get_submodule(n)).detach().clone() for n in table.groups}
    base = mean_nll(model, calib.tokens[:2])
    low = int(np.nanargmin(np.where(table.allowed, table.storage_bits, np.nan).sum(axis=0)))
    with CalibrationScore(model, table, calib.tokens[:2]) as score:
        rough = score(np.full(len(table.groups), low))
        again = score(np.full(len(table.groups), low))
        assert rough == again and rough != base
        assert len(score.cache) == len(table.groups)  # quantized once per (module, option)
    for n, w in before.items():
        assert torch.equal(weight_matrix(model.get_submodule(n)), w)
    assert mean_nll(model, calib.tokens[:2]) == base


def test_evolutionary_plan_scores_on_calibration_and_restores_the_model(setup):
    table, loaded, calib = setup
    before = bitalloc.models.weights_hash(loaded.model)
    plan = plan_from_table(table, "4bits", loaded, calib, solver="evolutionary",
                           solver_settings={"trials": 8, "population": 4}, score_windows=2)
    assert bitalloc.models.weights_hash(loaded.model) == before
    assert plan.solver.settings["score"] == "mean NLL on 2x32 calibration tokens"
    d = plan.solver.details
    assert d["best_score"] <= d["warm_start_score"] and d["improvement"] == pytest.approx(d["warm_start_score"] - d["best_score"], abs=1e-5)  # 6 digits each
    assert plan.summary.storage_bits_per_weight <= 4.0


def test_pareto_api(setup, tmp_path):
    table, loaded, calib = setup
    sweep = bitalloc.pareto_from_table(table, "3.5:5.5:1.0bits", loaded, calib, solver="lagrangian")
    assert [p.budget.text for p in sweep.plans] == ["3.50bits", "4.50bits", "5.50bits"]
    assert all(sweep.on_frontier)
    files = sorted(p.name for p in sweep.save(tmp_path))
    assert files == ["pareto.json", "pareto.png", "plan-3.50bits.json", "plan-4.50bits.json", "plan-5.50bits.json"]
    assert "| 4.50bits |" in sweep.table()
    with pytest.raises(BadInputError, match="START:STOP:STEP"):
        bitalloc.pareto_from_table(table, "3.5-5.5bits", loaded, calib)
