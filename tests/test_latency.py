"""Kernels, timing, hardware profiles and the latency model (CPU; CUDA kernels run on a GPU machine)."""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import pytest
import torch

from bitalloc.apply import apply_options
from bitalloc.errors import BadInputError, PlanVersionError
from bitalloc.formats.fp import ELEMENTS, round_to_element
from bitalloc.io import canonical_json
from bitalloc.latency import HardwareProfile, LatencyModel, attach_kernels, measure_profile, time_forward
from bitalloc.latency import kernels as K
from bitalloc.latency.measure import choose_kernel
from bitalloc.latency.predict import shape_signature
from bitalloc.latency.profile import PROFILE_SCHEMA_PATH, LatencyEntry
from bitalloc.latency.runtime import measure_model_timings
from bitalloc.latency.timing import time_call
from bitalloc.models import select_modules
from bitalloc.options import QuantOption, parse_option

from conftest import make_llama

INT4_G32_SYM = QuantOption.int_(4, 32, True)
INT4_G64_ASYM = QuantOption.int_(4, 64, False)
INT8_CH_SYM = QuantOption.int_(8, None, True)
INT3_G32_ASYM = QuantOption.int_(3, 32, False)
INT6_CH_SYM = QuantOption.int_(6, None, True)
KEEP = QuantOption.keep()


def _weight(out_f=96, in_f=128, seed=0):
    return torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(seed)) * 0.02


@pytest.mark.parametrize("option, kernel", [
    (KEEP, "dense"), (INT8_CH_SYM, "int8_weight_only"), (INT4_G32_SYM, "int4_tinygemm_cpu"),
    (INT4_G64_ASYM, "int4_tinygemm_cpu"), (INT3_G32_ASYM, "dequant_dense"), (INT6_CH_SYM, "dequant_dense"),
])
def test_cpu_kernel_computes_the_stored_weight_times_x(option, kernel):
    w = _weight()
    fn = K.get_kernel(kernel).prepare(w, option, torch.float32)
    x = torch.randn(5, w.shape[1], generator=torch.Generator().manual_seed(2))
    want = x @ K.reference_weight(w, option).t()
    torch.testing.assert_close(fn(x), want, rtol=1e-4, atol=1e-5)
    # and it is not simply the unquantized matmul (the quantization is really there)
    assert option.fmt == "keep" or (fn(x) - x @ w.t()).abs().max() > 1e-5


def test_kernel_choice_prefers_real_kernels_and_falls_back_when_none_supports():
    w = _weight()
    for option, expected in [(INT8_CH_SYM, "int8_weight_only"), (INT4_G32_SYM, "int4_tinygemm_cpu"),
                             (QuantOption.int_(4, 32, False), "int4_tinygemm_cpu"), (INT3_G32_ASYM, "dequant_dense"),
                             (QuantOption.int_(8, None, False), "dequant_dense"), (KEEP, "dense")]:
        checks = []
        kernel, _ = choose_kernel(option, torch.device("cpu"), torch.float32, w, checks)
        assert kernel.name == expected, option.label
        assert checks[-1].status == "ok" and checks[-1].kernel == expected


def test_a_kernel_that_computes_something_else_is_never_used(monkeypatch):
    wrong = K.Kernel("wrong_int8", ("cpu",), "returns the unquantized product, times 1.1",
                     supports=lambda o: o.bits == 8, prepare=lambda w, o, dt: (lambda x: 1.1 * x @ w.t()))
    broken = K.Kernel("broken_int8", ("cpu",), "raises", supports=lambda o: o.bits == 8,
                      prepare=lambda w, o, dt: (_ for _ in ()).throw(RuntimeError("no such instruction")))
    registry = {"broken_int8": broken, "wrong_int8": wrong, **K._KERNELS}
    monkeypatch.setattr(K, "_KERNELS", registry)
    checks = []
    kernel, _ = choose_kernel(INT8_CH_SYM, torch.device("cpu"), torch.float32, _weight(), checks)
    assert kernel.name == "int8_weight_only"
    by_kernel = {c.kernel: c for c in checks}
    assert by_kernel["broken_int8"].status == "failed" and "no such instruction" in by_kernel["broken_int8"].detail
    assert by_kernel["wrong_int8"].status == "mismatch" and by_kernel["wrong_int8"].relative_error > 0.05


def test_timer_measures_a_known_duration():
    timing = time_call(lambda: time.sleep(0.004), "cpu", samples=5, min_sample_s=0.0, warmup=1)
    assert 0.0038 <= timing.median_s <= 0.012
    assert timing.p10_s <= timing.median_s <= timing.p90_s
    assert timing.calls_per_sample == 1
    fast = time_call(lambda: None, "cpu", samples=3, min_sample_s=1e-3)
    assert fast.calls_per_sample > 10  # a call below timer resolution is batched


@pytest.fixture(scope="module")
def small_profile() -> HardwareProfile:
    shapes = [(64, 128), (256, 128), (128, 256)]
    options = [KEEP, INT8_CH_SYM, INT4_G32_SYM, QuantOption.int_(4, 256, True), INT3_G32_ASYM]
    return measure_profile("test-cpu", shapes, options, "cpu", tokens=(1, 8), samples=3)


def test_profile_has_one_timing_per_fitting_shape_option_and_token_count(small_profile):
    p = small_profile
    counted = {(e.option, e.out_features, e.in_features, e.tokens) for e in p.entries}
    assert len(counted) == len(p.entries)
    # int4-g256 tiles only in=256; every other option fits all three shapes
    assert len(p.entries) == (4 * 3 + 1 * 1) * 2
    assert {e.in_features for e in p.entries if e.option == "int4-g256-sym"} == {256}
    assert p.kernel_for_option == {"fp16": "dense", "int3-g32-asym": "dequant_dense", "int4-g256-sym": "int4_tinygemm_cpu",
                                   "int4-g32-sym": "int4_tinygemm_cpu", "int8-ch-sym": "int8_weight_only"}
    assert all(e.p10_s <= e.median_s <= e.p90_s for e in p.entries)
    assert p.device_type == "cpu" and p.activation_dtype == "bfloat16" and p.threads >= 1


def test_profile_json_round_trip_and_bad_files(small_profile, tmp_path):
    path = small_profile.save(tmp_path / "p.json")
    assert HardwareProfile.load(path) == small_profile
    raw = json.loads(path.read_text())
    raw["schema_version"] = 2
    (tmp_path / "v2.json").write_text(json.dumps(raw))
    with pytest.raises(PlanVersionError, match="schema version 2"):
        HardwareProfile.load(tmp_path / "v2.json")
    raw["schema_version"] = 1
    raw["entries"][0]["median_s"] = -1.0
    (tmp_path / "neg.json").write_text(json.dumps(raw))
    with pytest.raises(BadInputError, match=r"entries\.0\.median_s"):
        HardwareProfile.load(tmp_path / "neg.json")
    (tmp_path / "plan.json").write_text('{"format": "bitalloc.plan"}')
    with pytest.raises(BadInputError, match="not a bitalloc latency profile"):
        HardwareProfile.load(tmp_path / "plan.json")
    with pytest.raises(BadInputError, match="does not exist"):
        HardwareProfile.load(tmp_path / "missing.json")


def test_checked_in_profile_schema_equals_generated():
    assert PROFILE_SCHEMA_PATH.is_file(), f"{PROFILE_SCHEMA_PATH} is missing"
    assert PROFILE_SCHEMA_PATH.read_text() == canonical_json(HardwareProfile.model_json_schema())


REPO_PROFILES = sorted((Path(__file__).resolve().parents[1] / "profiles").glob("*.json"))


@pytest.mark.parametrize("path", REPO_PROFILES, ids=[p.stem for p in REPO_PROFILES])
def test_shipped_profiles_load_and_time_every_option_they_name_at_every_shape(path):
    """The measured profiles in profiles/ are what `--latency-profile profiles/NAME.json` reads: each must
    load under the current schema and hold a timing for each option it lists at each shape it fits
    (a group size must divide the input features) and each token count."""
    profile = HardwareProfile.load(path)
    assert profile.name == path.stem and profile.models, f"{path.name}: no model timings"
    timed = {(e.option, e.out_features, e.in_features, e.tokens) for e in profile.entries}
    shapes = {(e.out_features, e.in_features, e.tokens) for e in profile.entries}
    missing = [(o, *s) for o in profile.kernel_for_option for s in shapes
               if parse_option(o).fits(s[1]) and (o, *s) not in timed]
    assert not missing, f"{path.name}: {len(missing)} option/shape timings missing, e.g. {missing[:3]}"
    assert all(e.kernel == profile.kernel_for_option[e.option] for e in profile.entries)


def _profile_with(entries: list[LatencyEntry]) -> HardwareProfile:
    return HardwareProfile(name="synthetic", device_type="cpu", device_name="x", activation_dtype="bfloat16", threads=1,
                           torch_version="0", bitalloc_version="0", measured_on="2026-01-01", kernels={},
                           kernel_for_option={}, checks=[], entries=entries)


def _entry(option, out_f, in_f, tokens, seconds):
    return LatencyEntry(option=option, kernel="k", out_features=out_f, in_features=in_f, tokens=tokens,
                        median_s=seconds, p10_s=seconds, p90_s=seconds, samples=1, calls_per_sample=1)


def test_latency_model_looks_up_measured_shapes_and_scales_the_nearest_one():
    model = LatencyModel(_profile_with([
        _entry("fp16", 100, 100, 1, 1e-5), _entry("fp16", 1000, 1000, 1, 5e-4), _entry("fp16", 100, 100, 64, 2e-5),
    ]))
    assert model.predict(KEEP, 100, 100, 1) == 1e-5
    assert model.predict("fp16", 1000, 1000, 1) == 5e-4
    assert model.predict("fp16", 100, 100, 64) == 2e-5
    # 200x100 is nearest (in log size) to 100x100: twice the weights, twice the time
    assert model.predict("fp16", 200, 100, 1) == pytest.approx(2e-5)
    # 800x1000 is nearest to 1000x1000
    assert model.predict("fp16", 800, 1000, 1) == pytest.approx(4e-4)
    with pytest.raises(BadInputError, match="no timing for option int4-g32-sym"):
        model.predict(INT4_G32_SYM, 100, 100, 1)
    with pytest.raises(BadInputError, match=r"no timings at 512 tokens \(it has \[1, 64\]\)"):
        model.predict(KEEP, 100, 100, 512)


def test_latency_matrix_is_nan_where_the_option_is_not_allowed(small_profile):
    import numpy as np

    model = LatencyModel(small_profile)
    shapes, options = [(64, 128), (128, 256)], [KEEP, QuantOption.int_(4, 256, True)]
    allowed = np.array([[True, False], [True, True]])
    m = model.matrix(shapes, options, allowed, tokens=1)
    assert np.isnan(m[0, 1]) and np.isfinite(m[[0, 1, 1], [0, 0, 1]]).all()
    measured = {(e.option, e.out_features, e.in_features): e.median_s for e in small_profile.entries if e.tokens == 1}
    assert m[1, 1] == measured["int4-g256-sym", 128, 256]


def test_model_on_real_kernels_computes_what_the_simulation_computes():
    model = make_llama()
    names = select_modules(model)
    options = {n: [INT4_G32_SYM, INT8_CH_SYM, INT3_G32_ASYM, KEEP][i % 4] for i, n in enumerate(names)}
    simulated = apply_options(copy.deepcopy(model), options)
    on_kernels = copy.deepcopy(model)
    used = attach_kernels(on_kernels, options, dtype=torch.float32)
    assert set(used.values()) == {"int4_tinygemm_cpu", "int8_weight_only", "dequant_dense", "dense"}
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        torch.testing.assert_close(on_kernels(ids).logits, simulated(ids).logits, rtol=1e-3, atol=1e-4)


def test_model_timing_measures_the_model_outside_its_planned_layers(small_profile):
    model = make_llama()
    names = select_modules(model)
    shapes = sorted({tuple(model.get_submodule(n).weight.shape) for n in names})
    profile = measure_profile("tiny", shapes, [KEEP], "cpu", tokens=(1, 16), samples=3)
    timings = measure_model_timings(model.to(torch.bfloat16), names, profile, "tiny-llama", [1, 16], context=8, samples=3)
    assert [(t.tokens, t.context) for t in timings] == [(1, 8), (16, 0)]
    for t in timings:
        assert t.other_s > 0 and t.linear_predicted_s > 0 and t.dense_measured_s > 0
        # the calibration reproduces the all-dense forward it was measured on (floored: on a model this
        # tiny, timing noise can make the dense forward no slower than the no-op one)
        assert t.layer_scale == pytest.approx(max((t.dense_measured_s - t.other_s) / t.linear_predicted_s, 1e-3))
        assert t.signature == shape_signature("LlamaForCausalLM", [tuple(make_llama().get_submodule(n).weight.shape) for n in names])
    # the planned layers end up dense on the profile's kernels (the no-ops were put back)
    assert {type(model.get_submodule(n)).__name__ for n in names} == {"KernelLinear"}
    assert time_forward(model, 4, 0, samples=2).median_s > 0


@pytest.mark.parametrize("element", ["e4m3", "e5m2", "e2m3", "e3m2", "e2m1"])
def test_element_rounding_grid_is_every_finite_value_of_the_format(element):
    """The values the dequantize fallback looks codes up in: round_to_element's fixed points are exactly
    the format's finite values (ml_dtypes), from its smallest subnormal to its max."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    import numpy as np

    dtype = {"e4m3": ml_dtypes.float8_e4m3fn, "e5m2": ml_dtypes.float8_e5m2, "e2m3": ml_dtypes.float6_e2m3fn,
             "e3m2": ml_dtypes.float6_e3m2fn, "e2m1": ml_dtypes.float4_e2m1fn}[element]
    width = 1 + int(element[1]) + int(element[3])
    values = np.arange(2**width, dtype=np.uint8).view(dtype).astype(np.float32)
    expected = torch.from_numpy(np.unique(values[np.isfinite(values)]))
    assert torch.equal(round_to_element(expected, element), expected)
    el = ELEMENTS[element]
    assert float(expected.max()) == el.max_value and float(expected[expected > 0].min()) == 2.0 ** (el.min_exp - el.mbits)
    between = (expected[1:] + expected[:-1]) / 2 + (expected[1:] - expected[:-1]) / 8  # off the grid
    assert not torch.isin(between, expected).any() and torch.isin(round_to_element(between, element), expected).all()


@pytest.mark.parametrize("option", [QuantOption.fp("e4m3", None), QuantOption.fp("e5m2", 32), QuantOption.fp("e2m1", 32),
                                    QuantOption.mx("e2m1"), QuantOption.mx("e3m2"), QuantOption.nvfp4()])
def test_fp_formats_without_a_cpu_kernel_fall_back_to_dequantize_and_matmul(option):
    w = _weight(64, 128)
    checks = []
    kernel, fn = choose_kernel(option, torch.device("cpu"), torch.float32, w, checks)
    assert kernel.name == "dequant_dense" and checks[-1].status == "ok"
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(4))
    want = x @ K.reference_weight(w, option).t()
    # the fallback stores the format's own codes and scales, so it computes with the stored values
    torch.testing.assert_close(fn(x), want, rtol=1e-4, atol=1e-5)


def test_whole_forward_adds_up_on_a_cpu_and_overlaps_host_and_device_on_a_gpu():
    cpu = LatencyModel(_profile_with([_entry("fp16", 8, 8, 1, 1e-3)]))
    assert cpu.combine(other_s=0.010, layers_s=0.004, layers_host_s=0.0) == pytest.approx(0.014)
    assert cpu.combine(other_s=0.010, layers_s=0.004, layers_host_s=0.0, layer_scale=1.5) == pytest.approx(0.016)
    gpu = LatencyModel(_profile_with([_entry("fp16", 8, 8, 1, 1e-3)]).model_copy(update={"device_type": "cuda"}))
    # host-bound: the rest of the model plus issuing the layers outlasts the device's work
    assert gpu.combine(other_s=0.020, layers_s=0.005, layers_host_s=0.002) == pytest.approx(0.022)
    # device-bound: big kernels hide the host
    assert gpu.combine(other_s=0.020, layers_s=0.080, layers_host_s=0.002) == pytest.approx(0.080)


def test_cpu_timings_have_no_host_time_and_gpu_host_time_is_not_scaled():
    assert all(e.host_s is None for e in measure_profile("h", [(64, 128)], [KEEP], "cpu", tokens=(1,), samples=2).entries)
    e = _entry("fp16", 100, 100, 1, 1e-5).model_copy(update={"host_s": 4e-6})
    gpu = LatencyModel(_profile_with([e]).model_copy(update={"device_type": "cuda"}))
    assert gpu.predict_host("fp16", 400, 100, 1) == 4e-6  # issuing a call does not grow with the weight
    assert gpu.predict("fp16", 400, 100, 1) == pytest.approx(4e-5)


def test_a_kernel_that_cannot_take_one_shape_falls_back_for_that_shape_only(monkeypatch):
    def prepare(w, o, dt):
        if w.shape[1] == 256:
            raise ValueError("cannot tile 256 columns")
        return lambda x: x @ K.reference_weight(w, o).to(dt).t()

    picky = K.Kernel("picky_int8", ("cpu",), "refuses in=256", supports=lambda o: o.bits == 8, prepare=prepare)
    monkeypatch.setattr(K, "_KERNELS", {"picky_int8": picky, **K._KERNELS})
    profile = measure_profile("p", [(64, 128), (64, 256)], [INT8_CH_SYM], "cpu", tokens=(1,), samples=2)
    kernels = {e.in_features: e.kernel for e in profile.entries}
    assert kernels == {128: "picky_int8", 256: "int8_weight_only"}
    assert profile.kernel_for_option == {"int8-ch-sym": "picky_int8"}
    assert any(c.status == "failed" and "cannot tile 256" in c.detail for c in profile.checks)


def test_timings_rotate_over_weight_copies_that_exceed_the_caches():
    from bitalloc.latency.measure import COLD_BYTES, MAX_COPIES, cold_copies

    assert cold_copies(4096, 14336, COLD_BYTES) == 2  # 117 MB in bf16: a second copy reaches 128 MiB
    assert cold_copies(576, 1536, COLD_BYTES) == MAX_COPIES  # 1.7 MB: 76 would be needed, 64 is the cap
    assert cold_copies(16384, 16384, COLD_BYTES) == 1 and cold_copies(8, 8, 0) == 1
