"""The `bitalloc` command line, run as its console script runs it (cli.main), for its exit codes and messages."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import jsonschema
import pytest
import torch

import bitalloc
from bitalloc.plan import SCHEMA_PATH, Plan, plan_json_schema

from conftest import make_llama, make_tokenizer


@pytest.fixture(scope="module")
def cli_env(tmp_path_factory):
    env = dict(os.environ)
    # a private cache (every command also passes --no-cache where it plans), offline, one thread
    env["BITALLOC_CACHE_DIR"] = str(tmp_path_factory.mktemp("cli-cache"))
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    for k in ("COLUMNS", "LINES"):
        env.pop(k, None)
    return env


def run_cli(env, *args, cwd=None) -> subprocess.CompletedProcess:
    """`bitalloc ARGS` as the console script runs it (cli.main: its exit codes, one-line errors and warnings), with
    `env` as the environment (warnings: the actions its PYTHONWARNINGS names; every caller sets one) and `cwd` as
    the working folder, in this process: a subprocess per command spent ~5 s importing torch and transformers, most
    of these tests' time. The command's own exceptions other than exits propagate, failing the test."""
    from bitalloc import cli

    stdout, stderr, code = io.StringIO(), io.StringIO(), 0
    saved_env, saved_cwd, saved_argv = dict(os.environ), os.getcwd(), sys.argv
    saved_format, saved_threads = warnings.formatwarning, torch.get_num_threads()
    os.environ.clear()
    os.environ.update(env)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            warnings.resetwarnings()
            for spec in filter(None, env.get("PYTHONWARNINGS", "").split(",")):
                warnings.simplefilter(spec.split(":")[0])  # the action; these tests give no other fields
            # to the captured stderr, as a process's warnings go (pytest otherwise records them)
            warnings.showwarning = lambda message, category, filename, lineno, file=None, line=None: sys.stderr.write(
                warnings.formatwarning(message, category, filename, lineno, line))
            if cwd is not None:
                os.chdir(cwd)
            sys.argv = ["bitalloc", *map(str, args)]
            cli.main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        os.chdir(saved_cwd)
        sys.argv = saved_argv
        os.environ.clear()
        os.environ.update(saved_env)
        warnings.formatwarning = saved_format
        torch.set_num_threads(saved_threads)
    return subprocess.CompletedProcess(["bitalloc", *map(str, args)], code, stdout.getvalue(), stderr.getvalue())


def run_cli_here(*args, cwd=None) -> subprocess.CompletedProcess:
    """run_cli with this process's environment, warnings off."""
    return run_cli(dict(os.environ, PYTHONWARNINGS="ignore"), *args, cwd=cwd)


def error_text(result: subprocess.CompletedProcess) -> str:
    """The error message (progress bars may precede it on stderr), with rich's line wrapping undone."""
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("error:")]
    assert len(starts) == 1, result.stderr
    return " ".join(" ".join(lines[starts[0]:]).split())


def assert_bad_input(result, *needles):
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    msg = error_text(result)
    for needle in needles:
        assert needle in msg, msg
    return msg


PLAN_ARGS = ("--calib-tokens", "64", "--seq-len", "16", "--no-cache")


@pytest.fixture(scope="module")
def cli_plan(model_dir, cli_env, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli-plan") / "p.json"
    r = run_cli(cli_env, "plan", model_dir, "--budget", "4bits", "--calib", model_dir / "calib.txt", *PLAN_ARGS,
                "--out", out)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "bits/weight" in r.stdout and f"wrote {out}" in " ".join(r.stdout.split())
    return out


# ---- happy paths ------------------------------------------------------------------------------


def test_help_names_every_registered_quantizer():
    """The CLI writes the quantizer names out (so --help imports no torch); they are the registry's."""
    from bitalloc.cli import QUANTIZER_NAMES
    from bitalloc.quantizers import available_quantizers
    assert sorted(QUANTIZER_NAMES) == available_quantizers()


def test_plan_writes_valid_plan_within_budget(cli_plan, model_dir):
    doc = json.loads(cli_plan.read_text(encoding="utf-8"))
    jsonschema.validate(doc, plan_json_schema())
    jsonschema.validate(doc, json.loads(SCHEMA_PATH.read_text(encoding="utf-8")))  # the checked-in schema
    plan = Plan.load(cli_plan)
    assert plan.summary.storage_bits_per_weight <= 4.0
    assert sum(a.storage_bits for a in plan.assignments) <= 4 * plan.summary.planned_weights
    assert plan.summary.planned_modules == 14
    assert plan.model.source == str(model_dir)
    assert plan.model.content_hash == bitalloc.models.weights_hash(make_llama())  # the saved weights
    assert plan.calibration["source"] == "calib.txt"
    assert plan.calibration["windows"] == 4 and plan.calibration["seq_len"] == 16


def test_plan_is_byte_identical_on_rerun(cli_plan, model_dir, cli_env, tmp_path):
    out = tmp_path / "again.json"
    r = run_cli(cli_env, "plan", model_dir, "--budget", "4bits", "--calib", model_dir / "calib.txt", *PLAN_ARGS,
                "--out", out)
    assert r.returncode == 0, r.stderr[-3000:]
    assert out.read_bytes() == cli_plan.read_bytes()


def test_eval_json(cli_plan, model_dir, cli_env):
    r = run_cli(cli_env, "eval", model_dir, "--text", model_dir / "eval.txt", "--plan", cli_plan,
                "--calib", model_dir / "calib.txt", "--seq-len", "16", "--windows", "2", "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [line for line in r.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, r.stdout
    result = json.loads(lines[0])
    assert result["windows"] == 2 and result["seq_len"] == 16 and result["scored_tokens"] == 2 * 15
    assert result["plan"] == str(cli_plan)
    assert result["kl"] > 0 and 0 <= result["top1"] <= 1
    assert result["ppl"] > 1 and abs(result["ppl"] - 2.718281828459045 ** result["nll"]) < 1e-6 * result["ppl"]


def test_quantizer_settings_reach_the_quantizer(cli_plan, model_dir, cli_env, tmp_path):
    """--quantizer-setting KEY=VALUE goes over the plan's defaults: the default float_target written out scores as
    the default does, GPTQ's own target (0) otherwise; a setting the quantizer does not take is refused by name, on
    eval and on apply (which then writes nothing)."""
    common = ("eval", model_dir, "--text", model_dir / "eval.txt", "--plan", cli_plan, "--calib", model_dir / "calib.txt",
              "--seq-len", "16", "--windows", "2", "--json")
    kl = {}
    for value in (None, "0.5", "0"):
        r = run_cli(cli_env, *common, *(() if value is None else ("--quantizer-setting", f"float_target={value}")))
        assert r.returncode == 0, r.stderr[-3000:]
        kl[value] = json.loads(r.stdout.strip().splitlines()[-1])["kl"]
    assert kl[None] == kl["0.5"] != kl["0"], kl  # calibrated on text supplied: halfway by default
    assert_bad_input(run_cli(cli_env, *common, "--quantizer-setting", "dampp=0.1"),
                     "awq-gptq quantizer takes no setting 'dampp'", "damp, block_size, act_order")
    assert_bad_input(run_cli(cli_env, *common, "--quantizer-setting", "damp"), "cannot read --quantizer-setting 'damp'")
    out = tmp_path / "ckpt"
    assert_bad_input(run_cli(cli_env, "apply", model_dir, "--plan", cli_plan, "--calib", model_dir / "calib.txt",
                             "--out", out, "--quantizer-setting", "dampp=0.1"), "takes no setting 'dampp'")
    assert not out.exists() and not list(tmp_path.glob(".ckpt*"))


def test_eval_bos_scores_windows_that_start_with_the_tokenizers_bos(model_dir, cli_env, tmp_path):
    """--bos: as llama-perplexity scores a model whose tokenizer adds BOS; a tokenizer without BOS is
    scored as without the flag (nothing to write), and the JSON says which BOS was used."""
    bos_dir = tmp_path / "bos-model"
    shutil.copytree(model_dir, bos_dir)
    make_tokenizer(adds_bos=True).save_pretrained(bos_dir)
    common = ("--text", model_dir / "eval.txt", "--seq-len", "16", "--windows", "2", "--json")

    def scored(where, *flags):
        r = run_cli(cli_env, "eval", where, *common, *flags)
        assert r.returncode == 0, r.stderr[-3000:]
        return json.loads(r.stdout.strip().splitlines()[-1])

    plain, plain_flag = scored(model_dir), scored(model_dir, "--bos")
    assert plain["bos"] is None and plain_flag["bos"] is None and plain_flag["nll"] == plain["nll"]
    with_bos = scored(bos_dir, "--bos")
    assert with_bos["bos"] == make_tokenizer().bos_token_id and with_bos["scored_tokens"] == plain["scored_tokens"]
    assert with_bos["nll"] != plain["nll"]  # the first token of each window is now BOS
    assert scored(bos_dir)["nll"] == plain["nll"]  # without the flag: the text's tokens, as before


def test_show_prints_summary(cli_plan, cli_env):
    r = run_cli(cli_env, "show", cli_plan)
    assert r.returncode == 0, r.stderr
    plan = Plan.load(cli_plan)
    text = " ".join(r.stdout.split())
    assert f"storage {plan.summary.storage_bits_per_weight:.4f} bits/weight" in text
    assert f"{plan.summary.planned_modules} modules" in text


# ---- the headline command: no --calib, default ties, whole-model size --------------------------


@pytest.fixture(scope="module")
def headline_model_dir(model_dir, tmp_path_factory):
    """model_dir's tiny Llama with a 1024-token context, so the default 512-token windows fit (a context
    shorter than --seq-len is refused); same weights, since Llama has no learned position embeddings."""
    d = tmp_path_factory.mktemp("tiny-llama-1k")
    for f in model_dir.iterdir():
        shutil.copy(f, d / f.name)
    config = json.loads((d / "config.json").read_text())
    config["max_position_embeddings"] = 1024
    (d / "config.json").write_text(json.dumps(config))
    return d


@pytest.fixture(scope="module")
def headline(headline_model_dir, cli_env, tmp_path_factory):
    """`bitalloc plan --budget 3.2bits MODEL` exactly as the README gives it (writes ./plan.json)."""
    cwd = tmp_path_factory.mktemp("headline")
    r = run_cli(cli_env, "plan", "--budget", "3.2bits", headline_model_dir, cwd=cwd)
    assert r.returncode == 0, r.stderr[-3000:]
    return cwd / "plan.json", " ".join(r.stdout.split())


def test_headline_plan_uses_the_builtin_calibration_set(headline):
    import hashlib
    from importlib.resources import files

    path, stdout = headline
    doc = json.loads(path.read_text(encoding="utf-8"))
    jsonschema.validate(doc, json.loads(SCHEMA_PATH.read_text(encoding="utf-8")))
    plan = Plan.load(path)
    text = (files("bitalloc") / "data" / "calibration" / "austen.txt").read_bytes()
    assert plan.calibration["source"] == "builtin:austen"
    assert plan.calibration["text_sha256"] == "sha256:" + hashlib.sha256(text).hexdigest()
    assert plan.calibration["tokens"] == 8192 and plan.calibration["seq_len"] == 512 and plan.calibration["seed"] == 0
    assert plan.summary.storage_bits_per_weight <= 3.2 and plan.budget.scope == "planned"


def test_headline_plan_ties_what_serving_stacks_fuse(headline):
    path, stdout = headline
    plan = Plan.load(path)
    by = {a.module: a.label for a in plan.assignments}
    for layer in range(2):
        p = f"model.layers.{layer}"
        assert len({by[f"{p}.self_attn.{x}_proj"] for x in "qkv"}) == 1
        assert by[f"{p}.mlp.gate_proj"] == by[f"{p}.mlp.up_proj"]
    assert plan.summary.ties == {"gate_up": 2, "qkv": 2}
    assert plan.constraints["ties"] == ["fused"]
    assert "ties: 2 gate/up, 2 q/k/v groups share one option (default --tie fused" in stdout


def test_headline_plan_reports_the_whole_model(headline):
    path, stdout = headline
    s = Plan.load(path).summary
    model = make_llama()
    params = sum(p.numel() for p in model.parameters())  # tied embedding counted once
    assert s.unplanned_weights == params - s.planned_weights
    assert s.unplanned_weights >= model.model.embed_tokens.weight.numel()  # embedding (= head) + norms
    assert s.unplanned_bytes == 2 * s.unplanned_weights and s.model_bytes == s.storage_bytes + s.unplanned_bytes
    assert f"whole model {s.model_bytes / 1e6:.2f} MB = planned weights {s.storage_bytes / 1e6:.2f} MB" in stdout


def test_default_plan_applies_with_default_flags_and_reloads(headline, headline_model_dir, cli_env, tmp_path):
    pytest.importorskip("compressed_tensors")
    from test_checkpoint import load_with_model_compressor

    path, _ = headline
    out = tmp_path / "ck"
    # the model the plan was made for: rtn-w rebuilds its 512-token windows, longer than model_dir's context
    r = run_cli(cli_env, "apply", headline_model_dir, "--plan", path, "--out", out)
    assert r.returncode == 0, r.stderr[-3000:]
    plan = Plan.load(path)
    reloaded = load_with_model_compressor(out, make_llama)
    loaded = bitalloc.models.load_model(str(headline_model_dir))
    simulated = bitalloc.apply(loaded.model, plan, tokenizer=loaded.tokenizer)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, simulated(ids).logits)


def test_tie_none_lifts_the_default_ties(model_dir, cli_env, tmp_path):
    out = tmp_path / "untied.json"
    r = plan_with(cli_env, model_dir, out, "--budget", "3.2bits", "--tie", "none")
    assert r.returncode == 0, r.stderr[-3000:]
    plan = Plan.load(out)
    assert plan.summary.ties == {} and plan.constraints is None
    assert "ties: none (lifted (--tie none))" in " ".join(r.stdout.split())
    r = plan_with(cli_env, model_dir, out, "--budget", "3.2bits", "--tie", "none", "--tie", "fused")
    assert_bad_input(r, "--tie none lifts every tie")


def test_whole_model_budget_is_solved_with_unplanned_bytes_fixed(model_dir, cli_env, tmp_path):
    out = tmp_path / "model.json"
    r = plan_with(cli_env, model_dir, out, "--budget", "0.07MB", "--budget-scope", "model")
    assert r.returncode == 0, r.stderr[-3000:]
    plan = Plan.load(out)
    s = plan.summary
    assert plan.budget.scope == "model" and plan.budget.max_storage_bits == 0.07e6 * 8 - 16 * s.unplanned_weights
    assert s.model_bytes <= 70_000 < s.unplanned_bytes + s.fp16_bytes
    planned = tmp_path / "planned.json"  # the same number over the planned weights alone allows more
    assert plan_with(cli_env, model_dir, planned, "--budget", "0.07MB").returncode == 0
    assert Plan.load(planned).summary.storage_bytes > s.storage_bytes
    r = plan_with(cli_env, model_dir, out, "--budget", "0.05MB", "--budget-scope", "model")
    assert_bad_input(r, "budget 0.05MB (whole model: unplanned tensors", "at 16 bits included) is below the smallest feasible")
    r = plan_with(cli_env, model_dir, out, "--budget", "3bits", "--budget-scope", "layers")
    assert_bad_input(r, "unknown budget scope 'layers'")




def test_malformed_budget(model_dir, cli_env):
    r = run_cli(cli_env, "plan", model_dir, "--budget", "3.2 parsecs", "--calib", model_dir / "calib.txt", *PLAN_ARGS)
    assert_bad_input(r, "parsecs", "3.2bits")


def test_negative_budget(model_dir, cli_env):
    r = run_cli(cli_env, "plan", model_dir, "--budget", "-1bits", "--calib", model_dir / "calib.txt", *PLAN_ARGS)
    assert_bad_input(r, "'-1bits'", "positive")


def test_self_calibration_needs_tokenizer_sized_settings(model_dir, cli_env):
    r = run_cli(cli_env, "plan", model_dir, "--budget", "4bits", "--calib", "self", "--calib-tokens", "8", "--seq-len", "16")
    assert_bad_input(r, "tokens >= seq_len")


def test_calibration_file_missing(model_dir, cli_env, tmp_path):
    missing = tmp_path / "nope.txt"
    r = run_cli(cli_env, "plan", model_dir, "--budget", "4bits", "--calib", missing, *PLAN_ARGS)
    assert_bad_input(r, str(missing), "does not exist")


def test_model_path_missing(model_dir, cli_env, tmp_path):
    missing = tmp_path / "no-such-model"
    r = run_cli(cli_env, "plan", missing, "--budget", "4bits", "--calib", model_dir / "calib.txt", *PLAN_ARGS)
    assert_bad_input(r, str(missing), "does not exist")


def test_infeasible_budget(model_dir, cli_env, tmp_path):
    out = tmp_path / "p.json"
    r = run_cli(cli_env, "plan", model_dir, "--budget", "1bits", "--calib", model_dir / "calib.txt", *PLAN_ARGS,
                "--out", out)
    msg = assert_bad_input(r, "1bits", "smallest feasible", "16bits")
    assert not out.exists()  # nothing written on failure
    # the smallest feasible budget in the message is a real number above the request
    smallest = float(msg.split("smallest feasible ")[1].split("bits")[0])
    assert 2.0 < smallest < 3.0


def test_show_newer_schema_version(cli_plan, cli_env, tmp_path):
    doc = json.loads(cli_plan.read_text(encoding="utf-8"))
    doc["schema_version"] = 2
    p = tmp_path / "future.json"
    p.write_text(json.dumps(doc), encoding="utf-8")
    r = run_cli(cli_env, "show", p)
    assert_bad_input(r, "schema version 2", "upgrade")


def test_eval_with_plan_for_other_model(model_dir, cli_env, tmp_path, calib_ids):
    # rtn: an rtn-w plan calibrated on ids given in Python is refused before the weights are compared
    other = bitalloc.plan(make_llama(seed=1), "4bits", calib_ids, cache_dir=False, quantizer="rtn")
    p = other.save(tmp_path / "other.json")
    r = run_cli(cli_env, "eval", model_dir, "--text", model_dir / "eval.txt", "--plan", p,
                "--seq-len", "16", "--windows", "2", "--json")
    assert_bad_input(r, "plan was made for weights", other.model.content_hash[:19])
    assert r.stdout.strip() == ""  # no result printed


def test_error_message_is_exactly_one_line(model_dir, cli_env):
    r = run_cli(cli_env, "plan", model_dir, "--budget", "3.2 parsecs", "--calib", model_dir / "calib.txt", *PLAN_ARGS)
    assert r.returncode == 2
    assert r.stderr.startswith("error:")
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


@pytest.mark.parametrize("flag, value, needle", [
    ("--bits", "9", "int bits must be 2..8"),
    ("--bits", "four", "cannot read --bits"),
    ("--group-sizes", "0", "group_size must be positive"),
    ("--group-sizes", "32,big", "cannot read --group-sizes"),
])
def test_bad_option_grid_is_bad_input(model_dir, cli_env, flag, value, needle):
    r = run_cli(cli_env, "plan", model_dir, "--budget", "4bits", "--calib", model_dir / "calib.txt", *PLAN_ARGS,
                flag, value)
    assert_bad_input(r, needle)


@pytest.mark.parametrize("args, needles", [
    (("--formats", "int,fp9"), ["'fp9'", "choose from int, fp8"]),
    (("--target", "tpu"), ["'tpu'", "cpu, a100, h100, h200, b200, llama.cpp, any"]),
    (("--target", "h100", "--formats", "int,nvfp4"), ["nvfp4 not supported on target 'h100'", "allows int, fp8, keep"]),
    (("--formats", "keep", "--no-keep"), ["no options left"]),
])
def test_bad_formats_or_target_is_bad_input(model_dir, cli_env, args, needles):
    r = run_cli(cli_env, "plan", model_dir, "--budget", "4bits", "--calib", model_dir / "calib.txt", *PLAN_ARGS, *args)
    assert_bad_input(r, *needles)


def test_plan_with_target_offers_its_formats(model_dir, cli_env, tmp_path):
    out = tmp_path / "p.json"
    r = run_cli(cli_env, "plan", model_dir, "--budget", "6bits", "--calib", model_dir / "calib.txt", *PLAN_ARGS,
                "--target", "b200", "--formats", "fp8,mxfp4,nvfp4,keep", "--group-sizes", "ch", "--out", out)
    assert r.returncode == 0, r.stderr[-3000:]
    plan = Plan.load(out)
    assert sorted(plan.options) == sorted(["fp8e4m3-tensor", "fp8e4m3-ch", "fp8e5m2-tensor", "fp8e5m2-ch", "mxfp4", "nvfp4", "fp16"])
    assert {a.option.fmt for a in plan.assignments} <= {"fp", "keep"}
    assert plan.summary.storage_bits_per_weight <= 6.0


# ---- constraints, solvers, sweeps (issue 4) ---------------------------------------------------

# These share the module's private profile cache (no --no-cache): one profile per module set.
CACHED_ARGS = ("--calib-tokens", "64", "--seq-len", "16")


def plan_with(cli_env, model_dir, out, *extra):
    r = run_cli(cli_env, "plan", model_dir, "--calib", model_dir / "calib.txt", *CACHED_ARGS, "--out", out, *extra)
    return r


def test_constraint_flags_are_honoured(model_dir, cli_env, tmp_path):
    out = tmp_path / "c.json"
    r = plan_with(cli_env, model_dir, out, "--budget", "5bits", "--include-lm-head", "--min-bits", "4", "--max-bits", "6",
                  "--pin", "lm_head=int8-ch-sym", "--tie", "fused")
    assert r.returncode == 0, r.stderr[-3000:]
    plan = Plan.load(out)
    by = {a.module: a for a in plan.assignments}
    assert by["lm_head"].label == "int8-ch-sym"  # the pin wins over --max-bits
    assert all(4 <= a.option.bits <= 6 for m, a in by.items() if m != "lm_head")
    for layer in range(2):
        p = f"model.layers.{layer}"
        assert len({by[f"{p}.self_attn.{x}_proj"].label for x in "qkv"}) == 1
        assert by[f"{p}.mlp.gate_proj"].label == by[f"{p}.mlp.up_proj"].label
    assert plan.constraints == {"allow": [], "max_bits": 6, "max_latency": None, "min_bits": 4,
                                "pins": [["lm_head", "int8-ch-sym"]], "ties": ["fused"]}
    assert plan.summary.storage_bits_per_weight <= 5.0


@pytest.mark.parametrize("extra, needles", [
    (("--min-bits", "6", "--max-bits", "4"), ["has no option left after --min-bits 6 --max-bits 4", "model.layers.0"]),
    (("--pin", "nomatch=fp16"), ["pin 'nomatch=fp16' matches no module"]),
    (("--pin", "q_proj"), ["cannot read --pin 'q_proj'", "REGEX=VALUE"]),
    (("--tie", "lm_head"), ["tie 'lm_head' matches no two modules"]),
    (("--solver-setting", "trials"), ["cannot read --solver-setting 'trials'"]),
    (("--solver-setting", "trials=5"), ["solver ilp has no setting trials"]),
    (("--max-bits", "2", "--no-keep"), ["below the smallest feasible", "under these constraints"]),
])
def test_constraint_errors_name_the_constraint(model_dir, cli_env, tmp_path, extra, needles):
    out = tmp_path / "x.json"
    r = plan_with(cli_env, model_dir, out, "--budget", "1.5bits" if "--no-keep" in extra else "4bits", *extra)
    assert_bad_input(r, *needles)
    assert not out.exists()


def test_budget_or_pareto_exactly_one(model_dir, cli_env, tmp_path):
    r = plan_with(cli_env, model_dir, tmp_path / "x.json")
    assert_bad_input(r, "exactly one of --budget", "--pareto")
    r = plan_with(cli_env, model_dir, tmp_path / "x.json", "--budget", "4bits", "--pareto", "3:5:1bits")
    assert_bad_input(r, "exactly one of --budget")
    r = plan_with(cli_env, model_dir, tmp_path / "x.json", "--pareto", "5:3:1bits")
    assert_bad_input(r, "STOP >= START")


def test_pareto_writes_one_plan_per_point_and_a_plot(model_dir, cli_env, tmp_path):
    folder = tmp_path / "sweep"
    r = plan_with(cli_env, model_dir, folder, "--pareto", "3.0:5.0:1.0bits", "--solver", "lagrangian")
    assert r.returncode == 0, r.stderr[-3000:]
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["pareto.json", "pareto.png", "plan-3.00bits.json", "plan-4.00bits.json", "plan-5.00bits.json"]
    plans = [Plan.load(folder / f"plan-{b}.00bits.json") for b in (3, 4, 5)]
    losses = [p.summary.predicted_delta_loss for p in plans]
    assert losses[0] > losses[1] > losses[2]
    assert all(p.summary.storage_bits_per_weight <= b for p, b in zip(plans, (3, 4, 5)))
    assert (folder / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = " ".join(r.stdout.split())
    for b in (3, 4, 5):
        assert f"| {b}.00bits |" in text
    points = json.loads((folder / "pareto.json").read_text())["points"]
    assert [p["on_frontier"] for p in points] == [True, True, True]
    assert [p["model_bytes"] for p in points] == [p.summary.model_bytes for p in plans]  # whole model per point
    assert f"| {plans[0].summary.model_bytes / 1e6:.2f} |" in text


@pytest.mark.parametrize("solver, settings", [("lagrangian", ()), ("dp", ("--solver-setting", "resolution_bits=64")),
                                              ("ilp", ("--solver-setting", "backend=highs"))])
def test_every_solver_from_the_command_line(model_dir, cli_env, tmp_path, cli_plan, solver, settings):
    out = tmp_path / f"{solver}.json"
    r = plan_with(cli_env, model_dir, out, "--budget", "4bits", "--solver", solver, *settings)
    assert r.returncode == 0, r.stderr[-3000:]
    plan, exact = Plan.load(out), Plan.load(cli_plan)
    assert plan.solver.name == solver and plan.summary.storage_bits_per_weight <= 4.0
    # never better than the exact ilp plan, and within the gap it reports
    assert plan.solver.objective >= exact.solver.objective * (1 - 1e-5)
    if plan.solver.bound is not None:
        assert plan.solver.bound <= exact.solver.objective * (1 + 1e-5)


def test_evolutionary_plans_are_byte_identical(model_dir, cli_env, tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    args = ("--budget", "4bits", "--solver", "evolutionary", "--solver-setting", "trials=6",
            "--solver-setting", "population=3")
    for out in (a, b):
        r = plan_with(cli_env, model_dir, out, *args)
        assert r.returncode == 0, r.stderr[-3000:]
    assert a.read_bytes() == b.read_bytes()
    plan = Plan.load(a)
    assert plan.solver.settings["score"] == "mean NLL on 4x16 calibration tokens"
    assert plan.solver.details["warm_start"] == "ilp" and plan.solver.details["improvement"] >= 0
    assert plan.solver.settings["trials"] == 6


def test_solvers_lists_one_line_each(cli_env):
    r = run_cli(cli_env, "solvers")
    assert r.returncode == 0
    lines = r.stdout.strip().splitlines()
    assert [line.split()[0] for line in lines] == sorted(bitalloc.solvers.available_solvers())
    assert {"ilp", "lagrangian", "dp", "evolutionary"} <= {line.split()[0] for line in lines}


def test_a_size_budget_of_a_llama_cpp_file_is_the_whole_file_unless_scoped():
    from bitalloc.cli import _scoped
    from bitalloc.errors import BadInputError

    assert [b.scope for b in _scoped(["95MB", "4.5bits", "30%"], None, True)] == ["model", "planned", "planned"]
    assert [b.scope for b in _scoped(["95MB", "4.5bits"], None, False)] == ["planned", "planned"]
    assert [b.scope for b in _scoped(["95MB", "4.5bits"], "planned", True)] == ["planned", "planned"]
    assert [b.scope for b in _scoped(["95MB", "4.5bits"], "model", False)] == ["model", "model"]
    with pytest.raises(BadInputError, match="unknown budget scope 'file'"):
        _scoped(["95MB"], "file", True)


def test_library_warnings_print_as_one_line_naming_the_fix(model_dir, cli_env, tmp_path):
    """Calibration text full of `<unk>` placeholders (a tokenized corpus's release) still plans, and the warning
    reads like the CLI's errors: one `warning:` line with the count and the fix, no source path or code line."""
    words = (model_dir / "calib.txt").read_text(encoding="utf-8").split()
    calib = tmp_path / "valid.tokens"
    calib.write_text(" ".join(w if i % 10 else "<unk>" for i, w in enumerate(words)), encoding="utf-8")
    r = run_cli(dict(cli_env, PYTHONWARNINGS="default"), "plan", model_dir, "--budget", "4bits", "--calib", calib,
                *PLAN_ARGS, "--out", tmp_path / "p.json")
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [line for line in r.stderr.splitlines() if "placeholders" in line]
    assert len(lines) == 1 and lines[0].startswith(f"warning: calibration text valid.tokens: {len(words[::10])} '<unk>'"), r.stderr[-2000:]
    assert "sed 's/ <unk>//g'" in lines[0] and "UserWarning" not in r.stderr
