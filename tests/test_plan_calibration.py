"""A plan's calibration windows rebuilt from what it recorded (calibration.calibration_for_plan).

Quantizers with layer Hessians (rtn-w, gptq, imatrix) need the plan's calibration again at apply/eval
time: a built-in or self plan rebuilds it with no --calib, a file plan needs the file (same sha256),
and every path uses the plan's recorded seq_len, tokens and seed.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import bitalloc
from bitalloc.apply import apply
from bitalloc.calibration import builtin_text, calibration_for_plan, make_calibration, text_sha256, tokenize
from bitalloc.calibration_self import self_calibration
from bitalloc.cli import main
from bitalloc.errors import BadInputError, CalibrationMismatchError
from bitalloc.models import load_model, weight_matrix
from conftest import CALIB_TEXT, make_tokenizer

SETTINGS = dict(seq_len=16, calib_tokens=64, seed=3, cache_dir=False)
BUILTIN_FILE = Path(bitalloc.__file__).parent / "data" / "calibration" / "austen.txt"


@pytest.fixture(scope="module")
def loaded(model_dir):
    return load_model(str(model_dir))


@pytest.fixture(scope="module")
def builtin_plan(loaded, model_dir, tmp_path_factory) -> Path:
    plan = bitalloc.plan(loaded, "4bits", quantizer="rtn-w", **SETTINGS)
    assert plan.calibration["source"] == "builtin:austen" and plan.quantizer == "rtn-w"
    return plan.save(tmp_path_factory.mktemp("plans") / "builtin.json")


@pytest.fixture(scope="module")
def file_plan(loaded, model_dir, tmp_path_factory) -> Path:
    plan = bitalloc.plan(loaded, "4bits", model_dir / "calib.txt", quantizer="gptq", **SETTINGS)
    assert plan.calibration["source"] == "calib.txt"
    return plan.save(tmp_path_factory.mktemp("plans") / "file.json")


def _weights(model, plan) -> dict[str, torch.Tensor]:
    return {a.module: weight_matrix(model.get_submodule(a.module)).detach().clone() for a in plan.assignments}


@pytest.fixture
def cli(monkeypatch, capsys):
    """Run the command line in this process as `bitalloc ARGS` does: (exit code, stdout + stderr)."""

    def run(*args) -> tuple[int, str]:
        monkeypatch.setattr(sys, "argv", ["bitalloc", *map(str, args)])
        try:
            main()
            code = 0
        except SystemExit as e:
            code = e.code
        captured = capsys.readouterr()
        return code, captured.out + captured.err

    return run


def _json(out: str) -> dict:
    """The one JSON object a --json command printed (progress bars share the output)."""
    return json.loads(out[out.index('{"'):].splitlines()[0])


def test_builtin_plan_rebuilds_its_windows_with_the_recorded_settings(loaded, builtin_plan):
    plan = bitalloc.Plan.load(builtin_plan)
    calib = calibration_for_plan(plan.calibration, loaded.tokenizer, loaded.model)
    expected = make_calibration(loaded.tokenizer, builtin_text(), seq_len=16, tokens=64, seed=3)
    assert torch.equal(calib.tokens, expected.tokens) and calib.settings() == plan.calibration
    # The same windows as passing the shipped text itself, and a different seed would pick others.
    explicit = calibration_for_plan(plan.calibration, loaded.tokenizer, loaded.model, BUILTIN_FILE)
    assert torch.equal(explicit.tokens, calib.tokens)
    assert not torch.equal(make_calibration(loaded.tokenizer, builtin_text(), seq_len=16, tokens=64, seed=0).tokens,
                           calib.tokens)


def test_builtin_rtn_w_plan_applies_without_calib_to_the_explicit_weights(loaded, builtin_plan, tmp_path, cli):
    plan = bitalloc.Plan.load(builtin_plan)
    ids = make_calibration(loaded.tokenizer, builtin_text(), seq_len=16, tokens=64, seed=3).tokens
    rebuilt = _weights(apply(copy.deepcopy(loaded.model), plan, tokenizer=loaded.tokenizer), plan)
    explicit = _weights(apply(copy.deepcopy(loaded.model), plan, calibration=ids), plan)
    rtn = _weights(apply(copy.deepcopy(loaded.model), plan, quantizer="rtn"), plan)
    assert all(torch.equal(rebuilt[n], explicit[n]) for n in rebuilt)
    assert any(not torch.equal(rebuilt[n], rtn[n]) for n in rebuilt)  # rtn-w's scales, not rtn's

    # The command line: apply with no --calib writes exactly the checkpoint of --calib <the shipped text>.
    model_dir = Path(plan.model.source)
    code, out = cli("apply", model_dir, "--plan", builtin_plan, "--out", tmp_path / "a", "--json")
    assert code == 0, out
    code, out = cli("apply", model_dir, "--plan", builtin_plan, "--out", tmp_path / "b", "--json", "--calib", BUILTIN_FILE)
    assert code == 0, out
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_builtin_plan_evals_without_calib(builtin_plan, model_dir, cli):
    base = ("eval", model_dir, "--text", model_dir / "eval.txt", "--plan", builtin_plan, "--seq-len", "16",
            "--windows", "2", "--json")
    scores = []
    for extra in ((), ("--calib", BUILTIN_FILE), ("--quantizer", "rtn")):
        code, out = cli(*base, *extra)
        assert code == 0, out
        scores.append(_json(out))
    assert scores[0] == scores[1] and scores[0]["kl"] > 0
    assert scores[0]["kl"] != scores[2]["kl"]  # applied with rtn-w


def test_self_plan_rebuilds_its_windows_and_checks_their_hash(loaded):
    plan = bitalloc.plan(loaded, "4bits", "self", quantizer="rtn-w", **SETTINGS)
    expected = self_calibration(loaded.model, loaded.tokenizer, seq_len=16, tokens=64, seed=3)
    calib = calibration_for_plan(plan.calibration, loaded.tokenizer, loaded.model)
    assert torch.equal(calib.tokens, expected.tokens) and calib.text_sha256 == plan.calibration["text_sha256"]
    rebuilt = _weights(apply(copy.deepcopy(loaded.model), plan, tokenizer=loaded.tokenizer), plan)
    explicit = _weights(apply(copy.deepcopy(loaded.model), plan, calibration=expected.tokens), plan)
    assert all(torch.equal(rebuilt[n], explicit[n]) for n in rebuilt)

    other = {**plan.calibration, "text_sha256": "sha256:" + "0" * 64}
    with pytest.raises(CalibrationMismatchError, match=r"sampled again have sha256:[0-9a-f]{64}, the plan's had sha256:0{64}"):
        calibration_for_plan(other, loaded.tokenizer, loaded.model)
    assert torch.equal(calibration_for_plan(other, loaded.tokenizer, loaded.model, check_hash=False).tokens, expected.tokens)


def test_file_plan_without_calib_is_refused(file_plan, model_dir, tmp_path, cli):
    for args in (("apply", model_dir, "--plan", file_plan, "--out", tmp_path / "ck"),
                 ("eval", model_dir, "--text", model_dir / "eval.txt", "--plan", file_plan, "--seq-len", "16", "--windows", "2")):
        code, out = cli(*args)
        assert code == 2, out
        assert "calibrated on the text file 'calib.txt'; pass it as --calib " in out, out
    assert not (tmp_path / "ck").exists()
    # Applied with rtn instead, the plan needs no calibration.
    code, out = cli("eval", model_dir, "--text", model_dir / "eval.txt", "--plan", file_plan, "--seq-len", "16",
                        "--windows", "2", "--quantizer", "rtn", "--json")
    assert code == 0, out


def test_wrong_calib_text_is_refused_naming_both_hashes(file_plan, model_dir, tmp_path, cli):
    plan = bitalloc.Plan.load(file_plan)
    wrong = model_dir / "eval.txt"
    got, want = text_sha256(wrong.read_text()), plan.calibration["text_sha256"]
    base = ("eval", model_dir, "--text", model_dir / "eval.txt", "--plan", file_plan, "--seq-len", "16", "--windows", "2",
            "--json", "--calib", wrong)
    code, out = cli(*base)
    assert code == 2, out
    assert f"calibration text 'eval.txt' has {got}, the plan was calibrated on 'calib.txt' with {want}" in out
    assert "--skip-calib-hash-check" in out
    code, out = cli("apply", model_dir, "--plan", file_plan, "--out", tmp_path / "ck", "--calib", wrong)
    assert code == 2 and got in out and want in out, out
    # Accepting other text on purpose: its windows, with the plan's seq_len, tokens and seed.
    code, out = cli(*base, "--skip-calib-hash-check")
    assert code == 0, out
    right = _json(cli(*base[:-1], model_dir / "calib.txt")[1])
    assert _json(out)["kl"] != right["kl"]


def test_plans_that_cannot_be_rebuilt_say_why(loaded, tmp_path):
    recorded = {"source": "<token ids>", "text_sha256": "sha256:" + "1" * 64, "seq_len": 16, "tokens": 64, "seed": 0}
    with pytest.raises(BadInputError, match=r"calibrated on <token ids> given in Python.*calibration=ids"):
        calibration_for_plan(recorded, loaded.tokenizer, loaded.model)
    with pytest.raises(BadInputError, match="records no calibration source"):
        calibration_for_plan({}, loaded.tokenizer, loaded.model)
    with pytest.raises(BadInputError, match="records no calibration windows"):
        calibration_for_plan({"source": "builtin:austen", "text_sha256": text_sha256(builtin_text())}, loaded.tokenizer)
    other_set = {"source": "builtin:austen", "text_sha256": "sha256:" + "2" * 64, "seq_len": 16, "tokens": 64, "seed": 0}
    with pytest.raises(CalibrationMismatchError, match=r"built-in calibration set 'austen' has sha256:[0-9a-f]{64}, "
                                                       r"the plan was calibrated on sha256:2{64}"):
        calibration_for_plan(other_set, loaded.tokenizer, loaded.model)


def test_windows_start_with_bos_when_the_tokenizer_adds_one(loaded, tmp_path):
    """Gemma/Llama 3 tokenizers start sequences with BOS: every calibration window does too (its first
    token replaced, as llama-imatrix cuts chunks), the calibration records it, and a plan rebuilds the
    windows it recorded; a tokenizer without BOS keeps its windows and its settings (profile keys)."""
    plain, with_bos = make_tokenizer(), make_tokenizer(adds_bos=True)
    bos = with_bos.bos_token_id
    assert with_bos("a b").input_ids[0] == bos and plain("a b").input_ids[0] != bos
    kw = dict(seq_len=16, tokens=64, seed=3)
    before = make_calibration(plain, CALIB_TEXT, **kw)
    after = make_calibration(with_bos, CALIB_TEXT, **kw)
    assert "bos" not in before.settings() and after.settings()["bos"] == bos
    assert (after.tokens[:, 0] == bos).all() and (before.tokens[:, 0] != bos).all()
    assert torch.equal(after.tokens[:, 1:], before.tokens[:, 1:])  # same windows, same text after the first token
    assert (after.held_out[:, 0] == bos).all() and torch.equal(after.held_out[:, 1:], before.held_out[:, 1:])

    # a plan rebuilds the windows it recorded, whichever tokenizer it is given
    text = tmp_path / "calib.txt"
    text.write_text(CALIB_TEXT, encoding="utf-8")
    assert torch.equal(calibration_for_plan(after.settings(), with_bos, text_path=text).tokens, after.tokens)
    older = {k: v for k, v in after.settings().items() if k != "bos"}  # a plan made before windows began with BOS
    assert torch.equal(calibration_for_plan(older, with_bos, text_path=text).tokens, before.tokens)

    # end to end: the plan records it, and its profile differs from the BOS-less one
    plan_bos = bitalloc.plan(dataclasses.replace(loaded, tokenizer=with_bos), "4bits", **SETTINGS)
    plan_plain = bitalloc.plan(loaded, "4bits", **SETTINGS)
    assert plan_bos.calibration["bos"] == bos and "bos" not in plan_plain.calibration
    assert [a.predicted_delta_loss for a in plan_bos.assignments] != [a.predicted_delta_loss for a in plan_plain.assignments]


def test_calibration_text_full_of_unk_placeholders_warns_and_clean_text_does_not():
    """Tokenized corpora (WikiText's tokenized release, PTB) replace rare words with `<unk>`; calibrating on them
    fits the plan to placeholders, so make_calibration warns above 1 % of the words, naming the count and the fix."""
    tok, kw = make_tokenizer(), dict(seq_len=16, tokens=64, seed=3, source="valid.tokens")
    words = CALIB_TEXT.split()
    marked = [w if i % 10 else "<unk>" for i, w in enumerate(words)]
    share = 100 * marked.count("<unk>") / len(words)
    with pytest.warns(UserWarning, match=rf"valid.tokens: {marked.count('<unk>')} '<unk>' placeholders \({share:.1f} %.*sed"):
        make_calibration(tok, " ".join(marked), **kw)
    one = words[:150] + ["<unk>"] + words[150:]  # one placeholder in a long text stays under the 1 % line
    assert 1 / len(one) < 0.01
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make_calibration(tok, CALIB_TEXT, **kw)
        make_calibration(tok, " ".join(one), **kw)


def test_special_token_strings_in_the_text_are_read_as_text_and_recorded(tmp_path):
    """A special token's string in calibration text ("<unk>" in WikiText's tokenized release is Gemma's unknown
    token) is tokenized as characters, as llama-imatrix reads text, not as the special id the model never trained
    on. The calibration records it (only then, so other texts keep their profile keys), and a plan rebuilds the
    windows it was made with: as text when it recorded so, parsed when it was made before this."""
    tok = make_tokenizer()
    words = CALIB_TEXT.split()
    text = " ".join(w if i % 20 else "[EOS]" for i, w in enumerate(words))
    assert tok.eos_token_id not in tokenize(tok, text).tolist()
    assert tok.eos_token_id in tokenize(tok, text, special_as_text=False).tolist()
    kw = dict(seq_len=16, tokens=64, seed=3)
    as_text, parsed = make_calibration(tok, text, **kw), make_calibration(tok, text, special_as_text=False, **kw)
    assert as_text.settings()["special_tokens"] == "text" and "special_tokens" not in parsed.settings()
    assert "special_tokens" not in make_calibration(tok, CALIB_TEXT, **kw).settings()
    path = tmp_path / "calib.txt"
    path.write_text(text, encoding="utf-8")
    assert torch.equal(calibration_for_plan(as_text.settings(), tok, text_path=path).tokens, as_text.tokens)
    older = {k: v for k, v in as_text.settings().items() if k != "special_tokens"}
    assert torch.equal(calibration_for_plan(older, tok, text_path=path).tokens, parsed.tokens)
    assert not torch.equal(as_text.tokens, parsed.tokens)
