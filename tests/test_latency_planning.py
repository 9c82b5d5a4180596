"""Plans against a hardware profile: predicted latency in the plan, --max-latency met or refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import bitalloc
from bitalloc.errors import BadInputError, BudgetInfeasibleError
from bitalloc.latency import HardwareProfile, LatencyModel
from bitalloc.latency.planning import LatencyTarget
from bitalloc.latency.predict import parse_latency, shape_signature
from bitalloc.latency.profile import LatencyEntry, ModelTiming
from bitalloc.models import select_modules
from bitalloc.options import default_options

from conftest import make_llama
from test_cli import cli_env, error_text, run_cli  # noqa: F401 (cli_env is a fixture)

OPTIONS = default_options(bits=(2, 4, 8), group_sizes=(32, None))
OTHER_S = 0.004


def synthetic_profile(model, device_type="cpu", host_s=None, layer_scale=1.0) -> HardwareProfile:
    """Latency proportional to stored bits, 4x slower for options without a fast kernel (2-bit),
    and the model's time outside its planned layers — a profile whose optimum is easy to reason about."""
    names = select_modules(model)
    shapes = [tuple(model.get_submodule(n).weight.shape) for n in names]
    entries = []
    for o, i in sorted(set(shapes)):
        for opt in OPTIONS:
            if not opt.fits(i):
                continue
            seconds = opt.storage_bits(o, i) * 1e-9 * (4 if opt.bits == 2 else 1)
            entries.append(LatencyEntry(option=opt.label, kernel="k", out_features=o, in_features=i, tokens=1,
                                        median_s=seconds, p10_s=seconds, p90_s=seconds, samples=1, calls_per_sample=1,
                                        host_s=host_s))
    timing = ModelTiming(model="tiny", signature=shape_signature(type(model).__name__, shapes), tokens=1, context=8,
                         other_s=OTHER_S, linear_predicted_s=0.0, dense_measured_s=None, layer_scale=layer_scale)
    return HardwareProfile(name="synthetic", device_type=device_type, device_name="test", activation_dtype="bfloat16",
                           threads=1, torch_version="0", bitalloc_version="0", measured_on="2026-01-01", kernels={},
                           kernel_for_option={}, checks=[], entries=entries, models=[timing])


@pytest.fixture(scope="module")
def model_and_profile():
    model = make_llama()
    return model, synthetic_profile(model)


def _plan(model, calib_ids, target, budget="6bits", **kw):
    # untied (--tie none): the limits below are set from untied plans' latencies, and ties are not under test here
    kw.setdefault("constraints", bitalloc.Constraints(ties=()))
    return bitalloc.plan(model, budget, calib_ids, options=OPTIONS, cache_dir=False, latency_target=target, **kw)


def test_plan_reports_predicted_latency_from_the_profile(model_and_profile, calib_ids):
    model, profile = model_and_profile
    plan = _plan(model, calib_ids, LatencyTarget(profile, tokens=1))
    predict = LatencyModel(profile)
    layers = sum(predict.predict(a.label, *a.shape, 1) for a in plan.assignments)
    assert plan.latency.layers_s == pytest.approx(layers, rel=1e-5)
    assert plan.latency.other_s == OTHER_S and plan.latency.predicted_s == pytest.approx(OTHER_S + layers, rel=1e-5)
    assert plan.latency.max_s is None and plan.latency.profile == "synthetic"
    assert all(a.predicted_latency_s == pytest.approx(predict.predict(a.label, *a.shape, 1), rel=1e-5) for a in plan.assignments)
    # the same plan without a profile is the same allocation
    plain = _plan(model, calib_ids, None)
    assert plain.latency is None
    assert [a.label for a in plain.assignments] == [a.label for a in plan.assignments]


def test_a_latency_limit_is_met_and_changes_the_plan(model_and_profile, calib_ids):
    model, profile = model_and_profile
    free = _plan(model, calib_ids, LatencyTarget(profile, tokens=1), budget="5bits")
    limit = OTHER_S + 0.8 * free.latency.layers_s
    tight = _plan(model, calib_ids, LatencyTarget(profile, tokens=1, max_latency=limit), budget="5bits")
    assert tight.latency.predicted_s <= limit * (1 + 1e-6)
    assert tight.latency.max_s == pytest.approx(limit)
    assert tight.latency.layers_s < free.latency.layers_s
    assert tight.summary.predicted_delta_loss >= free.summary.predicted_delta_loss
    assert tight.summary.storage_bits_per_weight <= 5.0


def test_an_unreachable_latency_limit_is_refused_with_the_reason(model_and_profile, calib_ids):
    model, profile = model_and_profile
    with pytest.raises(BudgetInfeasibleError, match="outside its planned layers"):
        _plan(model, calib_ids, LatencyTarget(profile, max_latency=OTHER_S * 0.5))
    fastest_layers = np.nanmin(LatencyModel(profile).matrix(
        [tuple(model.get_submodule(n).weight.shape) for n in select_modules(model)], OPTIONS,
        np.ones((len(select_modules(model)), len(OPTIONS)), bool) & np.array([o.fits(64) for o in OPTIONS]), 1), axis=1).sum()
    with pytest.raises(BudgetInfeasibleError, match="latency"):
        _plan(model, calib_ids, LatencyTarget(profile, max_latency=OTHER_S + 0.5 * fastest_layers))


def test_a_limit_needs_the_model_timed_in_the_profile(model_and_profile, calib_ids):
    model, profile = model_and_profile
    untimed = profile.model_copy(update={"models": []})
    plan = _plan(model, calib_ids, LatencyTarget(untimed))  # reporting still works, without a whole-forward figure
    assert plan.latency.other_s is None and plan.latency.predicted_s is None and plan.latency.layers_s > 0
    with pytest.raises(BadInputError, match="did not time this model"):
        _plan(model, calib_ids, LatencyTarget(untimed, max_latency="1s"))


def test_a_host_bound_gpu_limit_is_refused_rather_than_missed(calib_ids):
    model = make_llama()
    gpu = synthetic_profile(model, device_type="cuda", host_s=1e-4)  # 14 layers x 0.1 ms to issue
    with pytest.raises(BudgetInfeasibleError, match="host-bound"):
        _plan(model, calib_ids, LatencyTarget(gpu, max_latency=OTHER_S + 1e-3))
    plan = _plan(model, calib_ids, LatencyTarget(gpu, max_latency=OTHER_S + 2e-3))
    # asynchronous: max(host pipeline, device pipeline)
    assert plan.latency.predicted_s == pytest.approx(max(OTHER_S + 14 * 1e-4, plan.latency.layers_s), rel=1e-5)


@pytest.mark.parametrize("text, seconds", [("40ms", 0.04), ("0.5s", 0.5), ("950us", 950e-6), ("2", 2.0)])
def test_latency_limits_parse(text, seconds):
    assert parse_latency(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["fast", "-3ms", "0ms", "nanms"])
def test_bad_latency_limits_are_refused(text):
    with pytest.raises(BadInputError, match="latency"):
        parse_latency(text)


def test_cli_latency_flags(cli_env, model_dir, tmp_path):
    from bitalloc.models import load_model

    profile = synthetic_profile(load_model(str(model_dir)).model)
    profile_path = profile.save(tmp_path / "synthetic.json")
    calib = model_dir / "calib.txt"
    bad = run_cli(cli_env, "plan", model_dir, "--budget", "6bits", "--calib", calib, "--max-latency", "40ms", "--no-cache", "--seq-len", "64", "--calib-tokens", "256")
    assert bad.returncode == 2 and "--max-latency needs --latency-profile" in error_text(bad)
    bad = run_cli(cli_env, "plan", model_dir, "--budget", "6bits", "--calib", calib, "--latency-profile", profile_path,
                  "--max-latency", "soon", "--no-cache", "--seq-len", "64", "--calib-tokens", "256")
    assert bad.returncode == 2 and "cannot read latency 'soon'" in error_text(bad)
    out = tmp_path / "plan.json"
    ok = run_cli(cli_env, "plan", model_dir, "--budget", "6bits", "--calib", calib, "--bits", "2,4,8", "--group-sizes", "32,ch",
                 "--latency-profile", profile_path, "--max-latency", "100ms", "--out", out, "--no-cache", "--seq-len", "64", "--calib-tokens", "256")
    assert ok.returncode == 0, ok.stderr
    saved = json.loads(out.read_text())
    assert saved["latency"]["max_s"] == 0.1 and saved["latency"]["predicted_s"] <= 0.1
    assert "predicted latency on synthetic" in ok.stdout
    assert bitalloc.Plan.load(out).latency.profile == "synthetic"


def test_cli_latency_measures_a_profile_that_plans_can_use(cli_env, model_dir, tmp_path):
    out = tmp_path / "tiny-cpu.json"
    r = run_cli(cli_env, "latency", "--model", model_dir, "--tokens", "1,4", "--context", "4", "--samples", "2",
                "--bits", "4,8", "--group-sizes", "32,ch", "--threads", "1", "--out", out)
    assert r.returncode == 0, r.stderr
    profile = HardwareProfile.load(out)
    assert profile.name == "tiny-cpu" and profile.threads == 1 and profile.device_type == "cpu"
    assert profile.kernel_for_option["int8-ch-sym"] == "int8_weight_only"
    assert profile.kernel_for_option["int4-g32-asym"] == "int4_tinygemm_cpu"
    assert profile.kernel_for_option["int4-ch-asym"] == "dequant_dense"
    assert sorted((m.tokens, m.context) for m in profile.models) == [(1, 4), (4, 0)]
    printed = " ".join(r.stdout.split())  # rich wraps lines at the terminal width
    assert "tiny-cpu: AMD" in printed or "tiny-cpu:" in printed
    assert "outside the planned layers (measured)" in printed
    # a plan over the same grid reads it
    plan_out = tmp_path / "plan.json"
    r = run_cli(cli_env, "plan", model_dir, "--budget", "6bits", "--calib", model_dir / "calib.txt", "--bits", "4,8",
                "--group-sizes", "32,ch", "--latency-profile", out, "--out", plan_out, "--no-cache", "--seq-len", "64", "--calib-tokens", "256")
    assert r.returncode == 0, r.stderr
    assert bitalloc.Plan.load(plan_out).latency.predicted_s > 0
    # an option the profile never timed is named, with the fix
    r = run_cli(cli_env, "plan", model_dir, "--budget", "6bits", "--calib", model_dir / "calib.txt", "--bits", "3,4,8",
                "--group-sizes", "32,ch", "--latency-profile", out, "--no-cache", "--out", tmp_path / "p3.json", "--seq-len", "64", "--calib-tokens", "256")
    assert r.returncode == 2 and "no timing for option int3" in error_text(r)


@pytest.mark.parametrize("args, message", [
    (["--device", "tpu"], "--device 'tpu' is not supported"),
    (["--threads", "0"], "--threads must be at least 1"),
    (["--dtype", "int8"], "--dtype 'int8' is not one of"),
    (["--tokens", "0"], "--tokens must be positive"),
])
def test_cli_latency_bad_input(cli_env, model_dir, tmp_path, args, message):
    r = run_cli(cli_env, "latency", "--model", model_dir, "--out", tmp_path / "p.json", *args)
    assert r.returncode == 2 and message in error_text(r)
    assert not (tmp_path / "p.json").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cli_latency_cuda_without_a_gpu_says_so(cli_env, model_dir, tmp_path):
    r = run_cli(cli_env, "latency", "--model", model_dir, "--device", "cuda", "--out", tmp_path / "p.json")
    assert r.returncode == 2 and "torch sees no CUDA device" in error_text(r)


def test_a_budget_sweep_with_a_profile_reports_latency_per_point(model_and_profile, calib_ids, tmp_path):
    from bitalloc.api import prepare
    from bitalloc.sweep import pareto_from_table

    model, profile = model_and_profile
    table, loaded, calib = prepare(model, calib_ids, options=OPTIONS, cache_dir=False)
    sweep = pareto_from_table(table, "4:8:2bits", loaded, calib, latency_target=LatencyTarget(profile))
    assert sweep.has_latency and len(sweep.plans) == 3
    text = sweep.table()
    assert "predicted ms/forward" in text and text.count("\n") == 4
    rows = json.loads((sweep.save(tmp_path)[-2]).read_text())["points"]
    assert [r["predicted_latency_s"] for r in rows] == [p.latency.predicted_s for p in sweep.plans]
    assert (tmp_path / "pareto.png").stat().st_size > 10_000


def test_the_in_model_layer_scale_applies_to_every_layer_on_a_cpu(model_and_profile, calib_ids):
    model, _ = model_and_profile
    plain = _plan(model, calib_ids, LatencyTarget(synthetic_profile(model)))
    scaled = _plan(model, calib_ids, LatencyTarget(synthetic_profile(model, layer_scale=2.0)))
    assert [a.label for a in scaled.assignments] == [a.label for a in plain.assignments]
    assert scaled.latency.layers_s == pytest.approx(2 * plain.latency.layers_s, rel=1e-5)
    assert scaled.latency.predicted_s == pytest.approx(OTHER_S + 2 * plain.latency.layers_s, rel=1e-5)
    # and a limit is met by the scaled prediction
    limit = OTHER_S + 1.6 * plain.latency.layers_s
    tight = _plan(model, calib_ids, LatencyTarget(synthetic_profile(model, layer_scale=2.0), max_latency=limit))
    assert tight.latency.predicted_s <= limit * (1 + 1e-6) < scaled.latency.predicted_s
