"""The service's default budget scope is the CLI's: a size budget of a llama.cpp file is the whole file."""

from __future__ import annotations

import pytest

from bitalloc import api
from bitalloc.budget import parse_budget
from bitalloc.service.app import _profile_spec
from bitalloc.service.schemas import CalibrationIn, OptionsIn, PlanIn
from bitalloc.service.sources import SourceRules
from bitalloc.service.store import SQLiteStore
from bitalloc.service.work import PlanSpec, build_profile, make_plan, open_profile

from conftest import CALIB_TEXT
from test_gguf_file import write_tiny_gguf

pytest.importorskip("fastapi")


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf-service")
    source = write_tiny_gguf(root / "tiny-F16.gguf")
    (root / "calib.txt").write_text(CALIB_TEXT, encoding="utf-8")
    spec = _profile_spec(str(source), CalibrationIn(path=str(root / "calib.txt"), seq_len=32, tokens=128),
                         OptionsIn(formats=["gguf", "keep"]), False, False, SourceRules(), quantizer="imatrix")
    store = SQLiteStore(root / "store")
    record, loaded, calib = build_profile(store, spec, None, lambda p, s: None)
    return open_profile(store, record.id), loaded, calib


def test_a_size_budget_of_a_gguf_profile_is_the_whole_file_by_default(stored):
    profile, loaded, calib = stored
    default = make_plan(profile, PlanSpec(budget="900KB"))
    assert default.budget.scope == "model" and default.budget.fixed_bits  # the file's header, metadata, other tensors
    # the plan `bitalloc plan --target llama.cpp --budget 900KB` makes from the same table
    cli = api.plan_from_table(profile.table, parse_budget("900KB", "model"), loaded, calib)
    assert [a.label for a in default.assignments] == [a.label for a in cli.assignments]
    planned = make_plan(profile, PlanSpec(budget="900KB", budget_scope="planned"))
    assert planned.budget.scope == "planned" and planned.summary.storage_bytes > default.summary.storage_bytes
    assert make_plan(profile, PlanSpec(budget="5bits")).budget.scope == "planned"  # bits: of the planned weights
    # an explicit scope is part of the stored plan's id, the default is not
    assert PlanSpec(budget="900KB").plan_id("p") != PlanSpec(budget="900KB", budget_scope="planned").plan_id("p")
    assert PlanIn(profile_id="p", budget="900KB").budget_scope is None
