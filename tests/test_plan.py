"""The plan file: JSON Schema, canonical bytes, versioning, validation and atomic writes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import jsonschema
import pytest

import bitalloc
from bitalloc.errors import BadInputError, PlanVersionError
from bitalloc.plan import SCHEMA_PATH, Plan, plan_json_schema

from conftest import make_llama

REPO_SCHEMA = Path(__file__).resolve().parents[1] / "bitalloc" / "schema" / "plan-v1.json"


@pytest.fixture(scope="module")
def tiny_plan() -> Plan:
    import torch

    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(5))
    return bitalloc.plan(make_llama(), "4bits", ids, cache_dir=False)


def validator(schema: dict):
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def test_checked_in_schema_equals_generated_schema():
    # Fails (never skips) while the file is missing: the schema is part of the published contract.
    assert SCHEMA_PATH == REPO_SCHEMA
    assert REPO_SCHEMA.is_file(), f"{REPO_SCHEMA} is missing; write json.dumps(plan_json_schema()) there"
    assert json.loads(REPO_SCHEMA.read_text(encoding="utf-8")) == plan_json_schema()


@pytest.mark.parametrize("source", ["checked-in file", "generated"])
def test_plan_validates_against_schema(tiny_plan, source):
    doc = json.loads(tiny_plan.to_json())
    schema = json.loads(REPO_SCHEMA.read_text(encoding="utf-8")) if source == "checked-in file" else plan_json_schema()
    v = validator(schema)
    assert list(v.iter_errors(doc)) == []
    # and the schema is not vacuous: it rejects what Plan rejects
    for mutate in (
        lambda d: d.__setitem__("schema_version", 2),
        lambda d: d.__setitem__("unexpected", 1),
        lambda d: d["summary"].__setitem__("planned_modules", "many"),
        lambda d: d["summary"].__setitem__("planned_modules", "14"),
        lambda d: d["assignments"][0]["option"].__setitem__("fmt", "fp7"),
        lambda d: d.pop("budget"),
        lambda d: d["assignments"][0].__setitem__("shape", [64]),
    ):
        bad = json.loads(tiny_plan.to_json())
        mutate(bad)
        assert list(v.iter_errors(bad)), "schema accepted an invalid plan"


def test_plan_contents_are_consistent(tiny_plan):
    s = tiny_plan.summary
    assert tiny_plan.format == "bitalloc.plan" and tiny_plan.schema_version == 1
    assert s.planned_modules == len(tiny_plan.assignments) == 14
    assert s.planned_weights == sum(a.shape[0] * a.shape[1] for a in tiny_plan.assignments)
    assert s.fp16_bytes == 2 * s.planned_weights
    assert s.storage_bytes == -(-sum(a.storage_bits for a in tiny_plan.assignments) // 8)
    for a in tiny_plan.assignments:
        opt = a.option
        assert a.label == opt.label
        assert a.storage_bits == opt.storage_bits(*a.shape)
        assert a.label in tiny_plan.options
    assert tiny_plan.budget.max_storage_bits == 4.0 * s.planned_weights


def test_save_load_round_trip(tiny_plan, tmp_path):
    p = tmp_path / "plan.json"
    tiny_plan.save(p)
    first = p.read_bytes()
    assert first == tiny_plan.to_json().encode("utf-8")
    loaded = Plan.load(p)
    assert loaded == tiny_plan
    loaded.save(tmp_path / "again.json")
    assert (tmp_path / "again.json").read_bytes() == first
    assert first.endswith(b"\n") and json.loads(first)["format"] == "bitalloc.plan"


def _doc(plan: Plan) -> dict:
    return json.loads(plan.to_json())


def _write(tmp_path, doc, name="p.json") -> Path:
    p = tmp_path / name
    p.write_text(json.dumps(doc) if not isinstance(doc, str) else doc, encoding="utf-8")
    return p


def test_newer_schema_version_asks_to_upgrade(tiny_plan, tmp_path):
    doc = _doc(tiny_plan)
    doc["schema_version"] = 2
    with pytest.raises(PlanVersionError, match="upgrade") as info:
        Plan.load(_write(tmp_path, doc))
    assert "2" in str(info.value)
    assert isinstance(info.value, BadInputError)


@pytest.mark.parametrize("version", [0, "1", None])
def test_unknown_schema_version(tiny_plan, tmp_path, version):
    doc = _doc(tiny_plan)
    doc["schema_version"] = version
    with pytest.raises(PlanVersionError, match="re-create"):
        Plan.load(_write(tmp_path, doc))


def test_invalid_json_is_bad_input(tmp_path):
    with pytest.raises(BadInputError, match="not valid JSON"):
        Plan.load(_write(tmp_path, '{"format": "bitalloc.plan", '))


@pytest.mark.parametrize("doc", [[1, 2], {"hello": "world"}, {"format": "other.plan", "schema_version": 1}, "3"])
def test_non_plan_json_is_bad_input(tmp_path, doc):
    with pytest.raises(BadInputError, match="not a bitalloc plan"):
        Plan.load(_write(tmp_path, json.dumps(doc)))


def test_missing_plan_file(tmp_path):
    with pytest.raises(BadInputError, match="does not exist"):
        Plan.load(tmp_path / "nope.json")


def _set(doc: dict, where: tuple, value) -> dict:
    """doc with the field at path `where` replaced by `value`."""
    target = doc
    for key in where[:-1]:
        target = target[key]
    target[where[-1]] = value
    return doc


@pytest.mark.parametrize(
    "where, value",
    [
        (("summary", "planned_modules"), "many"),
        (("seed",), "zero"),
        (("assignments",), {"a": 1}),
        (("assignments", 0, "option", "bits"), 99),
        (("assignments", 0, "shape"), [64]),
        (("model",), "llama"),
        (("budget", "kind"), "lightyears"),
    ],
)
def test_wrong_field_type_is_bad_input(tiny_plan, tmp_path, where, value):
    doc = _set(_doc(tiny_plan), where, value)
    with pytest.raises(BadInputError, match="not a valid plan") as info:
        Plan.load(_write(tmp_path, doc))
    assert str(where[0]) in str(info.value)  # names the offending field


def test_extra_and_missing_fields_are_bad_input(tiny_plan, tmp_path):
    doc = _doc(tiny_plan)
    doc["assignments"][0]["colour"] = "red"
    with pytest.raises(BadInputError, match="colour"):
        Plan.load(_write(tmp_path, doc))
    doc = _doc(tiny_plan)
    del doc["summary"]
    with pytest.raises(BadInputError, match="summary"):
        Plan.load(_write(tmp_path, doc))


@pytest.mark.parametrize(
    "where, value",
    [(("summary", "planned_modules"), "14"), (("assignments", 0, "storage_bits"), True),
     (("assignments", 0, "option", "symmetric"), "yes")],
)
def test_loader_is_as_strict_as_schema(tiny_plan, tmp_path, where, value):
    doc = _set(_doc(tiny_plan), where, value)
    assert list(validator(plan_json_schema()).iter_errors(doc))  # the schema says: invalid
    with pytest.raises(BadInputError):
        Plan.load(_write(tmp_path, doc))


def test_save_is_atomic(tiny_plan, tmp_path, monkeypatch):
    p = tmp_path / "plan.json"
    p.write_text("OLD CONTENT\n", encoding="utf-8")

    def boom(src, dst):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="simulated"):
        tiny_plan.save(p)
    assert p.read_text(encoding="utf-8") == "OLD CONTENT\n"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["plan.json"]  # no temp file left behind

    monkeypatch.undo()
    tiny_plan.save(p)
    assert Plan.load(p) == tiny_plan
    assert sorted(x.name for x in tmp_path.iterdir()) == ["plan.json"]


def test_save_creates_parent_directories(tiny_plan, tmp_path):
    p = tmp_path / "a" / "b" / "plan.json"
    tiny_plan.save(p)
    assert Plan.load(p) == tiny_plan


def test_schema_command_prints_the_published_schema(tmp_path):
    from typer.testing import CliRunner

    from bitalloc.cli import app
    from bitalloc.plan import SCHEMA_PATH

    printed = CliRunner().invoke(app, ["schema"])
    assert printed.exit_code == 0
    assert printed.stdout == SCHEMA_PATH.read_text(encoding="utf-8")
    written = CliRunner().invoke(app, ["schema", "--out", str(tmp_path / "s.json")])
    assert written.exit_code == 0
    assert json.loads((tmp_path / "s.json").read_text()) == json.loads(SCHEMA_PATH.read_text())


def test_saved_plan_has_ordinary_file_permissions(tmp_path):
    import os
    import stat

    from bitalloc.io import atomic_write_text

    path = atomic_write_text(tmp_path / "p.json", "{}\n")
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask  # readable by a serving team, like open() makes it


# ---- plans with FP, MX and NVFP4 options ---------------------------------------------------------

from bitalloc.options import parse_option  # noqa: E402

MIXED_LABELS = ["fp8e4m3-ch", "fp8e4m3-tensor", "mxfp4", "mxfp6e2m3", "nvfp4", "int4-g32-asym", "fp16"]


@pytest.fixture(scope="module")
def fp_plan() -> Plan:
    import torch

    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(5))
    return bitalloc.plan(make_llama(), "6bits", ids, options=[parse_option(x) for x in MIXED_LABELS], cache_dir=False)


def test_fp_plan_json_round_trip_and_schema(fp_plan, tmp_path):
    assert {a.option.fmt for a in fp_plan.assignments} >= {"fp"}
    again = Plan.from_json(fp_plan.to_json())
    assert again == fp_plan
    assert again.options_by_module() == fp_plan.options_by_module()
    for a in again.assignments:
        opt = a.option
        assert parse_option(a.label) == opt and a.storage_bits == opt.storage_bits(*a.shape)
    doc = json.loads(fp_plan.to_json())
    fp_option = next(a["option"] for a in doc["assignments"] if a["option"]["fmt"] == "fp")
    assert {"element", "scale_fmt", "tensor_scale_bits"} <= set(fp_option)
    for schema in (json.loads(REPO_SCHEMA.read_text(encoding="utf-8")), plan_json_schema()):
        assert list(validator(schema).iter_errors(doc)) == []
    fp_plan.save(tmp_path / "p.json")
    assert Plan.load(tmp_path / "p.json") == fp_plan


def test_v1_plan_without_fp_fields_still_loads(tiny_plan, tmp_path):
    """Plans written before FP formats existed have no element / scale_fmt / tensor_scale_bits, and
    INT/keep options are still written that way (earlier bitalloc versions read them)."""
    doc = _doc(tiny_plan)
    for a in doc["assignments"]:
        assert sorted(a["option"]) == ["bits", "fmt", "group_size", "scale_bits", "symmetric", "zero_bits"]
    assert list(validator(json.loads(REPO_SCHEMA.read_text(encoding="utf-8"))).iter_errors(doc)) == []
    loaded = Plan.load(_write(tmp_path, doc))
    assert loaded == tiny_plan
    assert all(o.fmt in ("int", "keep") for o in loaded.options_by_module().values())


@pytest.mark.parametrize("change, needle", [
    (dict(element="e4m3", bits=4), "8 bits wide"),
    (dict(element="e7m0"), "element"),
    (dict(scale_fmt="e8m0", scale_bits=8, group_size=64), "blocks of 32"),
    (dict(group_size=-1), "group_size"),
])
def test_inconsistent_fp_option_in_plan_is_bad_input(fp_plan, tmp_path, change, needle):
    doc = _doc(fp_plan)
    k = next(i for i, a in enumerate(doc["assignments"]) if a["option"]["fmt"] == "fp")
    doc["assignments"][k]["option"].update(change)
    with pytest.raises(BadInputError, match="not a valid plan") as info:
        Plan.load(_write(tmp_path, doc))
    assert needle in str(info.value) and "assignments" in str(info.value)


# ---- internal consistency: derived fields are recomputed on load --------------------------------

def _append_copy_of_first(d: dict) -> None:
    d["assignments"].append(dict(d["assignments"][0]))


@pytest.mark.parametrize("edit, needle", [
    (lambda d: d["assignments"][0]["option"].update(bits=8), r"assignments\[0\] \(\S+\): label 'int\d\S+' is not its option's label 'int8"),
    (lambda d: d["assignments"][1].update(label="int8-ch-asym"), r"assignments\[1\] \(\S+\): label 'int8-ch-asym' is not"),
    (lambda d: d["assignments"][2].update(storage_bits=d["assignments"][2]["storage_bits"] + 1), r"assignments\[2\] \(\S+\): storage_bits \d+ is not \d+"),
    (lambda d: d["assignments"][3].update(shape=[d["assignments"][3]["shape"][0] // 2, d["assignments"][3]["shape"][1]]), r"assignments\[3\] \(\S+\): storage_bits"),
    (_append_copy_of_first, r"assignments\[14\] \((\S+)\): module \1 is assigned twice"),
    (lambda d: d.update(assignments=[]), "assignments is empty"),
    (lambda d: d["summary"].update(storage_bytes=d["summary"]["storage_bytes"] + 1), r"summary.storage_bytes is \d+, its assignments give"),
    (lambda d: d["summary"].update(nominal_bits_per_weight=2.0), "summary.nominal_bits_per_weight is 2.0"),
    (lambda d: d["summary"].update(predicted_delta_loss=d["summary"]["predicted_delta_loss"] * 2), "summary.predicted_delta_loss"),
    (lambda d: d["summary"].update(planned_modules=13), "summary.planned_modules is 13, its assignments give 14"),
])
def test_inconsistent_plan_is_refused_naming_field_and_module(tiny_plan, tmp_path, edit, needle):
    doc = _doc(tiny_plan)
    edit(doc)
    assert list(validator(plan_json_schema()).iter_errors(doc)) == []  # the schema alone cannot see it
    with pytest.raises(BadInputError, match="not a consistent plan") as info:
        Plan.load(_write(tmp_path, doc))
    import re

    assert re.search(needle, str(info.value)), str(info.value)
    assert "re-create it with `bitalloc.plan()`" in str(info.value)


def test_row_groups_that_tile_a_module_are_consistent_and_overlapping_ones_are_not(tiny_plan):
    from bitalloc.plan import plan_inconsistency, summarize

    a = next(x for x in tiny_plan.assignments if x.shape[0] % 2 == 0)
    half = a.shape[0] // 2
    o = a.option

    def split(rows):
        parts = [a.model_copy(update={"rows": r, "shape": (r[1] - r[0], a.shape[1]),
                                      "storage_bits": o.storage_bits(r[1] - r[0], a.shape[1])}) for r in rows]
        rest = [x for x in tiny_plan.assignments if x.module != a.module] + parts
        return tiny_plan.model_copy(update={"assignments": rest, "summary": summarize(rest)})

    assert plan_inconsistency(split([(0, half), (half, a.shape[0])])) is None
    assert "is assigned twice" in plan_inconsistency(split([(0, half + 1), (half - 1, a.shape[0] - 2)]))
    assert "do not span" in plan_inconsistency(split([(0, half), (half, a.shape[0])]).model_copy(update={
        "assignments": [x.model_copy(update={"rows": (5, 4)}) if x.rows == (0, half) else x
                        for x in split([(0, half), (half, a.shape[0])]).assignments]}))
