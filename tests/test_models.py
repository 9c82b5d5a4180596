"""Model sources: local directory, .gguf path checks, hub ids offline; weight hashing."""

from __future__ import annotations

import pytest
import torch

from bitalloc.errors import BadInputError
from bitalloc.models import load_model, select_modules, weights_hash

from conftest import make_llama


def test_local_directory_loads_model_and_tokenizer(model_dir):
    loaded = load_model(str(model_dir))
    assert type(loaded.model).__name__ == "LlamaForCausalLM"
    assert loaded.tokenizer("the quick fox", add_special_tokens=False).input_ids  # a working tokenizer
    # the saved weights come back bit for bit, so the hash equals the in-memory model's
    assert loaded.content_hash == weights_hash(make_llama())
    assert len(select_modules(loaded.model)) == 2 * 7


def test_hub_id_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BadInputError, match="could not load model 'no-such-org/no-such-model'.*local directory or .gguf"):
        load_model("no-such-org/no-such-model")


def test_missing_gguf_file(tmp_path):
    with pytest.raises(BadInputError, match="GGUF file .* does not exist"):
        load_model(str(tmp_path / "model.gguf"))


def test_directory_without_config_or_single_gguf(tmp_path):
    (tmp_path / "a.gguf").write_bytes(b"")
    (tmp_path / "b.gguf").write_bytes(b"")
    with pytest.raises(BadInputError, match=r"not exactly one \.gguf file \(found: a\.gguf, b\.gguf\)"):
        load_model(str(tmp_path))


def test_missing_local_path(tmp_path):
    with pytest.raises(BadInputError, match="does not exist"):
        load_model(str(tmp_path / "nothing-here"))


def test_weights_hash_sees_one_changed_weight_also_through_a_tied_name():
    a, b = make_llama(), make_llama()
    assert weights_hash(a) == weights_hash(b)
    with torch.no_grad():
        b.model.layers[1].mlp.down_proj.weight[3, 5] += 1e-3
    assert weights_hash(a) != weights_hash(b)
    # tied: lm_head.weight is model.embed_tokens.weight, so a change through the head is seen
    c = make_llama()
    with torch.no_grad():
        c.lm_head.weight[0, 0] += 1.0
    assert c.model.embed_tokens.weight[0, 0] == c.lm_head.weight[0, 0]
    assert weights_hash(c) != weights_hash(a)
