"""Property tests: whatever a budget string, a plan file or a profile.json holds, loading it gives a
consistent object or one BitallocError, never another exception and never a silently wrong object.

Plans and profiles are mutated at a random place (a value replaced, a key dropped, a number nudged,
list items swapped or repeated). An accepted plan is checked against an oracle written here, apart
from bitalloc's own checks: labels and storage bits from options and shapes, unique modules, the
summary from the assignments. An accepted profile must be byte for byte the one that was saved:
its checksum covers every field of profile.json, so any edit is refused.
"""

from __future__ import annotations

import json
import math
import random
import shutil

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bitalloc
from bitalloc.budget import parse_budget
from bitalloc.errors import BitallocError
from bitalloc.io import canonical_json
from bitalloc.options import QuantOption
from bitalloc.plan import Plan

from conftest import CALIB_SHAPE, VOCAB, make_llama

quick = settings(max_examples=150, deadline=None, database=None, derandomize=True,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

# ---- budgets ----------------------------------------------------------------------------------------

UNITS = ["bits", "bit", "bpw", "%", "b", "kb", "MB", "GB", "KiB", "MiB", "GiB", "GB ", "lightyears", "", "e"]
NUMBERS = st.one_of(st.floats(allow_nan=True, allow_infinity=True).map(repr), st.integers().map(str),
                    st.sampled_from(["1e309", "-0", "0.0", ".5", "5.", "1e-320", "nan", "inf", "1_000", "٣", "+3"]))


def check_budget(text: str) -> None:
    try:
        b = parse_budget(text)
    except BitallocError:
        return
    assert b.kind in ("bits", "bytes", "percent") and math.isfinite(b.value) and b.value > 0, (text, b)
    assert b.kind != "percent" or b.value <= 100, (text, b)
    assert b.text == text.strip()
    assert math.isfinite(b.max_storage_bits(1000)) and b.max_storage_bits(1000) > 0
    assert parse_budget(b.text) == b  # what the plan records reads back the same


@quick
@given(st.tuples(st.sampled_from([" ", ""]), NUMBERS, st.sampled_from([" ", ""]), st.sampled_from(UNITS)).map("".join))
def test_budget_strings_parse_consistently_or_are_refused(text):
    check_budget(text)


@quick
@given(st.text(max_size=24))
def test_arbitrary_budget_text_parses_consistently_or_is_refused(text):
    check_budget(text)


# ---- mutations of a JSON document ------------------------------------------------------------------------

VALUES = [0, 1, -1, 2, 3, 4, 8, 16, 64, 2**40, 2**63, 0.5, -0.0, 1e308, float("nan"), float("inf"), "", "x",
          "int8-ch-asym", "fp16", "model.layers.0.mlp.up_proj", True, False, None, [], {}, [1, 2], {"a": 1}]


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, (*prefix, i))


def mutate(doc: dict, rng: random.Random) -> dict:
    """A copy of doc with one random edit somewhere (never at the root)."""
    doc = json.loads(json.dumps(doc))
    paths = [p for p in _paths(doc) if p]
    path = rng.choice(paths)
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    key, value = path[-1], parent[path[-1]]
    op = rng.choice(["replace", "delete", "nudge", "nudge", "swap", "repeat"])
    if op == "delete":
        del parent[key]
    elif op == "nudge" and isinstance(value, (int, float)) and not isinstance(value, bool):
        parent[key] = rng.choice([value + 1, value - 1, value * 2, -value, value / 2, 0])
    elif op == "nudge" and isinstance(value, str):
        parent[key] = rng.choice([value + "x", value[:-1], value.upper(), value.replace("4", "8")])
    elif op in ("swap", "repeat") and isinstance(value, list) and value:
        i, j = rng.randrange(len(value)), rng.randrange(len(value))
        if op == "swap":
            value[i], value[j] = value[j], value[i]
        else:
            value.insert(j, json.loads(json.dumps(value[i])))
    else:
        parent[key] = rng.choice(VALUES)
    return doc


def _dumps(doc) -> str:
    return json.dumps(doc, sort_keys=True)


# ---- plans -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def plan_doc() -> dict:
    ids = torch.randint(0, VOCAB, CALIB_SHAPE, generator=torch.Generator().manual_seed(3))
    options = [QuantOption.int_(3, 32), QuantOption.int_(4, 32, True), QuantOption.int_(8, None), QuantOption.keep()]
    return json.loads(bitalloc.plan(make_llama(), "4.5bits", ids, options=options, cache_dir=False).to_json())


def plan_problems(plan: Plan) -> list[str]:
    """The oracle: what is inconsistent in an accepted plan (written apart from bitalloc.plan's checks)."""
    problems, seen = [], set()
    if not plan.assignments:
        return ["no assignments"]
    bits = weights = nominal = 0
    loss = 0.0
    for a in plan.assignments:
        o = QuantOption(**a.option.to_dict())
        out_f, in_f = a.shape
        if a.label != o.label:
            problems.append(f"{a.module}: label {a.label} for {o.label}")
        if not o.fits(in_f) or a.storage_bits != o.storage_bits(out_f, in_f):
            problems.append(f"{a.module}: storage_bits {a.storage_bits}")
        if a.rows is not None and not (0 <= a.rows[0] < a.rows[1] and a.rows[1] - a.rows[0] == out_f):
            problems.append(f"{a.module}: rows {a.rows} for {out_f} rows")
        if (a.module, a.rows) in seen or (a.rows is None and any(m == a.module for m, _ in seen)):
            problems.append(f"{a.module} twice")
        seen.add((a.module, a.rows))
        bits += a.storage_bits
        weights += out_f * in_f
        nominal += o.bits * out_f * in_f
        loss += a.predicted_delta_loss
    s = plan.summary
    if (s.planned_modules, s.planned_weights, s.storage_bytes, s.fp16_bytes) != (
            len(plan.assignments), weights, -(-bits // 8), 2 * weights):
        problems.append("summary counts")
    for got, want in [(s.storage_bits_per_weight, bits / max(weights, 1)), (s.nominal_bits_per_weight, nominal / max(weights, 1)),
                      (s.predicted_delta_loss, loss)]:
        if not math.isclose(got, want, rel_tol=1e-5, abs_tol=1e-12):
            problems.append(f"summary value {got} != {want}")
    return problems


def plan_outcome(doc: dict, text: str) -> str:
    """'refused', 'accepted' (consistent) or 'inconsistent' (accepted although the oracle objects)."""
    try:
        plan = Plan.from_json(text, origin="mutated.json")
    except BitallocError:
        return "refused"
    return "inconsistent" if plan_problems(plan) else "accepted"


@quick
@given(st.randoms(use_true_random=False))
def test_mutated_plan_json_loads_consistently_or_is_refused(plan_doc, rng):
    assert plan_problems(Plan.from_json(_dumps(plan_doc))) == []  # the oracle passes the real plan
    doc = mutate(plan_doc, rng)
    assert plan_outcome(doc, _dumps(doc)) != "inconsistent", _dumps(doc)


# ---- profiles --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def profile_dir(tmp_path_factory):
    """(saved profile folder, a work folder holding its tensors.npz for mutated profile.json files)."""
    from bitalloc.api import profile_model

    ids = torch.randint(0, VOCAB, CALIB_SHAPE, generator=torch.Generator().manual_seed(4))
    out = tmp_path_factory.mktemp("prof") / "p"
    profile_model(make_llama(), ids, out, signals=("fisher", "spikes", "table"),
                  options=[QuantOption.int_(3, 32), QuantOption.int_(4, 32, True), QuantOption.keep()])
    work = tmp_path_factory.mktemp("mutated")
    shutil.copy(out / "tensors.npz", work / "tensors.npz")
    original = canonical_json(json.loads((out / "profile.json").read_text(encoding="utf-8")))
    assert profile_outcome(work, original, original) == "same"  # the untouched folder loads
    return out, work


def profile_outcome(folder, original: str, text: str) -> str:
    """'refused', 'same' (accepted, content unchanged) or 'edited' (accepted although profile.json changed)."""
    from bitalloc.profile.artifact import Profile

    (folder / "profile.json").write_text(text, encoding="utf-8")
    try:
        Profile.load(folder)
    except BitallocError:
        return "refused"
    return "same" if canonical_json(json.loads(text)) == original else "edited"


@settings(quick, max_examples=100)
@given(rng=st.randoms(use_true_random=False))
def test_mutated_profile_json_is_refused_unless_unchanged(profile_dir, rng):
    saved, work = profile_dir
    original_doc = json.loads((saved / "profile.json").read_text(encoding="utf-8"))
    doc = mutate(original_doc, rng)
    assert profile_outcome(work, canonical_json(original_doc), _dumps(doc)) in ("refused", "same"), _dumps(doc)[:2000]
