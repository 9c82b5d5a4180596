"""The on-disk profile cache: reuse across budgets, and damaged entries are never used."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

import bitalloc
from bitalloc import candidates
from bitalloc.profile import statistics, store

from conftest import make_llama


class Spy:
    """Wrap bitalloc.api functions: count calls, keep the tables they return, optionally forbid them."""

    def __init__(self, monkeypatch):
        self.collect_calls = 0
        self.built, self.loaded = [], []
        self.forbid_collect = False
        # api imports these where it calls them (lazily, so `import bitalloc` stays torch-free): patch their homes
        real_collect, real_build, real_load = (statistics.collect_statistics, candidates.build_candidate_table,
                                               store.load_table)

        def collect(*a, **k):
            if self.forbid_collect:
                raise AssertionError("collect_statistics called although the profile is cached")
            self.collect_calls += 1
            return real_collect(*a, **k)

        def build(*a, **k):
            t = real_build(*a, **k)
            self.built.append(t)
            return t

        def load(*a, **k):
            t = real_load(*a, **k)
            self.loaded.append(t)
            return t

        monkeypatch.setattr(statistics, "collect_statistics", collect)
        monkeypatch.setattr(candidates, "build_candidate_table", build)
        monkeypatch.setattr(store, "load_table", load)


def assert_same_table(a, b):
    assert a.groups == b.groups and a.shapes == b.shapes and a.options == b.options
    np.testing.assert_array_equal(a.storage_bits, b.storage_bits)
    assert set(a.errors) == set(b.errors)
    for m in a.errors:
        np.testing.assert_array_equal(a.errors[m], b.errors[m])


def cache_files(d):
    """The cache entries' array files (each entry is a profile folder: profile.json + tensors.npz)."""
    return sorted(p / "tensors.npz" for p in d.iterdir() if p.is_dir())


def test_second_plan_reuses_cached_profile(tmp_path, monkeypatch, calib_ids):
    spy = Spy(monkeypatch)
    model = make_llama()
    p4 = bitalloc.plan(model, "4bits", calib_ids, cache_dir=tmp_path)
    assert spy.collect_calls == 1 and len(spy.built) == 1 and spy.loaded == [None]
    assert len(cache_files(tmp_path)) == 1

    spy.forbid_collect = True
    p3 = bitalloc.plan(model, "3bits", calib_ids, cache_dir=tmp_path)
    assert len(spy.built) == 1 and spy.loaded[-1] is not None
    assert_same_table(spy.loaded[-1], spy.built[0])
    assert p3.summary.storage_bits_per_weight <= 3.0 < p4.summary.storage_bits_per_weight
    # a cached plan at the same budget is the plan computed from scratch, byte for byte
    again = bitalloc.plan(model, "4bits", calib_ids, cache_dir=tmp_path)
    spy.forbid_collect = False
    fresh = bitalloc.plan(make_llama(), "4bits", calib_ids, cache_dir=False)
    assert again.to_json() == p4.to_json() == fresh.to_json()
    # other solver settings or error model reuse it too; another calibration does not
    spy.forbid_collect = True
    bitalloc.plan(model, "4bits", calib_ids, cache_dir=tmp_path, error_model="local")
    spy.forbid_collect = False
    bitalloc.plan(model, "4bits", calib_ids[:2], cache_dir=tmp_path)
    assert spy.collect_calls == 3  # first plan, the from-scratch plan, the new calibration
    assert len(cache_files(tmp_path)) == 2


def test_other_weights_are_not_served_from_cache(tmp_path, monkeypatch, calib_ids):
    spy = Spy(monkeypatch)
    bitalloc.plan(make_llama(seed=0), "4bits", calib_ids, cache_dir=tmp_path)
    p = bitalloc.plan(make_llama(seed=1), "4bits", calib_ids, cache_dir=tmp_path)
    assert spy.collect_calls == 2
    assert p.model.content_hash == bitalloc.models.weights_hash(make_llama(seed=1))
    assert len(cache_files(tmp_path)) == 2


@pytest.mark.parametrize("damage", ["overwrite", "truncate", "garbage"])
def test_damaged_cache_entry_is_detected_and_recomputed(tmp_path, monkeypatch, calib_ids, damage):
    spy = Spy(monkeypatch)
    model = make_llama()
    first = bitalloc.plan(model, "4bits", calib_ids, cache_dir=tmp_path)
    (entry,) = cache_files(tmp_path)
    data = bytearray(entry.read_bytes())
    if damage == "overwrite":
        mid = len(data) // 2
        data[mid:mid + 64] = bytes((b ^ 0xFF) for b in data[mid:mid + 64])
    elif damage == "truncate":
        data = data[: len(data) // 3]
    else:
        data = bytearray(b"not a zip file at all")
    entry.write_bytes(bytes(data))

    with pytest.warns(UserWarning, match="damaged profile cache entry"):
        second = bitalloc.plan(model, "4bits", calib_ids, cache_dir=tmp_path)
    assert spy.collect_calls == 2  # recomputed, not used
    assert second.to_json() == first.to_json()
    # the entry was rewritten and is good again: no warning, no recomputation
    spy.forbid_collect = True
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        third = bitalloc.plan(model, "4bits", calib_ids, cache_dir=tmp_path)
    assert not [w for w in caught if "damaged" in str(w.message)]
    assert third.to_json() == first.to_json()


def test_entry_with_wrong_checksum_is_rejected(tmp_path, calib_ids, monkeypatch):
    """A well-formed entry whose metadata was altered (an option's bits) must not be trusted."""
    spy = Spy(monkeypatch)
    model = make_llama()
    first = bitalloc.plan(model, "4bits", calib_ids, cache_dir=tmp_path)
    (entry,) = cache_files(tmp_path)
    doc_path = entry.parent / "profile.json"
    doc = json.loads(doc_path.read_text())
    key = doc["key"]
    assert entry.parent.name == f"table-{key[7:39]}"
    doc["profile"]["table"]["options"][0]["bits"] = 8  # the arrays untouched: only the checksum's coverage sees it
    doc_path.write_text(json.dumps(doc))
    with pytest.warns(UserWarning, match="checksum"):
        assert store.load_table(tmp_path, key) is None
    with pytest.warns(UserWarning, match="damaged"):
        again = bitalloc.plan(model, "4bits", calib_ids, cache_dir=tmp_path)
    assert spy.collect_calls == 2
    assert again.to_json() == first.to_json()


def test_store_round_trip(tmp_path, monkeypatch, calib_ids):
    spy = Spy(monkeypatch)
    bitalloc.plan(make_llama(), "4bits", calib_ids, cache_dir=False)
    table = spy.built[0]
    key = store.content_key({"anything": [1, 2, 3]})
    path = store.save_table(tmp_path, key, table)
    assert path.parent == tmp_path and path.name == f"table-{key[7:39]}"
    assert_same_table(store.load_table(tmp_path, key), table)
    assert store.load_table(tmp_path, store.content_key({"anything": [1, 2, 4]})) is None
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp files
    assert sorted(p.name for p in path.iterdir()) == ["profile.json", "tensors.npz"]
    assert store.content_key({"a": 1, "b": 2}) == store.content_key({"b": 2, "a": 1})


def test_default_cache_dir_honours_env(tmp_path, monkeypatch):
    monkeypatch.setenv("BITALLOC_CACHE_DIR", str(tmp_path / "c"))
    assert store.default_cache_dir() == tmp_path / "c"


def test_python_api_writes_no_cache_unless_asked(tmp_path, monkeypatch, calib_ids):
    """A training pipeline calling bitalloc.plan(model, ...) leaves no files behind; cache_dir=True opts in."""
    cache = tmp_path / "default-cache"
    monkeypatch.setenv("BITALLOC_CACHE_DIR", str(cache))
    bitalloc.plan(make_llama(), "4bits", calib_ids)
    bitalloc.pareto(make_llama(), "3.5:4.0:0.5bits", calib_ids)
    assert not cache.exists() or not any(cache.rglob("*"))
    bitalloc.plan(make_llama(), "4bits", calib_ids, cache_dir=True)
    assert len(cache_files(cache)) == 1
