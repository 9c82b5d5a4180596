"""Every entry point that profiles keeps every ProfileConfig setting (issue 12: the quantizer was lost
on four paths).

For each setting (quantizer gptq, a calibration other than the test default, the output head
planned, a narrower option grid) and each entry point (API plan, plan from a profile folder, Pareto
sweep, CLI, service worker, qat.replan), the plan's predicted errors must be those of a candidate
table built directly with that setting, and differ from the table without it; the plan must record
the setting. A combination an entry point cannot honour must be refused with a BadInputError.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import bitalloc
from bitalloc import api, cli, qat
from bitalloc.budget import parse_budget
from bitalloc.calibration import calibration_from_tokens, make_calibration, read_text
from bitalloc.candidates import build_candidate_table
from bitalloc.config import DEFAULT_UNFOLDED_QUANTIZER
from bitalloc.equalize import equalize
from bitalloc.errors import BadInputError
from bitalloc.models import load_model, select_modules
from bitalloc.options import default_options
from bitalloc.profile.statistics import collect_statistics
from bitalloc.quantizers import equalizes

BUDGET = "4.5bits"
BASE = dict(seq_len=32, calib_tokens=128, include_lm_head=False, quantizer="rtn", bits=(2, 3, 4, 8), group_sizes=(32, None))


@dataclass(frozen=True)
class Setting:
    name: str
    changes: dict = field(default_factory=dict)

    @property
    def kw(self) -> dict:
        return {**BASE, **self.changes}

    def api_kwargs(self) -> dict:
        k = self.kw
        return dict(seq_len=k["seq_len"], calib_tokens=k["calib_tokens"], include_lm_head=k["include_lm_head"],
                    quantizer=k["quantizer"], options=self.options())

    def options(self) -> list:
        return default_options(bits=self.kw["bits"], group_sizes=self.kw["group_sizes"])

    def cli_flags(self) -> list[str]:
        k = self.kw
        flags = ["--seq-len", k["seq_len"], "--calib-tokens", k["calib_tokens"], "--quantizer", k["quantizer"],
                 "--bits", ",".join(map(str, k["bits"])),
                 "--group-sizes", ",".join("ch" if g is None else str(g) for g in k["group_sizes"])]
        return [str(f) for f in flags] + (["--include-lm-head"] if k["include_lm_head"] else [])


SETTINGS = [
    Setting("quantizer", {"quantizer": "gptq"}),
    Setting("equalizing quantizer", {"quantizer": "awq"}),
    Setting("calibration", {"seq_len": 16, "calib_tokens": 96}),
    Setting("include_lm_head", {"include_lm_head": True}),
    Setting("options", {"bits": (3, 5), "group_sizes": (64,)}),
]
ENTRY_POINTS = ["api_plan", "profile_folder", "pareto", "cli", "service", "qat_replan"]
# Combinations an entry point refuses, with what the error must say. The tiny Llama ties its head to
# the embedding, and QAT wraps untied linear layers only.
REFUSED = {("include_lm_head", "qat_replan"): "QAT wraps untied linear layers; lm_head"}


@pytest.fixture(scope="module")
def loaded(model_dir):
    return load_model(str(model_dir))


def direct_table(loaded, calib_path: Path, kw: dict, options: list):
    """The candidate table of these settings, built step by step (no entry point involved)."""
    calib = make_calibration(loaded.tokenizer, read_text(calib_path), seq_len=kw["seq_len"], tokens=kw["calib_tokens"],
                             seed=0)
    names = select_modules(loaded.model, kw["include_lm_head"], False)
    model = loaded.model
    if equalizes(kw["quantizer"]):  # awq's table is measured on the model with equalization folded in
        model = copy.deepcopy(model)
        equalize(model, calib.tokens)
    stats = collect_statistics(model, names, calib)
    return build_candidate_table(model, names, stats, options, quantizer=kw["quantizer"]), calib


def sig(x: float) -> float:
    return float(f"{float(x):.6g}")


def plan_errors(plan, table) -> tuple[list[float], list[float]]:
    """(the plan's predicted error per module, the same (module, option) cell of `table`); None if absent."""
    got, want = [], []
    for a in plan.assignments:
        if a.module not in table.groups or a.label not in [o.label for o in table.options]:
            return [a.predicted_delta_loss], [None]
        g, k = table.groups.index(a.module), [o.label for o in table.options].index(a.label)
        got.append(a.predicted_delta_loss)
        want.append(sig(table.errors[plan.error_model][g, k]))
    return got, want


def run_entry_point(entry: str, setting: Setting, model_dir: Path, loaded, tmp_path: Path, calib_ids):
    calib = model_dir / "calib.txt"
    kw = setting.api_kwargs()
    if entry == "api_plan":
        return bitalloc.plan(str(model_dir), BUDGET, calib, cache_dir=None, **kw)
    if entry == "profile_folder":
        api.profile_model(str(model_dir), calib, tmp_path / "prof", signals=("fisher", "table"), **kw)
        return bitalloc.plan_from_profile(tmp_path / "prof", BUDGET)
    if entry == "pareto":
        return bitalloc.pareto(str(model_dir), [parse_budget("4bits"), parse_budget(BUDGET)], calib, cache_dir=None,
                               **kw).plans[1]
    if entry == "cli":
        out = tmp_path / "plan.json"
        result = CliRunner().invoke(cli.app, ["plan", str(model_dir), "--budget", BUDGET, "--calib", str(calib),
                                              "--no-cache", "--out", str(out), *setting.cli_flags()])
        if result.exception is not None:
            raise result.exception
        return bitalloc.Plan.load(out)
    if entry == "service":
        from bitalloc.service import work
        from bitalloc.service.app import _profile_spec
        from bitalloc.service.schemas import CalibrationIn, OptionsIn
        from bitalloc.service.sources import SourceRules
        from bitalloc.service.store import SQLiteStore

        k = setting.kw
        store = SQLiteStore(tmp_path / "store")
        spec = _profile_spec(str(model_dir), CalibrationIn(path=str(calib), seq_len=k["seq_len"], tokens=k["calib_tokens"]),
                             OptionsIn(bits=list(k["bits"]), group_sizes=["ch" if g is None else g for g in k["group_sizes"]]),
                             k["include_lm_head"], False, SourceRules(), k["quantizer"])
        record, _, _ = work.build_profile(store, spec, None, lambda *_: None)
        # families: narrow_table rebuilds the table (it used to drop the quantizer there)
        return bitalloc.Plan.from_json(work.plan_from_stored(store, record.id, work.PlanSpec(
            budget=BUDGET, families=("int", "keep"))).plan_json)
    if entry == "qat_replan":
        first = bitalloc.plan(loaded, BUDGET, calib, cache_dir=None, **kw)
        model = qat.prepare(loaded.model, first)
        try:
            c = make_calibration(loaded.tokenizer, read_text(calib), seq_len=setting.kw["seq_len"],
                                 tokens=setting.kw["calib_tokens"], seed=0)
            if equalizes(setting.kw["quantizer"]):  # named outright, it is refused; by default, rtn-w replaces it
                with pytest.raises(BadInputError, match="model being trained.*awq quantizer would fold scales"):
                    qat.replan(model, calibration_from_tokens(c.tokens), "4bits", quantizer=setting.kw["quantizer"])
            return qat.replan(model, calibration_from_tokens(c.tokens), "4bits").plan
        finally:
            for name, wrapper in qat.fake_quant_modules(model).items():  # leave the shared model unwrapped
                qat._set_submodule(model, name, wrapper.plain())
    raise AssertionError(entry)


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: s.name)
def test_entry_point_keeps_setting(entry, setting, model_dir, loaded, tmp_path, calib_ids):
    k = setting.kw
    if entry == "qat_replan" and equalizes(k["quantizer"]):
        # qat.replan keeps the plan's quantizer, except one that would fold scales into the model being trained
        k = {**k, "quantizer": DEFAULT_UNFOLDED_QUANTIZER}
    want_table, _ = direct_table(loaded, model_dir / "calib.txt", k, setting.options())
    plain_table, _ = direct_table(loaded, model_dir / "calib.txt", BASE, Setting("base").options())
    if (setting.name, entry) in REFUSED:
        with pytest.raises(BadInputError, match=REFUSED[setting.name, entry]):
            run_entry_point(entry, setting, model_dir, loaded, tmp_path, calib_ids)
        return
    plan = run_entry_point(entry, setting, model_dir, loaded, tmp_path, calib_ids)

    got, want = plan_errors(plan, want_table)
    assert got == want, f"{entry}: the plan's errors are not those of the {setting.name} table"
    assert plan_errors(plan, plain_table)[1] != want, f"{entry}: the {setting.name} setting changes nothing here"
    assert plan.quantizer == k["quantizer"]
    assert [a.module for a in plan.assignments] == want_table.groups
    assert plan.options == [o.label for o in want_table.options]
    if entry != "qat_replan":  # qat.replan is given token ids, which it records as such
        assert (plan.calibration["seq_len"], plan.calibration["tokens"]) == (k["seq_len"], k["seq_len"] * (k["calib_tokens"] // k["seq_len"]))


def test_profile_folder_refuses_another_quantizer(model_dir, tmp_path):
    """`bitalloc plan --profile DIR --quantizer gptq` on an rtn-w profile used to write an rtn-w plan silently
    (the default quantizer on supplied calibration text is awq-gptq now; the check is the same)."""
    api.profile_model(str(model_dir), model_dir / "calib.txt", tmp_path / "prof", signals=("fisher", "table"),
                      seq_len=32, calib_tokens=128)
    with pytest.raises(BadInputError, match=r"holds awq-gptq errors, not gptq.*with quantizer gptq"):
        bitalloc.plan_from_profile(tmp_path / "prof", BUDGET, quantizer="gptq")
    result = CliRunner().invoke(cli.app, ["plan", "--profile", str(tmp_path / "prof"), "--budget", BUDGET,
                                          "--quantizer", "gptq", "--out", str(tmp_path / "p.json")])
    assert isinstance(result.exception, BadInputError) and "holds awq-gptq errors, not gptq" in str(result.exception)
    assert not (tmp_path / "p.json").exists()
    # naming the profile's own quantizer is fine, and so is naming none
    assert bitalloc.plan_from_profile(tmp_path / "prof", BUDGET, quantizer="awq-gptq").quantizer == "awq-gptq"


def test_steps_without_hessians_refuse_gptq(loaded, model_dir, calib_ids):
    """The evolutionary solver's true-loss trials and the interactions signal quantize weights in place,
    without layer inputs: with gptq they refuse instead of silently scoring round-to-nearest weights."""
    from bitalloc.objective import CalibrationScore

    table, calib = direct_table(loaded, model_dir / "calib.txt", {**BASE, "quantizer": "gptq"}, Setting("b").options())
    with pytest.raises(BadInputError, match="evolutionary.*gptq"):
        CalibrationScore(loaded.model, table, calib.tokens[:1])
    with pytest.raises(BadInputError, match="interactions signal.*gptq"):
        api.profile_model(loaded, calib_ids, "unused", signals=("interactions",), quantizer="gptq")
    # rtn-mse needs no Hessian: the trials use its weights, not round-to-nearest ones
    mse = CalibrationScore(loaded.model, _with_quantizer(table, "rtn-mse"), calib.tokens[:1])
    rtn = CalibrationScore(loaded.model, _with_quantizer(table, "rtn"), calib.tokens[:1])
    k = next(i for i, o in enumerate(table.options) if o.label == "int3-g32-asym")
    assert not np.allclose(mse._quantized(0, k).numpy(), rtn._quantized(0, k).numpy())


def _with_quantizer(table, name):
    from dataclasses import replace

    return replace(table, quantizer=name)
