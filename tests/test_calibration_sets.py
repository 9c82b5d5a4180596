"""The calibration used when none is given (the built-in set) and the data-free one (`self`)."""

from __future__ import annotations

import hashlib
from importlib.resources import files

import pytest
import torch

import bitalloc
from bitalloc.api import resolve_calibration
from bitalloc.calibration import builtin_text
from bitalloc.calibration_self import PROMPTS, self_calibration
from bitalloc.errors import BadInputError
from bitalloc.models import LoadedModel

from conftest import make_llama, make_tokenizer


def test_builtin_set_ships_with_its_license_and_is_large_enough():
    folder = files("bitalloc") / "data" / "calibration"
    text = builtin_text()
    assert text == (folder / "austen.txt").read_text(encoding="utf-8")
    # 8192 tokens need ~33 KB of English at ~4 characters per token; keep a wide margin for other tokenizers
    assert 300_000 < len(text.encode("utf-8")) < 600_000 and text.isascii()
    notice = (folder / "README.md").read_text(encoding="utf-8")
    assert "public domain" in notice and "janeaustenr" in notice
    with pytest.raises(BadInputError, match="no built-in calibration set 'wiki'"):
        builtin_text("wiki")


def test_no_calibration_means_the_builtin_set():
    loaded = LoadedModel(model=make_llama(), tokenizer=make_tokenizer(), source="tiny")
    calib = resolve_calibration(None, loaded, seq_len=16, tokens=64, seed=0)
    assert calib.source == "builtin:austen" and calib.tokens.shape == (4, 16)
    assert calib.text_sha256 == "sha256:" + hashlib.sha256(builtin_text().encode("utf-8")).hexdigest()


def test_self_calibration_is_deterministic_per_seed_and_ordinary_text():
    model, tok = make_llama(), make_tokenizer()
    a = self_calibration(model, tok, seq_len=24, tokens=96, seed=3)
    b = self_calibration(model, tok, seq_len=24, tokens=96, seed=3)
    c = self_calibration(model, tok, seq_len=24, tokens=96, seed=4)
    assert a.tokens.shape == (4, 24) and a.tokens.dtype == torch.int64
    assert torch.equal(a.tokens, b.tokens) and a.text_sha256 == b.text_sha256
    assert not torch.equal(a.tokens, c.tokens) and a.text_sha256 != c.text_sha256
    # each window: BOS, its prompt (cycled), then samples that are never special tokens
    for i, window in enumerate(a.tokens.tolist()):
        prompt = [tok.bos_token_id] + tok(PROMPTS[i % len(PROMPTS)], add_special_tokens=False).input_ids
        assert window[:len(prompt)] == prompt
        assert not set(window[len(prompt):]) & set(tok.all_special_ids)
    s = a.settings()
    assert s["source"] == "self" and s["seed"] == 3 and "temperature 1.0" in s["sampling"] and s["tokens"] == 96
    assert not model.training


def test_plan_with_self_calibration_records_it():
    plan = bitalloc.plan(make_llama(), "4bits", "self", tokenizer=make_tokenizer(), seq_len=16, calib_tokens=32, seed=5,
                         cache_dir=False)
    assert plan.calibration["source"] == "self" and plan.calibration["seed"] == 5 and plan.calibration["windows"] == 2
    assert plan.summary.storage_bits_per_weight <= 4.0
