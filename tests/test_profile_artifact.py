"""The Profile artifact: round trip, keyed reuse, damaged files, resume after an interruption; CLI profile + report."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bitalloc.profile import pipeline
from bitalloc.api import profile_model
from bitalloc.errors import BadInputError
from bitalloc.options import QuantOption
from bitalloc.profile.artifact import Profile

from conftest import make_llama
from test_cli import run_cli_here as run_cli

OPTIONS = [QuantOption.int_(3, 32, False), QuantOption.int_(4, 32, True), QuantOption.keep()]
FAST = dict(trace_max_probes=4, trace_min_probes=2, trace_windows=2, options=OPTIONS)


def make(signals=("fisher", "trace", "salience", "spikes", "table"), **kw):
    return dict(signals=signals, **{**FAST, **kw})


def test_profile_round_trip_and_reuse(tmp_path, calib_ids, monkeypatch):
    model = make_llama()
    out = tmp_path / "prof"
    prof = profile_model(model, calib_ids, out, **make())
    assert (out / "profile.json").is_file() and (out / "tensors.npz").is_file() and not (out / "parts").exists()
    assert len(prof.modules) == 14 and prof.table is not None and prof.table.groups == [m.name for m in prof.modules]
    m = prof.module("model.layers.1.mlp.down_proj")
    assert m.shape == (64, 128) and m.fisher.shape == (64,) and m.h_diag.shape == (128,)
    assert m.trace.probes >= 2 and m.salience.column["hessian"].shape == (128,) and m.spikes.input.channel_max.shape == (128,)
    doc = json.loads((out / "profile.json").read_text())
    assert doc["version"] == 3 and doc["key"] == prof.key and doc["format"] == "bitalloc-profile"

    loaded = Profile.load(out)
    assert loaded.key == prof.key and loaded.settings == prof.settings
    for a, b in zip(prof.modules, loaded.modules):
        assert a.name == b.name and a.shape == b.shape and a.block == b.block
        np.testing.assert_array_equal(a.fisher, b.fisher)
        assert a.trace.total == b.trace.total and a.trace.probes == b.trace.probes
        np.testing.assert_array_equal(a.salience.groups["activation"], b.salience.groups["activation"])
        np.testing.assert_array_equal(a.spikes.output.top_tokens, b.spikes.output.top_tokens)
        assert a.spikes.input.flagged == b.spikes.input.flagged and a.spikes.input.kurtosis == b.spikes.input.kurtosis
    np.testing.assert_array_equal(prof.table.errors["fisher"], loaded.table.errors["fisher"])

    # same inputs: read back, nothing recomputed
    monkeypatch.setattr(pipeline, "collect_statistics", lambda *a, **k: pytest.fail("recomputed a cached profile"))
    monkeypatch.setattr(pipeline, "hutchinson_traces", lambda *a, **k: pytest.fail("recomputed a cached profile"))
    again = profile_model(model, calib_ids, out, **make())
    assert again.key == prof.key


def test_profile_key_covers_settings_and_weights(tmp_path, calib_ids):
    model = make_llama()
    out = tmp_path / "prof"
    a = profile_model(model, calib_ids, out, **make(signals=("spikes",)))
    with pytest.warns(UserWarning, match="not reusing"):  # another profile is in the folder: replaced
        b = profile_model(model, calib_ids, out, **make(signals=("spikes",), spike_threshold=3.0))
    assert a.key != b.key and Profile.load(out).key == b.key
    model.model.layers[0].mlp.up_proj.weight.data *= 2
    with pytest.warns(UserWarning, match="not reusing"):
        c = profile_model(model, calib_ids, out, **make(signals=("spikes",), spike_threshold=3.0))
    assert c.key != b.key


def test_damaged_profile_is_recomputed_never_used(tmp_path, calib_ids):
    model = make_llama()
    out = tmp_path / "prof"
    first = profile_model(model, calib_ids, out, **make(signals=("fisher",)))
    data = bytearray((out / "tensors.npz").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (out / "tensors.npz").write_bytes(bytes(data))
    with pytest.raises(BadInputError, match="recompute"):
        Profile.load(out)
    with pytest.warns(UserWarning, match="not reusing"):
        again = profile_model(model, calib_ids, out, **make(signals=("fisher",)))
    np.testing.assert_array_equal(again.modules[0].fisher, first.modules[0].fisher)
    Profile.load(out)  # repaired


@pytest.mark.parametrize("version", [1, 2])
def test_older_profile_versions_are_refused(tmp_path, calib_ids, version):
    """Versions 1 and 2 checksummed the arrays only: their profile.json cannot be verified, so they are refused."""
    from bitalloc.profile.artifact import npz_bytes, unpack_arrays, arrays_checksum

    out = tmp_path / "prof"
    profile_model(make_llama(), calib_ids, out, **make(signals=("fisher", "table")))
    doc = json.loads((out / "profile.json").read_text())
    with np.load(out / "tensors.npz") as z:
        assert z.files == ["packed"]
        arrays = unpack_arrays(z["packed"], doc["arrays"])
    old = tmp_path / f"v{version}"
    old.mkdir()
    if version == 1:  # one .npz member per array
        (old / "tensors.npz").write_bytes(npz_bytes(arrays))
        del doc["arrays"]
    else:
        (old / "tensors.npz").write_bytes((out / "tensors.npz").read_bytes())
    doc.update(version=version, checksum=arrays_checksum(arrays))  # what those versions wrote: a valid arrays checksum
    (old / "profile.json").write_text(json.dumps(doc))
    with pytest.raises(BadInputError, match=f"version {version}, whose checksum does not cover profile.json.*"
                                            "re-run `bitalloc\\.profile\\(\\)`"):
        Profile.load(old)


EDITS = {  # one edit to profile.json each, as issue 15 found them accepted
    "option bits": lambda d: d["profile"]["table"]["options"][0].update(bits=8),
    "shape": lambda d: d["profile"]["modules"][0].update(shape=[64, 32]),
    "module name": lambda d: d["profile"]["modules"][0].update(name="model.layers.0.self_attn.x_proj"),
    "seed": lambda d: d["profile"]["settings"].update(seed=d["profile"]["settings"].get("seed", 0) + 1),
    "key": lambda d: d.update(key="0" * 64),
    "table group": lambda d: d["profile"]["table"]["groups"].reverse(),
    "array index": lambda d: d["arrays"]["table/storage_bits"].__setitem__(1, [1]),
}


@pytest.mark.parametrize("edit", sorted(EDITS))
def test_any_edit_to_profile_json_is_refused(tmp_path, calib_ids, edit):
    from bitalloc.replan import load_profile

    out = tmp_path / "prof"
    profile_model(make_llama(), calib_ids, out, **make(signals=("fisher", "table")))
    doc = json.loads((out / "profile.json").read_text())
    EDITS[edit](doc)
    (out / "profile.json").write_text(json.dumps(doc))
    with pytest.raises(BadInputError, match="checksum.*re-run `bitalloc\\.profile\\(\\)`"):
        load_profile(out)


def test_an_edit_with_a_recomputed_checksum_is_caught_by_the_consistency_checks(tmp_path, calib_ids):
    """The checksum finds damage and careless edits; the storage bits recomputed from option and shape find the rest."""
    from bitalloc.profile.artifact import profile_checksum, unpack_arrays

    out = tmp_path / "prof"
    profile_model(make_llama(), calib_ids, out, **make(signals=("fisher", "table")))
    doc = json.loads((out / "profile.json").read_text())
    doc["profile"]["table"]["options"][0].update(bits=8)  # int3 -> int8, storage bits still those of int3
    with np.load(out / "tensors.npz") as z:
        doc["checksum"] = profile_checksum(doc, unpack_arrays(z["packed"], doc["arrays"]))
    (out / "profile.json").write_text(json.dumps(doc))
    with pytest.raises(BadInputError, match="inconsistent: candidate table: model.layers.0.self_attn.q_proj: storage bits "
                                            "of int8-g32-asym .*re-run `bitalloc\\.profile\\(\\)`"):
        Profile.load(out)


def test_newer_profile_version_is_refused(tmp_path, calib_ids):
    out = tmp_path / "prof"
    profile_model(make_llama(), calib_ids, out, **make(signals=("fisher",)))
    doc = json.loads((out / "profile.json").read_text())
    doc["version"] = 99
    (out / "profile.json").write_text(json.dumps(doc))
    with pytest.raises(BadInputError, match="upgrade"):
        Profile.load(out)


def test_interrupted_profile_resumes_from_finished_blocks(tmp_path, calib_ids, monkeypatch):
    out = tmp_path / "prof"
    full = profile_model(make_llama(), calib_ids, tmp_path / "reference", **make())

    real_block = pipeline._block_signals
    calls = []

    def interrupt_second_block(model, names, *a, **k):
        calls.append(names[0])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_block(model, names, *a, **k)

    monkeypatch.setattr(pipeline, "_block_signals", interrupt_second_block)
    with pytest.raises(KeyboardInterrupt):
        profile_model(make_llama(), calib_ids, out, **make())
    assert (out / "parts" / "block-000.npz").is_file() and not (out / "profile.json").exists()

    # resume: block 0 is reused, only block 1's modules get statistics, the result equals an uninterrupted run
    monkeypatch.setattr(pipeline, "_block_signals", real_block)
    collected = []
    real_collect = pipeline.collect_statistics
    monkeypatch.setattr(pipeline, "collect_statistics", lambda m, names, *a, **k: collected.append(names) or real_collect(m, names, *a, **k))
    resumed = profile_model(make_llama(), calib_ids, out, **make())
    assert collected == [[n for n in full.table.groups if n.startswith("model.layers.1.")]]
    assert resumed.key == full.key
    np.testing.assert_allclose(resumed.table.errors["fisher"], full.table.errors["fisher"], rtol=1e-6)
    for a, b in zip(resumed.modules, full.modules):
        np.testing.assert_allclose(a.fisher, b.fisher, rtol=1e-6)
        assert a.trace.total == pytest.approx(b.trace.total, rel=1e-6)


def test_interactions_in_profile(tmp_path, calib_ids):
    prof = profile_model(make_llama(), calib_ids, tmp_path / "p", **make(signals=("interactions",), interaction_option="int2-g32-asym",
                                                                        interaction_blocks=(1,)))
    assert len(prof.interactions) == 11 and all(i.a.startswith("model.layers.1.") for i in prof.interactions)
    again = Profile.load(tmp_path / "p")
    assert [(i.a, i.b, i.joint) for i in again.interactions] == [(i.a, i.b, i.joint) for i in prof.interactions]


def test_unknown_signal_is_bad_input(tmp_path, calib_ids):
    with pytest.raises(BadInputError, match="unknown signal"):
        profile_model(make_llama(), calib_ids, tmp_path / "p", signals=("hessian",))


def test_cli_profile_report_and_plan_report(tmp_path, model_dir):
    prof_dir = tmp_path / "prof"
    r = run_cli("profile", str(model_dir), "--calib", str(model_dir / "calib.txt"), "--calib-tokens", "64",
                "--seq-len", "32", "--signals", "fisher,trace,salience,spikes,table,interactions", "--trace-max-probes", "2",
                "--bits", "3,4", "--group-sizes", "32", "--interaction-option", "int3-g32-asym", "--out", str(prof_dir), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "probes" in r.stdout and "measured pairs" in r.stdout and (prof_dir / "profile.json").is_file()
    r = run_cli("report", str(prof_dir), "--out", str(tmp_path / "report.html"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    page = (tmp_path / "report.html").read_text()
    for heading in ("per-layer sensitivity", "activation spikes", "inter-layer corrections", "predicted vs measured"):
        assert heading in page
    assert page.count("data:image/png;base64") == 3

    plan = tmp_path / "plan.json"
    r = run_cli("plan", str(model_dir), "--budget", "4bits", "--calib", str(model_dir / "calib.txt"), "--calib-tokens", "64",
                "--seq-len", "32", "--no-cache", "--out", str(plan), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = run_cli("report", str(plan), "--out", str(tmp_path / "plan.html"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "bit allocation" in (tmp_path / "plan.html").read_text()


@pytest.mark.parametrize("args,fix", [
    (["profile", "MODEL", "--calib", "CALIB", "--signals", "trace,bogus"], "unknown signal"),
    (["report", "nowhere"], "does not exist"),
    (["report", "PROF", "--out", "report.txt"], "must end in .html"),
])
def test_cli_bad_input_is_one_line(tmp_path, model_dir, args, fix):
    (tmp_path / "PROF").mkdir()
    args = [str(model_dir) if a == "MODEL" else str(model_dir / "calib.txt") if a == "CALIB" else a for a in args]
    r = run_cli(*args, cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.startswith("error: ") and fix in r.stderr and r.stderr.count("\n") == 1


# ---- report figures: the numbers behind each image -------------------------------------------------------


def test_report_figures_carry_the_profile_and_plan_numbers(tmp_path, calib_ids):
    from scipy.stats import spearmanr

    from bitalloc.replan import plan_from_profile
    from bitalloc.report import figure_data, write_report

    model = make_llama()
    out = tmp_path / "prof"
    prof = profile_model(model, calib_ids, out, **make())
    page = write_report(out, tmp_path / "profile.html").read_text()
    figs = figure_data(page)
    assert set(figs) == {"sensitivity", "spikes"} and page.count("data:image/png;base64") == 2
    bars = figs["sensitivity"]
    assert bars["blocks"] == [0, 1] and len(bars["projections"]) == 7
    col = bars["projections"].index("mlp.down_proj")
    fisher = next(v for k, v in bars["signals"].items() if "Fisher" in k)
    assert fisher[1][col] == pytest.approx(float(prof.module("model.layers.1.mlp.down_proj").fisher.sum()), rel=1e-12)
    trace = next(v for k, v in bars["signals"].items() if "trace" in k)
    assert trace[0][col] == pytest.approx(prof.module("model.layers.0.mlp.down_proj").trace.per_param, rel=1e-12)
    spikes = figs["spikes"]
    q = spikes["projections"].index("self_attn.q_proj")
    assert spikes["values"][0][q] == pytest.approx(np.log10(prof.module("model.layers.0.self_attn.q_proj").spikes.input.ratio))
    assert spikes["marked"] == [[False] * 7, [False] * 7]  # nothing spikes in a random tiny model
    assert "stopped by" in page and "relative" in page  # the trace stopping rules per layer

    plan = plan_from_profile(out, "4bits")
    plan.save(tmp_path / "plan.json")
    # a measured file: bench/sensitivity.py's rows; measured = predicted × a factor that reverses two ranks
    table = prof.table
    names = table.groups[:6]
    rows = [{"module": n, "option": "int3-g32-asym", "measured": float(table.errors["fisher-tw"][g, 0]) * f, "fisher-tw": -1.0}
            for g, (n, f) in enumerate(zip(names, (1, 1, 1, 1, 50, 0.01)))]
    rows.append({"module": names[0], "option": "int3-g32-asym", "measured": -1e-4})  # noise below 0: kept for ρ, off the log axes
    (tmp_path / "measured.json").write_text(json.dumps({"rows": rows}))
    page = write_report(out, tmp_path / "pvm.html", measured=tmp_path / "measured.json").read_text()
    pvm = figure_data(page)["predicted_vs_measured"]
    pred = [float(table.errors["fisher-tw"][table.groups.index(r["module"]), 0]) for r in rows]  # the default error model
    assert pvm["predicted"] == pytest.approx(pred, rel=1e-12) and pvm["measured"] == [r["measured"] for r in rows]
    expected = float(spearmanr(pred, [r["measured"] for r in rows])[0])
    assert pvm["spearman"] == pytest.approx(expected) and expected < 0.9  # the reversed ranks show
    assert "1 pair(s) with a ΔNLL &le; 0" in page

    # from a plan: rows at the planned option take the plan's prediction, others the file's own column
    chosen = {a.module: a for a in plan.assignments}
    rows = [{"module": n, "option": chosen[n].label, "measured": 0.01 * (i + 1), "fisher-tw": 123.0} for i, n in enumerate(names[:3])]
    other = next(o.label for o in table.options if o.label != chosen[names[3]].label)
    rows.append({"module": names[3], "option": other, "measured": 0.5, "fisher-tw": 7.0})  # the plan's error model
    (tmp_path / "measured2.json").write_text(json.dumps({"rows": rows}))
    page = write_report(tmp_path / "plan.json", tmp_path / "plan.html", measured=tmp_path / "measured2.json").read_text()
    figs = figure_data(page)
    assert figs["predicted_vs_measured"]["predicted"] == [chosen[n].predicted_delta_loss for n in names[:3]] + [7.0]
    assert "1 of 4 from the measured file" in figs["predicted_vs_measured"]["origin"]
    alloc = figs["bit_allocation"]
    a = chosen["model.layers.1.self_attn.o_proj"]
    o = alloc["projections"].index("self_attn.o_proj")
    assert alloc["values"][1][o] == pytest.approx(a.storage_bits / (a.shape[0] * a.shape[1]))

    (tmp_path / "bad.json").write_text(json.dumps({"rows": [{"module": "x"}]}))
    with pytest.raises(BadInputError, match="module, option, measured"):
        write_report(out, tmp_path / "x.html", measured=tmp_path / "bad.json")
