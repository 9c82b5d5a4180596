"""Four Ray workers, one calibration window each, give the single-process table bit for bit.

The driver adds shard sums in shard order; with one window per shard that is the single process's own
order (window 0 + window 1 + ...), so nothing may differ. (Shards of several windows associate the
float32 sums differently: test_ray.py checks two workers against SHARD_RTOL.)

Its own 4-CPU local cluster (test_ray.py's has 2; a module's cluster holds until the module ends).
"""

from __future__ import annotations

import pytest

from bitalloc import api
from bitalloc.calibration import calibration_from_tokens
from bitalloc.config import DEFAULT_UNFOLDED_QUANTIZER, RaySpec
from bitalloc.models import LoadedModel, select_modules
from bitalloc.options import default_options
from bitalloc.profile.distributed import RayPool, ray_candidate_table

from conftest import make_qwen2
from test_ray import _same_table

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def four_workers():
    ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level="warning", log_to_driver=False)
    pool = RayPool(RaySpec(workers=4), LoadedModel(model=make_qwen2()))
    yield pool
    pool.close()
    ray.shutdown()


def test_four_workers_one_window_each_give_the_single_process_table(four_workers, calib_ids):
    calib = calibration_from_tokens(calib_ids)  # 4 windows: one per worker
    loaded = four_workers.loaded
    names = select_modules(loaded.model, False, False)
    single = api.profile(loaded, calib, names, default_options())
    four = ray_candidate_table(four_workers, names, calib, default_options(), quantizer=DEFAULT_UNFOLDED_QUANTIZER)
    _same_table(single, four)
    plans = [api.plan_from_table(t, "3.5bits", loaded, calib).to_json() for t in (single, four)]
    assert plans[0] == plans[1]
