"""Profiling on Ray (profile/distributed.py): a local 2-CPU cluster started here, tiny models, real numbers."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import fields

import numpy as np
import pytest
import torch

from bitalloc import api
from bitalloc.calibration import calibration_from_tokens
from bitalloc.config import RaySpec
from bitalloc.errors import BadInputError
from bitalloc.models import LoadedModel, load_model, select_modules
from bitalloc.options import default_options
from bitalloc.profile.distributed import (SHARD_RTOL, RayPool, add_sums, merge_sites, ray_candidate_table,
                                          shard_bounds, spike_accumulators)
from bitalloc.profile.spikes import DEFAULT_THRESHOLD, collect_spikes
from bitalloc.profile.statistics import DIVIDE_BY, ModuleStats, collect_statistics, finish_statistics, statistic_sums

from conftest import make_llama, make_qwen2

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def cluster():
    # address="local": always a fresh cluster of this test's own, never one $RAY_ADDRESS names
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="warning", log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture
def calib(calib_ids):
    return calibration_from_tokens(calib_ids)  # 4 windows x 32 tokens


def _same_table(a, b) -> None:
    assert a.groups == b.groups and a.shapes == b.shapes and a.options == b.options and a.quantizer == b.quantizer
    assert np.array_equal(a.storage_bits, b.storage_bits, equal_nan=True)
    for m in a.errors:
        assert np.array_equal(a.errors[m], b.errors[m], equal_nan=True), m


def _rel_diff(a, b) -> float:
    """Largest relative difference over the cells where an option fits (NaN elsewhere, in both)."""
    worst = 0.0
    for m in a.errors:
        x, y = a.errors[m], b.errors[m]
        assert np.array_equal(np.isnan(x), np.isnan(y))
        ok = ~np.isnan(x)
        worst = max(worst, float(np.max(np.abs(x[ok] - y[ok]) / np.maximum(np.abs(x[ok]), 1e-300))))
    return worst


def test_profile_model_on_one_worker_is_bit_identical(cluster, calib_ids, tmp_path):
    # compute_profile's hook: fisher, salience and the table of each block on the worker
    signals = ("fisher", "salience", "spikes", "table")
    options = default_options()[:6]
    # Ray workers never hold the whole model, so nothing is folded: the default there is rtn-w, not awq
    local = api.profile_model(make_llama(), calib_ids, tmp_path / "local", signals=signals, options=options,
                              quantizer="rtn-w")
    on_ray = api.profile_model(make_llama(), calib_ids, tmp_path / "ray", signals=signals, options=options,
                               ray=RaySpec(workers=1))
    assert on_ray.table.quantizer == "rtn-w"
    _same_table(local.table, on_ray.table)
    for a, b in zip(local.modules, on_ray.modules, strict=True):
        assert a.name == b.name
        assert np.array_equal(a.fisher, b.fisher) and np.array_equal(a.h_diag, b.h_diag)
        assert a.salience.top1pct_share == b.salience.top1pct_share
        for x, y in ((a.spikes.input, b.spikes.input), (a.spikes.output, b.spikes.output)):
            assert (x.max_abs, x.kurtosis, x.ratio, x.tokens) == (y.max_abs, y.kurtosis, y.ratio, y.tokens)
            assert np.array_equal(x.channel_rms, y.channel_rms) and np.array_equal(x.top_tokens, y.top_tokens)
    assert local.key == on_ray.key  # one worker: the same profile, so the same key


def test_service_profile_job_on_one_worker_is_bit_identical(cluster, model_dir, tmp_path):
    # what `bitalloc serve --ray` does for a profile job: work.build_profile with the RaySpec
    from bitalloc.profile.artifact import Profile
    from bitalloc.service.app import _profile_spec
    from bitalloc.service.schemas import CalibrationIn, OptionsIn
    from bitalloc.service.sources import SourceRules
    from bitalloc.service.store import SQLiteStore
    from bitalloc.service.work import build_profile

    spec = _profile_spec(str(model_dir), CalibrationIn(path=str(model_dir / "calib.txt"), seq_len=32, tokens=96),
                         OptionsIn(bits=[3, 4], group_sizes=[32]), False, False, SourceRules(), "rtn-w")
    tables = []
    for name, ray_spec in (("local", None), ("ray", RaySpec(workers=1))):
        store = SQLiteStore(tmp_path / name)
        record, _, _ = build_profile(store, spec, None, lambda p, s: None, ray=ray_spec)
        tables.append(Profile.load(store.profile_dir(record.id), record.id).table)
    _same_table(*tables)


def test_shard_sums_add_to_the_whole_calibration(calib):
    model = make_qwen2()
    names = select_modules(model, True, True)  # untied embedding and head: the embedding's token_share is summed too
    whole = statistic_sums(model, names, calib)
    parts = [statistic_sums(model, names, calibration_from_tokens(calib.tokens[a:b])) for a, b in shard_bounds(4, 3)]
    total = add_sums(add_sums(parts[0], parts[1]), parts[2])
    assert (total.n_inputs, total.n_predicted) == (whole.n_inputs, whole.n_predicted) == (4 * 32, 4 * 31)
    emb = model.get_input_embeddings()
    name = next(n for n in names if model.get_submodule(n) is emb)
    assert torch.equal(total.modules[name].token_share, whole.modules[name].token_share)  # integer counts: exact
    assert float(total.modules[name].token_share.sum()) == 4 * 32
    for n in names:
        torch.testing.assert_close(total.modules[n].fisher, whole.modules[n].fisher, rtol=1e-5, atol=0)
    # every field of ModuleStats is a mean over one of the counts: a new field needs its divisor
    assert {f.name for f in fields(ModuleStats)} == set(DIVIDE_BY)


def test_spike_shards_merge_to_the_whole_calibration(calib):
    # what RayPool.spikes does with three shards, here without a cluster
    model = make_llama()
    names = select_modules(model, False, False)
    whole = collect_spikes(model, names, calib, top_k=4)
    shards = [spike_accumulators(model, names, calibration_from_tokens(calib.tokens[a:b]), a, 4)
              for a, b in shard_bounds(4, 3)]
    merged = {n: tuple(merge_sites(merge_sites(s0, s1), s2) for s0, s1, s2 in zip(*(sh[n] for sh in shards)))
              for n in names}
    for n in names:
        for site, acc in zip(("input", "output"), merged[n]):
            got, want = acc.finish(DEFAULT_THRESHOLD), getattr(whole[n], site)
            # maxima and the top tokens (window index in the whole calibration) are exact
            assert got.max_abs == want.max_abs and np.array_equal(got.channel_max, want.channel_max)
            assert np.array_equal(got.top_tokens, want.top_tokens) and np.array_equal(got.top_values, want.top_values)
            assert got.tokens == want.tokens == 4 * 32
            # the float64 moment sums only reassociate
            np.testing.assert_allclose(got.channel_rms, want.channel_rms, rtol=1e-12)
            assert got.kurtosis == pytest.approx(want.kurtosis, rel=1e-9)
    assert any(int(t[0]) > 0 for n in names for t in merged[n][0].finish(DEFAULT_THRESHOLD).top_tokens)


def test_shards_are_contiguous_in_window_order():
    assert shard_bounds(8, 1) == [(0, 8)]
    assert shard_bounds(8, 2) == [(0, 4), (4, 8)]
    assert shard_bounds(7, 3) == [(0, 2), (2, 4), (4, 7)]


def test_bad_worker_counts_are_refused(cluster, calib):
    with pytest.raises(BadInputError, match="ray.workers must be a whole number of at least 1, got 0"):
        RaySpec(workers=0)
    model = make_llama()
    names = select_modules(model, False, False)
    with pytest.raises(BadInputError, match="ray.workers 5 is more than the 4 calibration window"):
        RayPool(RaySpec(workers=5), LoadedModel(model=model)).statistics(names, calib)
    with pytest.raises(BadInputError, match=r"the Ray cluster has 2 CPU\(s\); ray.workers 3 needs 3"):
        RayPool(RaySpec(workers=3), LoadedModel(model=model)).statistics(names, calib)


def _cli_without_ray(*args: str) -> subprocess.CompletedProcess:
    code = ("import sys; sys.modules['ray'] = None  # as if the extra were not installed\n"
            "from bitalloc.cli import main; sys.argv = ['bitalloc', *sys.argv[1:]]; main()")
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args", [["profile", "some-model", "--ray", "auto"],
                                  ["plan", "some-model", "--budget", "4bits", "--ray", "10.0.0.1:6379"],
                                  ["serve", "--ray", "auto"]])
def test_ray_without_the_extra_is_one_error_line(args):
    r = _cli_without_ray(*args)
    assert r.returncode == 2
    assert r.stderr == "error: --ray needs the ray extra: pip install 'bitalloc[ray]'\n"


def test_bad_worker_flags_are_one_error_line():
    r = _cli_without_ray("profile", "some-model", "--ray", "auto", "--ray-workers", "0")
    assert (r.returncode, r.stderr) == (2, "error: --ray-workers must be a whole number of at least 1, got 0\n")
    r = _cli_without_ray("profile", "some-model", "--ray-workers", "2")
    assert (r.returncode, r.stderr) == (2, "error: --ray-workers needs --ray auto|ADDRESS\n")


def test_serve_with_ray_runs_a_profile_job_over_http_on_the_cluster(cluster, model_dir, tmp_path):
    # `bitalloc serve --ray ADDRESS` in a subprocess, joined to this test's cluster; a profile job posted over
    # HTTP runs on one Ray worker and stores the same table as the job run in-process without Ray
    httpx = pytest.importorskip("httpx")
    from test_service import TOKEN, Server, wait_job

    from bitalloc.profile.artifact import Profile
    from bitalloc.service.app import _profile_spec
    from bitalloc.service.schemas import CalibrationIn, OptionsIn
    from bitalloc.service.sources import SourceRules
    from bitalloc.service.store import SQLiteStore
    from bitalloc.service.work import build_profile

    calibration = {"path": str(model_dir / "calib.txt"), "seq_len": 32, "tokens": 96}
    options = {"bits": [3, 4], "group_sizes": [32]}
    address = ray.get_runtime_context().gcs_address
    server = Server(tmp_path / "store", model_dir, tmp_path / "server.log", ("--ray", address, "--ray-workers", "1"))
    server.start()
    try:
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60) as client:
            posted = client.post("/v1/profiles", json={"model": str(model_dir), "calibration": calibration,
                                                       "options": options})
            assert posted.status_code == 202, posted.text
            job = wait_job(client, posted.json()["job"]["id"], timeout=300)
            assert job["state"] == "done", job
            profile_id = posted.json()["profile_id"]
    finally:
        server.stop()
    assert "ray: " + address in server.log.read_text()  # the server said where its profile jobs run
    served = Profile.load(SQLiteStore(tmp_path / "store").profile_dir(profile_id), profile_id).table
    # the server's default: rtn-w, since its Ray workers cannot fold awq's scales into a whole model
    spec = _profile_spec(str(model_dir), CalibrationIn(**calibration), OptionsIn(**options), False, False, SourceRules(),
                         foldable=False)
    assert spec.quantizer == "rtn-w"
    local = SQLiteStore(tmp_path / "local")
    record, _, _ = build_profile(local, spec, None, lambda p, s: None)
    _same_table(Profile.load(local.profile_dir(record.id), record.id).table, served)


# Last in the file: the pool's two actors hold both CPUs of the test cluster until the module ends.
@pytest.fixture(scope="module")
def two_workers(cluster):
    """One 2-worker pool for the tests that need two (each actor start imports torch: seconds)."""
    pool = RayPool(RaySpec(workers=2), LoadedModel(model=make_llama()))  # in memory: sent through the object store
    yield pool
    pool.close()


def test_one_worker_table_is_bit_identical(cluster, model_dir, calib):
    # the worker loads the model from the path the driver loaded (and checks its content hash)
    loaded = load_model(str(model_dir))
    names = select_modules(loaded.model, False, False)
    single = api.profile(loaded, calib, names, default_options())
    one = api.profile(loaded, calib, names, default_options(), ray=RaySpec(workers=1))
    _same_table(single, one)  # one shard: the same arithmetic in the same order, bit for bit
    assert api.plan_from_table(single, "3.5bits", loaded, calib).to_json() == \
        api.plan_from_table(one, "3.5bits", loaded, calib).to_json()


def test_two_worker_table_is_within_tolerance_and_plans_the_same(two_workers, calib):
    loaded = two_workers.loaded
    names = select_modules(loaded.model, False, False)
    # rtn: float32 sums in another order move every cell a little; rtn-w's searched scales can flip on such a
    # difference (0.4% of a cell on this table), and its one-worker table is checked bit for bit above
    single = api.profile(loaded, calib, names, default_options(), quantizer="rtn")
    two = ray_candidate_table(two_workers, names, calib, default_options(), quantizer="rtn")
    assert two.groups == single.groups and np.array_equal(two.storage_bits, single.storage_bits, equal_nan=True)
    assert 0 < _rel_diff(single, two) < SHARD_RTOL  # two shards: float32 sums in another order
    plans = [api.plan_from_table(t, "3.5bits", loaded, calib) for t in (single, two)]
    # the same option for every module; the recorded predictions (6 significant digits) may differ in the last
    choices = [[(a.module, a.label, a.storage_bits) for a in p.assignments] for p in plans]
    assert choices[0] == choices[1] and len({label for _, label, _ in choices[0]}) > 1
    assert plans[1].solver.objective == pytest.approx(plans[0].solver.objective, rel=SHARD_RTOL)


def test_killed_worker_is_retried_and_the_sums_are_unchanged(two_workers, calib, tmp_path):
    model = two_workers.loaded.model
    names = select_modules(model, False, False)
    marker = tmp_path / "shard0-died"
    got = two_workers.statistics(names, calib, _crash_marker=str(marker))
    assert marker.exists()  # the first attempt of shard 0 did die (os._exit), so this result is the retry's
    # the driver's reduction: shard 0's sums + shard 1's, in shard order, then divided: computed here the same way
    halves = [statistic_sums(model, names, calibration_from_tokens(calib.tokens[a:b])) for a, b in shard_bounds(4, 2)]
    expected = finish_statistics(add_sums(*halves))
    single = collect_statistics(model, names, calib)
    for n in names:
        for f in ("fisher", "hessian"):
            t = getattr(got[n], f)
            assert torch.equal(t, getattr(expected[n], f)), (n, f)
            # elementwise against the single-process order: off-diagonal H entries near 0 cancel, so the
            # bound is relative to the largest entry (the table cells stay within SHARD_RTOL, above)
            ref = getattr(single[n], f)
            assert float((t - ref).abs().max()) <= SHARD_RTOL * float(ref.abs().max())


def test_two_worker_spikes_match_single_process(two_workers, calib):
    model = two_workers.loaded.model
    names = select_modules(model, False, False)
    got = two_workers.spikes(names, calib, top_k=4, threshold=DEFAULT_THRESHOLD)
    want = collect_spikes(model, names, calib, top_k=4)
    for n in names:
        for site in ("input", "output"):
            g, w = getattr(got[n], site), getattr(want[n], site)
            assert g.max_abs == w.max_abs and np.array_equal(g.top_tokens, w.top_tokens)
            np.testing.assert_allclose(g.channel_rms, w.channel_rms, rtol=1e-12)

