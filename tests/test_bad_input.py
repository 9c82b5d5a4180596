"""Bad input, table-driven (issue 15): every row is refused with one message and nothing on disk changes.

Each CLI row runs `bitalloc.cli.main()` in-process (exit code through SystemExit, the message from
stderr) with a fresh empty working folder; each API row calls the Python API. For every row the
working folder (where default outputs such as plan.json land, and where every --out of the table
points) is snapshotted before and after: nothing may be created, replaced or removed.

Rows that need the model keep it tiny (tests/conftest.py's Llama, 64 calibration tokens); the rows
about output paths must fail before the model is loaded, which the timing of the whole file shows.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch

import bitalloc
from bitalloc import cli
from bitalloc.errors import BitallocError

from conftest import VOCAB, make_llama

FAST = ("--calib-tokens", "64", "--seq-len", "16", "--no-cache")


@dataclass(frozen=True)
class Row:
    """argv: CLI arguments ({model}, {calib}, {text}, {plan}, {profile}, {gguf} ... are filled in), or
    call: an API call given the inputs; setup: makes files in the working folder before the snapshot."""

    id: str
    code: int
    starts: str  # the message's first words (after "error: ")
    argv: tuple[str, ...] = ()
    call: Callable | None = None
    setup: Callable | None = None
    contains: tuple[str, ...] = field(default_factory=tuple)


def fifo(name):
    return lambda d: os.mkfifo(d / name)


def devnull_link(name):
    # a symlink to the null device: writing "through" it must not replace /dev/null (we never touch the real one)
    return lambda d: os.symlink(os.devnull, d / name)


def folder(name):
    return lambda d: (d / name).mkdir()


def file(name, text="keep me\n"):
    return lambda d: (d / name).write_text(text)


def plan_rows() -> list[Row]:
    P = ("plan", "{model}", "--calib", "{calib}", *FAST)
    return [
        # ---- budgets (refused before the model loads) ----
        Row("budget-unit", 2, "unknown budget unit 'parsecs'", (*P, "--budget", "3.2 parsecs")),
        Row("budget-negative", 2, "budget must be positive", (*P, "--budget", "-1bits")),
        Row("budget-zero", 2, "budget must be positive", (*P, "--budget", "0GB")),
        Row("budget-percent-over-100", 2, "a percentage budget", (*P, "--budget", "101%")),
        Row("budget-unknown-unit", 2, "unknown budget unit 'furlongs'", (*P, "--budget", "3furlongs")),
        Row("budget-inf-word", 2, "cannot read budget 'infbits'", (*P, "--budget", "infbits")),
        Row("budget-nan-word", 2, "cannot read budget 'nanbits'", (*P, "--budget", "nanbits")),
        Row("budget-1e309", 2, "budget '1e309bits' is not a finite number", (*P, "--budget", "1e309bits")),
        Row("budget-1e308GB", 2, "budget '1e308GB' is not a finite number", (*P, "--budget", "1e308GB")),
        Row("budget-infeasible", 2, "budget 1bits is below the smallest feasible", (*P, "--budget", "1bits")),
        Row("budget-and-pareto", 2, "pass exactly one of --budget", (*P, "--budget", "4bits", "--pareto", "3:5:1bits")),
        Row("budget-none", 2, "pass exactly one of --budget", P),
        Row("pareto-1e309", 2, "cannot read budget range '3:1e309:1bits'",
            (*P, "--pareto", "3:1e309:1bits")),
        Row("pareto-range", 2, "cannot read", (*P, "--pareto", "5:3")),
        # ---- missing or unreadable inputs ----
        Row("calib-file-missing", 2, "text file", ("plan", "{model}", "--calib", "nope.txt", "--budget", "4bits", *FAST)),
        Row("calib-empty", 2, "text file", ("plan", "{model}", "--calib", "empty.txt", "--budget", "4bits", *FAST),
            setup=file("empty.txt", "  \n")),
        Row("calib-not-utf8", 2, "text file", ("plan", "{model}", "--calib", "latin1.txt", "--budget", "4bits", *FAST),
            setup=lambda d: (d / "latin1.txt").write_bytes(b"caf\xe9 au lait\n")),
        Row("model-missing", 2, "model path", ("plan", "./no-such-model", "--calib", "{calib}", "--budget", "4bits", *FAST)),
        Row("model-dir-empty", 2, "directory", ("plan", "emptydir", "--calib", "{calib}", "--budget", "4bits", *FAST),
            setup=folder("emptydir")),
        Row("gguf-missing", 2, "GGUF file", ("plan", "missing.gguf", "--calib", "{calib}", "--budget", "4bits", *FAST)),
        Row("gguf-truncated", 2, "could not read GGUF file", ("plan", "{gguf}", "--calib", "{calib}", "--budget", "4bits", *FAST)),
        Row("no-model-no-profile", 2, "pass MODEL", ("plan", "--budget", "4bits")),
        # ---- option grid, solver, constraints ----
        Row("bits-9", 2, "int bits must be 2..8", (*P, "--budget", "4bits", "--bits", "9")),
        Row("bits-word", 2, "cannot read --bits", (*P, "--budget", "4bits", "--bits", "four")),
        Row("group-size-word", 2, "cannot read --group-sizes", (*P, "--budget", "4bits", "--group-sizes", "32,big")),
        Row("formats-unknown", 2, "unknown format", (*P, "--budget", "4bits", "--formats", "int,fp9"), contains=("'fp9'",)),
        Row("target-unknown", 2, "unknown target", (*P, "--budget", "4bits", "--target", "tpu"), contains=("'tpu'",)),
        Row("no-options", 2, "no options left", (*P, "--budget", "4bits", "--formats", "keep", "--no-keep")),
        Row("solver-unknown", 2, "unknown solver 'nope'", (*P, "--budget", "4bits", "--solver", "nope")),
        Row("error-model-unknown", 2, "unknown error model", (*P, "--budget", "4bits", "--error-model", "nope")),
        Row("quantizer-unknown", 2, "unknown quantizer", (*P, "--budget", "4bits", "--quantizer", "nope")),
        Row("pin-syntax", 2, "cannot read --pin 'q_proj'", (*P, "--budget", "4bits", "--pin", "q_proj")),
        Row("solver-setting-syntax", 2, "cannot read --solver-setting", (*P, "--budget", "4bits", "--solver-setting", "trials")),
        Row("max-latency-alone", 2, "--max-latency needs --latency-profile", (*P, "--budget", "4bits", "--max-latency", "4ms")),
        Row("protect-spikes-alone", 2, "--protect-spikes reads", (*P, "--budget", "4bits", "--protect-spikes", "fp8")),
        Row("profile-with-grid", 2, "--profile fixes the options", ("plan", "--profile", "{profile}", "--budget", "4bits", "--bits", "4")),
        Row("profile-missing", 2, "", ("plan", "--profile", "no-profile", "--budget", "4bits"), contains=("no-profile",)),
        Row("profile-version-abc", 2, "", ("plan", "--profile", "{profile_abc}", "--budget", "4bits"),
            contains=("version 'abc'", "re-run `bitalloc profile`")),
        # ---- token windows ----
        Row("plan-seq-len-1", 2, "need calibration seq_len >= 2", ("plan", "{model}", "--calib", "{calib}", "--budget", "4bits",
                                                      "--seq-len", "1", "--calib-tokens", "64", "--no-cache")),
        Row("plan-seq-len-over-positions", 2, "calibration token ids: 256 tokens per window is more than the model's 128 positions",
            ("plan", "{model}", "--calib", "{calib}", "--budget", "4bits", "--seq-len", "256", "--calib-tokens", "256", "--no-cache")),
        # ---- click's own usage errors (exit 2, its "Error:" line) ----
        Row("unknown-flag", 2, "No such option: --nope", ("plan", "{model}", "--nope")),
        Row("seq-len-not-int", 2, "Invalid value for '--seq-len'", (*P[:4], "--budget", "4bits", "--seq-len", "x")),
    ]


def out_rows() -> list[Row]:
    """--out onto things that are not the kind of target the writer makes; refused before the model loads."""
    P = ("plan", "{model}", "--calib", "{calib}", "--budget", "4bits", *FAST)
    return [
        Row("plan-out-fifo", 2, "--out", (*P, "--out", "pipe"), setup=fifo("pipe"), contains=("not a regular file",)),
        Row("plan-out-devnull-link", 2, "--out", (*P, "--out", "null"), setup=devnull_link("null"),
            contains=("not a regular file",)),
        Row("plan-out-directory", 2, "--out", (*P, "--out", "adir"), setup=folder("adir"), contains=("is a folder",)),
        Row("plan-out-under-a-file", 2, "--out", (*P, "--out", "afile/plan.json"), setup=file("afile"),
            contains=("not a folder",)),
        Row("plan-from-profile-out-directory", 2, "--out",
            ("plan", "--profile", "{profile}", "--budget", "4bits", "--out", "adir"), setup=folder("adir"),
            contains=("is a folder",)),
        Row("pareto-out-file", 2, "--out", (*P[:-7], *FAST, "--pareto", "3:5:1bits", "--out", "afile"),
            setup=file("afile"), contains=("not a folder",)),
        Row("profile-out-file", 2, "--out", ("profile", "{model}", "--calib", "{calib}", *FAST[:-1], "--out", "afile"),
            setup=file("afile"), contains=("not a folder",)),
        Row("profile-out-fifo", 2, "--out", ("profile", "{model}", "--calib", "{calib}", *FAST[:-1], "--out", "pipe"),
            setup=fifo("pipe"), contains=("not a folder",)),
        Row("apply-out-file", 2, "--out", ("apply", "{model}", "--plan", "{plan}", "--out", "afile"), setup=file("afile"),
            contains=("not a folder",)),
        Row("apply-out-devnull-link", 2, "--out", ("apply", "{model}", "--plan", "{plan}", "--out", "null", "--force"),
            setup=devnull_link("null"), contains=("not a folder",)),
        Row("apply-out-exists", 2, "--out", ("apply", "{model}", "--plan", "{plan}", "--out", "adir"), setup=folder("adir"),
            contains=("already exists", "--force")),
        Row("export-out-file", 2, "--out", ("export", "{plan}", "--to", "gguf", "--out", "afile"), setup=file("afile"),
            contains=("not a folder",)),
        Row("schema-out-directory", 2, "--out", ("schema", "--out", "adir"), setup=folder("adir"), contains=("is a folder",)),
        Row("schema-out-fifo", 2, "--out", ("schema", "--out", "pipe"), setup=fifo("pipe"), contains=("not a regular file",)),
        Row("report-out-directory", 2, "--out", ("report", "{plan}", "--out", "r.html"), setup=folder("r.html"),
            contains=("is a folder",)),
        Row("report-out-suffix", 2, "report output 'r.txt' must end in .html", ("report", "{plan}", "--out", "r.txt")),
        Row("latency-out-fifo", 2, "--out", ("latency", "--model", "{model}", "--out", "pipe", "--samples", "1"),
            setup=fifo("pipe"), contains=("not a regular file",)),
    ]


def other_command_rows() -> list[Row]:
    E = ("eval", "{model}", "--text", "{text}")
    return [
        Row("show-missing", 2, "plan file 'nope.json' does not exist", ("show", "nope.json")),
        Row("show-not-json", 2, "bad.json is not valid JSON", ("show", "bad.json"), setup=file("bad.json", "{")),
        Row("show-not-a-plan", 2, "x.json is not a bitalloc plan", ("show", "x.json"), setup=file("x.json", "[]")),
        Row("show-newer-schema", 2, "", ("show", "{plan_v2}"), contains=("schema version 2", "upgrade")),
        Row("show-group-size-7", 2, "", ("show", "{plan_g7}"), contains=("group_size 7", "does not divide")),
        Row("apply-group-size-7", 2, "", ("apply", "{model}", "--plan", "{plan_g7}", "--out", "ck", "--allow-untied"),
            contains=("group_size 7",)),
        Row("eval-group-size-7", 2, "", (*E, "--plan", "{plan_g7}", "--seq-len", "16", "--windows", "2"),
            contains=("group_size 7",)),
        Row("eval-windows-0", 2, "--windows must be at least 1, got 0", (*E, "--seq-len", "16", "--windows", "0")),
        Row("eval-windows-negative", 2, "--windows must be at least 1, got -3", (*E, "--seq-len", "16", "--windows", "-3")),
        Row("eval-seq-len-1", 2, "--seq-len must be at least 2, got 1", (*E, "--seq-len", "1", "--windows", "2")),
        Row("eval-seq-len-over-positions", 2, "evaluation windows: 256 tokens per window is more than the model's 128 positions",
            (*E, "--seq-len", "256", "--windows", "1")),
        Row("eval-text-too-short", 2, "the text has", (*E, "--seq-len", "120", "--windows", "1", "--text", "short.txt"),
            setup=file("short.txt", "the dog runs .\n")),
        Row("eval-plan-other-weights", 2, "plan was made for weights", (*E, "--plan", "{plan_other}", "--seq-len", "16",
                                                                        "--windows", "2", "--calib", "{calib}")),
        Row("apply-dtype", 2, "unknown --dtype 'int3'", ("apply", "{model}", "--plan", "{plan}", "--out", "ck", "--dtype", "int3")),
        Row("apply-format", 2, "unknown checkpoint format", ("apply", "{model}", "--plan", "{plan}", "--out", "ck", "--format", "onnx")),
        Row("export-no-target", 2, "pass a plan and a target", ("export", "{plan}")),
        Row("export-unknown-target", 2, "unknown export target 'nope'", ("export", "{plan}", "--to", "nope")),
        Row("profile-signal-unknown", 2, "unknown signal(s) nope", ("profile", "{model}", "--calib", "{calib}",
                                                                    "--signals", "nope", "--out", "prof")),
        Row("latency-threads-0", 2, "--threads must be at least 1", ("latency", "--model", "{model}", "--out", "l.json",
                                                                     "--threads", "0")),
    ]


# ---- API rows -------------------------------------------------------------------------------------


def api_plan(ids):
    return lambda inp: bitalloc.plan(make_llama(), "4bits", ids, cache_dir=False)


def with_bad_weight(value):
    def call(inp):
        model = make_llama()
        with torch.no_grad():
            model.model.layers[1].mlp.down_proj.weight[3, 5] = value
        return bitalloc.plan(model, "4bits", inp["ids"], cache_dir=False)
    return call


def meta_model(inp):
    with torch.device("meta"):
        model = make_llama()
    return bitalloc.plan(model, "4bits", inp["ids"], cache_dir=False)


def apply_to_meta_model(inp):
    with torch.device("meta"):
        model = make_llama()
    return bitalloc.apply(model, bitalloc.Plan.load(inp["plan"]), check_hash=False)


def nan_cost_table(inp, error_model: str = "fisher"):
    """A table with a NaN fisher error and no fisher-tw errors (as an older bitalloc made), solved under `error_model`."""
    from bitalloc.api import PlanContext, solve_table
    from bitalloc.candidates import CandidateTable
    from bitalloc.options import QuantOption

    opts = [QuantOption.int_(4, 64), QuantOption.int_(8, 64)]
    table = CandidateTable(groups=["a", "b"], shapes=[(64, 64), (64, 64)], options=opts,
                           storage_bits=np.array([[o.storage_bits(64, 64) for o in opts]] * 2, dtype=float),
                           errors={"fisher": np.array([[1e-3, 1e-5], [np.nan, 1e-5]]),
                                   "local": np.array([[1e-3, 1e-5], [1e-3, 1e-5]])})
    return solve_table(table, "6bits", error_model=error_model, context=PlanContext(
        model={"source": "toy", "architecture": "LlamaForCausalLM", "content_hash": "sha256:" + "0" * 64,
               "output_embedding": None, "input_embedding": None, "tied_embeddings": False}, calibration={}))


def api_rows() -> list[Row]:
    g = torch.Generator().manual_seed(0)
    ok = torch.randint(0, VOCAB, (4, 32), generator=g)
    return [
        Row("ids-4x1", 2, "calibration token ids", call=api_plan(ok[:, :1]), contains=("[4, 1]", "at least 2")),
        Row("ids-0x32", 2, "calibration token ids", call=api_plan(ok[:0]), contains=("[0, 32]",)),
        Row("ids-4x0", 2, "calibration token ids", call=api_plan(ok[:, :0]), contains=("[4, 0]",)),
        Row("ids-1d", 2, "calibration token ids", call=api_plan(ok[0])),
        Row("ids-float", 2, "calibration token ids", call=api_plan(ok.float())),
        Row("ids-out-of-vocab", 2, "calibration token ids", call=api_plan(ok.clone().index_fill_(1, torch.tensor([3]), VOCAB)),
            contains=(f"id {VOCAB}", f"vocabulary of {VOCAB}")),
        Row("ids-negative", 2, "calibration token ids", call=api_plan(ok.clone().index_fill_(1, torch.tensor([0]), -1)),
            contains=("id -1",)),
        Row("ids-over-positions", 2, "calibration token ids", call=api_plan(torch.randint(0, VOCAB, (1, 200), generator=g)),
            contains=("200", "128 positions")),
        Row("weight-nan", 2, "weight of model.layers.1.mlp.down_proj", call=with_bad_weight(float("nan")),
            contains=("not finite",)),
        Row("weight-inf", 2, "weight of model.layers.1.mlp.down_proj", call=with_bad_weight(float("inf")),
            contains=("not finite",)),
        Row("meta-device", 2, "the model's weights are on the meta device", call=meta_model),
        Row("budget-api-1e309", 2, "budget '1e309bits' is not a finite number",
            call=lambda inp: bitalloc.plan(make_llama(), "1e309bits", inp["ids"], cache_dir=False)),
        Row("evaluate-ids-0x32", 2, "evaluation windows have shape [0, 32]",
            call=lambda inp: bitalloc.evaluate(make_llama(), inp["ids"][:0])),
        Row("evaluate-ids-4x1", 2, "evaluation windows have shape [4, 1]",
            call=lambda inp: bitalloc.evaluate(make_llama(), inp["ids"][:, :1])),
        Row("evaluate-ids-out-of-vocab", 2, f"evaluation windows contain id {VOCAB + 5}",
            call=lambda inp: bitalloc.evaluate(make_llama(), inp["ids"] + VOCAB + 5 - inp["ids"].max())),
        Row("apply-meta-device", 2, "the model's weights are on the meta device", call=apply_to_meta_model),
        Row("nan-cost-table", 2, "candidate table: predicted fisher error of b", call=nan_cost_table,
            contains=("not finite",)),
        Row("table-without-error-model", 2, "this candidate table has no 'fisher-tw' errors",
            call=lambda inp: nan_cost_table(inp, "fisher-tw"), contains=("re-profile", "error_model fisher")),
    ]


ROWS = plan_rows() + out_rows() + other_command_rows() + api_rows()


# ---- fixtures: the valid inputs the rows spoil ------------------------------------------------------


@pytest.fixture(scope="module")
def inputs(model_dir, tmp_path_factory):
    from bitalloc.api import profile_model
    from bitalloc.models import load_model

    d = tmp_path_factory.mktemp("bad-input")
    loaded = load_model(str(model_dir))
    plan = bitalloc.plan(loaded, "4bits", model_dir / "calib.txt", seq_len=16, calib_tokens=64, cache_dir=False)
    plan_path = plan.save(d / "plan.json")
    doc = json.loads(plan_path.read_text())

    def variant(name, edit):
        v = json.loads(json.dumps(doc))
        edit(v)
        return (d / name).write_text(json.dumps(v)) and d / name

    plan_v2 = variant("plan-v2.json", lambda v: v.update(schema_version=2))
    plan_g7 = variant("plan-g7.json", lambda v: v["assignments"][0]["option"].update(group_size=7))
    plan_other = variant("plan-other.json", lambda v: v["model"].update(content_hash="sha256:" + "0" * 64))
    prof = d / "profile"
    profile_model(loaded, model_dir / "calib.txt", prof, signals=("fisher", "table"), seq_len=16, calib_tokens=64)
    prof_abc = d / "profile-abc"
    prof_abc.mkdir()
    (prof_abc / "tensors.npz").write_bytes((prof / "tensors.npz").read_bytes())
    pdoc = json.loads((prof / "profile.json").read_text())
    pdoc["version"] = "abc"
    (prof_abc / "profile.json").write_text(json.dumps(pdoc))
    # A GGUF cut short: a valid header announcing metadata that is not there (like a download stopped early).
    gguf = d / "cut.gguf"
    gguf.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + (10).to_bytes(8, "little") + (24).to_bytes(8, "little")
                     + (20).to_bytes(8, "little") + b"general.archi")
    g = torch.Generator().manual_seed(0)
    return {"model": str(model_dir), "calib": str(model_dir / "calib.txt"), "text": str(model_dir / "eval.txt"),
            "plan": str(plan_path), "plan_v2": str(plan_v2), "plan_g7": str(plan_g7), "plan_other": str(plan_other),
            "profile": str(prof), "profile_abc": str(prof_abc), "gguf": str(gguf),
            "ids": torch.randint(0, VOCAB, (4, 32), generator=g)}


def snapshot(root: Path) -> dict:
    """Every entry under root: kind, and for regular files their bytes' hash (FIFOs are never opened)."""
    seen = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                seen[str(p.relative_to(root))] = ("link", os.readlink(p))
            elif stat.S_ISREG(st.st_mode):
                seen[str(p.relative_to(root))] = ("file", hashlib.sha256(p.read_bytes()).hexdigest())
            else:
                seen[str(p.relative_to(root))] = (stat.S_IFMT(st.st_mode), None)
    return seen


def run_row(row: Row, inputs: dict, monkeypatch, capsys) -> tuple[int, str]:
    """(exit code, the error line's text) for one row; an uncaught exception is exit 1 with its type."""
    if row.call is not None:
        try:
            row.call(inputs)
        except BitallocError as e:
            return e.exit_code, str(e)
        except Exception as e:  # noqa: BLE001 - the point: anything but BitallocError is a failure of the row
            return 1, f"{type(e).__name__}: {e}"
        return 0, ""
    argv = [a.format(**inputs) for a in row.argv]
    monkeypatch.setattr(sys, "argv", ["bitalloc", *argv])
    try:
        cli.main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except Exception as e:  # noqa: BLE001
        return 1, f"{type(e).__name__}: {e}"
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.lower().startswith("error:")]
    if not lines:
        return code, err[-500:]
    # click wraps its usage errors in a box-less "Error: ..."; ours is one line
    return code, lines[-1].split(":", 1)[1].strip()


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_bad_input_is_refused_and_nothing_is_written(row, inputs, tmp_path, monkeypatch, capsys):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    if row.setup is not None:
        row.setup(work)
    before = snapshot(work)
    code, message = run_row(row, inputs, monkeypatch, capsys)
    assert (code, message[:len(row.starts)]) == (row.code, row.starts), message
    for needle in row.contains:
        assert needle in message, message
    assert "\n" not in message
    assert snapshot(work) == before


def test_the_table_is_the_catalogue():
    # issue 15 asks for ~40+ rows; ids are unique so a failure names its row
    assert len(ROWS) >= 40
    assert len({r.id for r in ROWS}) == len(ROWS)


# ---- Ctrl-C: exit 130, one line, what was kept (issue 15 item 3) ------------------------------------


def run_main(argv, monkeypatch, capsys) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["bitalloc", *map(str, argv)])
    try:
        cli.main()
        code = 0
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_sigint_stops_a_profile_with_130_and_keeps_its_finished_parts(model_dir, tmp_path):
    import signal
    import subprocess
    import time

    out = tmp_path / "prof"
    # PYTHONFAULTHANDLER: if it does not stop, SIGABRT makes it print where each thread is
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", BITALLOC_CACHE_DIR=str(tmp_path / "cache"),
               PYTHONFAULTHANDLER="1")
    args = [sys.executable, "-m", "bitalloc.cli", "profile", str(model_dir), "--calib", str(model_dir / "calib.txt"),
            "--signals", "fisher,table,trace", "--trace-tol", "0", "--trace-abs-tol", "0", "--trace-max-probes", "100000",
            "--calib-tokens", "64", "--seq-len", "16", "--out", str(out)]
    # SIGINT back to its default in the child: a test run started in the background by a shell without job
    # control inherits it ignored, and Python then never turns Ctrl-C into KeyboardInterrupt
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 120
        # the trace loop saves its state every round: once it is on disk the block parts are too
        while not (out / "parts" / "trace.npz").exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        try:
            stdout, stderr = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGABRT)
            stdout, stderr = proc.communicate(timeout=60)
            pytest.fail(f"still running 120 s after Ctrl-C; where it was:\n{stderr[-6000:]}")
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr[-2000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("interrupted: `bitalloc profile` stopped by Ctrl-C; finished blocks are kept"), stderr[-2000:]
    assert "Traceback" not in stderr
    assert not (out / "profile.json").exists()
    kept = sorted(p.name for p in (out / "parts").iterdir())
    assert "block-000.npz" in kept and "block-001.npz" in kept and "trace.npz" in kept


def test_interrupted_profile_resumes_from_its_finished_blocks(model_dir, tmp_path, monkeypatch, capsys):
    from bitalloc.profile import pipeline

    real = pipeline._block_signals
    calls = []

    def second_call_interrupted(model, names, *a, **k):
        calls.append(names[0])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(model, names, *a, **k)

    args = ["profile", model_dir, "--calib", model_dir / "calib.txt", "--signals", "fisher,table",
            "--calib-tokens", "64", "--seq-len", "16"]
    monkeypatch.setattr(pipeline, "_block_signals", second_call_interrupted)
    code, _, err = run_main([*args, "--out", tmp_path / "a"], monkeypatch, capsys)
    assert code == 130
    assert err.strip().splitlines()[-1].startswith("interrupted: `bitalloc profile` stopped by Ctrl-C; finished blocks")
    assert [p.name for p in (tmp_path / "a" / "parts").iterdir() if p.suffix == ".npz"] == ["block-000.npz"]

    calls.clear()
    monkeypatch.setattr(pipeline, "_block_signals", lambda *a, **k: calls.append(a[1][0]) or real(*a, **k))
    assert run_main([*args, "--out", tmp_path / "a"], monkeypatch, capsys)[0] == 0
    assert calls == ["model.layers.1.self_attn.q_proj"]  # block 0 came from its part
    assert run_main([*args, "--out", tmp_path / "b"], monkeypatch, capsys)[0] == 0
    assert (tmp_path / "a" / "profile.json").read_bytes() == (tmp_path / "b" / "profile.json").read_bytes()


def test_interrupted_apply_leaves_out_untouched(inputs, tmp_path, monkeypatch, capsys):
    from bitalloc import pack

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(pack, "_measure", interrupted)
    code, _, err = run_main(["apply", inputs["model"], "--plan", inputs["plan"], "--out", tmp_path / "ck",
                             "--calib", inputs["calib"], "--allow-untied"], monkeypatch, capsys)
    assert code == 130
    assert err.strip().splitlines()[-1] == ("interrupted: `bitalloc apply` stopped by Ctrl-C; --out was not changed; "
                                            "the unfinished temporary folder is removed (or by the next apply)")
    assert list(tmp_path.iterdir()) == []


# ---- apply housekeeping (item 10) -------------------------------------------------------------------


def test_apply_removes_what_a_killed_run_left(inputs, tmp_path, monkeypatch, capsys):
    junk = tmp_path / ".ck.k1ll3d00.tmp"
    junk.mkdir()
    (junk / "model.safetensors").write_bytes(b"half")
    code, _, err = run_main(["apply", inputs["model"], "--plan", inputs["plan"], "--out", tmp_path / "ck",
                             "--calib", inputs["calib"], "--allow-untied", "--json"], monkeypatch, capsys)
    assert code == 0, err
    assert "note: removed .ck.k1ll3d00.tmp, left by an interrupted earlier run" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
    assert (tmp_path / "ck" / "config.json").is_file()


def test_apply_restores_the_checkpoint_a_killed_replace_moved_aside(inputs, tmp_path, monkeypatch, capsys):
    # killed between "move the old --out aside" and "rename the new one in": --out is missing, .old holds it
    aside = tmp_path / ".ck.k1ll3d00.old" / "ck"
    aside.mkdir(parents=True)
    (aside / "config.json").write_text("previous")
    code, _, err = run_main(["apply", inputs["model"], "--plan", inputs["plan"], "--out", tmp_path / "ck",
                             "--calib", inputs["calib"], "--allow-untied"], monkeypatch, capsys)
    # put back, and not replaced without --force
    assert code == 2 and "already exists (restored " in err and "left by an interrupted earlier run); pass --force" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
    assert (tmp_path / "ck" / "config.json").read_text() == "previous"


def test_force_replaces_out_but_keeps_the_hash_check(inputs, tmp_path, monkeypatch, capsys):
    (tmp_path / "ck").mkdir()
    base = ["apply", inputs["model"], "--plan", inputs["plan_other"], "--out", tmp_path / "ck", "--calib", inputs["calib"],
            "--allow-untied"]
    code, _, err = run_main([*base, "--force"], monkeypatch, capsys)
    assert code == 2 and "error: plan was made for weights sha256:0000" in err and "--skip-hash-check" in err
    assert list((tmp_path / "ck").iterdir()) == []
    code, _, err = run_main([*base, "--force", "--skip-hash-check"], monkeypatch, capsys)
    assert code == 0, err
    assert (tmp_path / "ck" / "config.json").is_file()


def test_serve_without_allow_root_warns_at_start(monkeypatch, capsys, tmp_path):
    pytest.importorskip("fastapi")
    from bitalloc.service import app as service

    started = []
    monkeypatch.setattr(service, "serve", lambda **kw: started.append(kw))
    code, _, err = run_main(["serve", "--store", tmp_path / "store"], monkeypatch, capsys)
    assert code == 0 and len(started) == 1
    assert err.startswith("WARNING: bitalloc serve runs without --allow-root: any file this process can read")
    code, _, err = run_main(["serve", "--store", tmp_path / "store", "--allow-root", tmp_path], monkeypatch, capsys)
    assert code == 0 and len(started) == 2 and "WARNING" not in err


# ---- the writer itself (item 1, defence in depth) ---------------------------------------------------


def test_atomic_writer_never_replaces_a_non_regular_file(tmp_path, monkeypatch):
    from bitalloc.errors import OutputPathError
    from bitalloc.io import atomic_write_text

    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    with pytest.raises(OutputPathError, match="exists and is not a regular file \\(a FIFO\\)"):
        atomic_write_text(pipe, "x")
    # a FIFO that appears while the file is written (after the first check) is not replaced either
    late = tmp_path / "late"
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (real_fsync(fd), os.mkfifo(late)))
    with pytest.raises(OutputPathError, match="a FIFO"):
        atomic_write_text(late, "x")
    assert stat.S_ISFIFO(os.lstat(pipe).st_mode) and stat.S_ISFIFO(os.lstat(late).st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["late", "pipe"]  # no temporary file left


def test_non_finite_statistics_name_module_and_signal(calib_ids):
    from bitalloc.calibration import calibration_from_tokens
    from bitalloc.errors import NonFiniteError
    from bitalloc.profile.statistics import collect_statistics

    model = make_llama()
    with torch.no_grad():
        model.model.layers[1].post_attention_layernorm.weight[0] = float("inf")
    names = ["model.layers.1.mlp.gate_proj"]  # its input is inf (norm) and the loss NaN: both of its statistics
    with pytest.raises(NonFiniteError, match=r"^statistics of model.layers.1.mlp.gate_proj: fisher is not finite"):
        collect_statistics(model, names, calibration_from_tokens(calib_ids))


@pytest.mark.parametrize("signal, starts", [
    ("trace", "statistics of model.layers.1.mlp.gate_proj: trace is not finite"),
    ("spikes", "statistics of model.layers.1.mlp.gate_proj: spikes (input) is not finite"),
])
def test_non_finite_trace_and_spikes_name_module_and_signal(calib_ids, tmp_path, signal, starts):
    """The Hutchinson trace and the activation spikes are refused like fisher/hessian, and never kept as a part."""
    from bitalloc.calibration import calibration_from_tokens
    from bitalloc.errors import NonFiniteError
    from bitalloc.profile.pipeline import ProfileSettings, compute_profile

    model = make_llama()
    with torch.no_grad():
        model.model.layers[1].post_attention_layernorm.weight[0] = float("inf")
    out = tmp_path / "profile"
    settings = ProfileSettings(signals=(signal,), trace_min_probes=2, trace_max_probes=4, trace_windows=2)
    with pytest.raises(NonFiniteError) as refused:
        compute_profile(model, ["model.layers.1.mlp.gate_proj"], calibration_from_tokens(calib_ids), "sha256:k",
                        settings, out)
    assert str(refused.value).startswith(starts), refused.value
    assert "\n" not in str(refused.value)
    assert not any(out.rglob("*.npz"))  # a resumed run must not start from NaN sums


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root may write into any folder")
def test_unwritable_output_folder_is_refused_before_any_work(tmp_path):
    from bitalloc.errors import OutputPathError
    from bitalloc.io import check_output_dir, check_output_file

    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(OutputPathError, match="is not writable"):
            check_output_file(locked / "plan.json")
        with pytest.raises(OutputPathError, match="is not writable"):
            check_output_dir(locked / "new" / "profile")
    finally:
        locked.chmod(0o700)


def test_library_errors_name_settings_and_each_adapter_spells_them(inputs, tmp_path, monkeypatch, capsys):
    """A library message names the setting to change, not a flag: Python callers read `seq_len`,
    the CLI prints `--seq-len` (cli.flag), the service returns str(error), the JSON field names."""
    from bitalloc.calibration import sequential_windows
    from bitalloc.errors import BadInputError

    with pytest.raises(BadInputError) as caught:
        sequential_windows(torch.arange(10), seq_len=16)
    assert str(caught.value).endswith("fewer than one window of 16; lower seq_len")
    assert caught.value.phrased(cli.flag).endswith("lower --seq-len")
    # Settings whose flag is not the name with dashes.
    assert [cli.flag(n) for n in ("calibration", "ties", "pins", "ray.workers", "include_lm_head")] == [
        "--calib", "--tie", "--pin", "--ray-workers", "--include-lm-head"]
    text = tmp_path / "short.txt"
    text.write_text("a few words")
    code, _, err = run_main(["eval", inputs["model"], "--text", text, "--seq-len", "100", "--windows", "1"], monkeypatch, capsys)
    assert code == 2 and err.strip().endswith("fewer than one window of 100; lower --seq-len"), err


def test_a_step_to_run_again_is_spelled_by_each_adapter(inputs, tmp_path, monkeypatch, capsys):
    """A message that says which step to run again names it the caller's way: `bitalloc.plan()` from Python,
    `bitalloc plan` on the command line, the endpoint over HTTP; export notes likewise (export_plan's wording)."""
    from bitalloc.errors import BadInputError, cli_step
    from bitalloc.exports import export_plan
    from bitalloc.plan import Plan
    from bitalloc.service.wording import HTTP_WORDING, http_text

    missing = tmp_path / "missing.json"
    with pytest.raises(BadInputError) as caught:
        Plan.load(missing)
    assert str(caught.value).endswith("make one with `bitalloc.plan()` and save it as missing.json")
    assert caught.value.phrased(cli.flag, cli_step).endswith("make one with `bitalloc plan` and save it as missing.json")
    assert http_text(caught.value).endswith("make one with POST /v1/plans and save it as missing.json")
    code, _, err = run_main(["show", missing], monkeypatch, capsys)
    assert code == 2 and "make one with `bitalloc plan` and" in err and "[[" not in err, err
    # an error that quotes another (exports.gguf names the tensor first) keeps the placeholders for its adapter
    wrapped = BadInputError(f"token_embd.weight: {caught.value.unphrased}")
    assert wrapped.phrased(cli.flag, cli_step).endswith("make one with `bitalloc plan` and save it as missing.json")

    plan = Plan.load(inputs["plan"])
    spelled = {name: export_plan(plan, "compressed-tensors", tmp_path / name, **({"wording": w} if w else {})).notes[0]
               for name, w in (("python", None), ("cli", (cli.flag, cli_step)), ("http", HTTP_WORDING))}
    assert "`bitalloc.apply()` to a checkpoint folder" in spelled["python"]
    assert "`bitalloc apply` to a checkpoint folder" in spelled["cli"]
    assert "`bitalloc apply` to a checkpoint folder" in spelled["http"]  # apply is not served over HTTP
    assert not any("[[" in s for s in spelled.values())
