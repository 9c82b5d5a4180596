"""bench/rotation.py: the rotation matrices are orthogonal, and a rotated model computes the function it computed."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from conftest import make_gemma3, make_llama, make_qwen2

sys.path.insert(0, str(Path(__file__).parent.parent / "bench"))
from rotation import hadamard, rotate, rotation_matrix  # noqa: E402


@pytest.mark.parametrize("n", [12, 48, 64, 576])
def test_hadamard_matrices_are_orthonormal_with_equal_magnitude_entries(n):
    h = hadamard(n)
    assert torch.allclose(h @ h.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(h.abs(), torch.full((n, n), n ** -0.5, dtype=torch.float64))


def test_an_order_without_a_construction_is_refused():
    with pytest.raises(SystemExit, match="order 40"):
        hadamard(40)


@pytest.mark.parametrize("kind", ["hadamard", "random"])
def test_rotation_matrices_are_orthogonal_and_seeded(kind):
    q = rotation_matrix(48, kind, seed=3)
    assert torch.allclose(q @ q.T, torch.eye(48, dtype=torch.float64), atol=1e-12)
    assert torch.equal(q, rotation_matrix(48, kind, seed=3)) and not torch.equal(q, rotation_matrix(48, kind, seed=4))


@pytest.mark.parametrize("make", [make_llama, make_qwen2])
def test_a_rotated_model_gives_the_same_logits_from_different_weights(make):
    model = make()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # norm gains far from 1, so that folding them matters
        for name, module in model.named_modules():
            if name.endswith("norm"):
                module.weight.copy_(torch.rand(module.weight.shape, generator=g) * 2 + 0.05)
    ids = torch.randint(3, model.config.vocab_size, (2, 24), generator=g)
    before = model(ids).logits
    q_proj = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    rotate(model, rotation_matrix(64, "hadamard", seed=0))
    after = model(ids).logits
    assert torch.allclose(after, before, atol=1e-4, rtol=1e-4)
    assert (model.model.layers[0].self_attn.q_proj.weight - q_proj).abs().max() > 0.1 * q_proj.abs().max()
    assert model.lm_head.weight is not model.model.embed_tokens.weight and not model.config.tie_word_embeddings
    assert all(torch.all(m.weight == 1) for n, m in model.named_modules() if n.endswith("norm"))


def test_sandwich_norms_are_refused():
    with pytest.raises(SystemExit, match="sandwich"):
        rotate(make_gemma3(), torch.eye(64, dtype=torch.float64))
