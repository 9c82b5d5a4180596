"""bench/token_weights.py: the concentration measures of a token weighting, on weightings whose answers are known."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent.parent / "bench"))
from token_weights import by_kind, concentration  # noqa: E402


def test_equal_weights_count_every_token_and_the_last_one_is_left_out():
    w = torch.ones(4, 50)
    w[:, -1] = 0.0  # what output_gradient_weights gives a window's last token
    m = concentration(w)
    assert m["ess_share"] == pytest.approx(1.0)
    assert m["top1_share"] == pytest.approx(1 / 196)  # 196 scored tokens: the top 1 % is one of them
    assert m["first_token_share"] == pytest.approx(4 / 196)


def test_a_sink_that_carries_the_weight_leaves_one_token_per_window():
    w = torch.full((8, 100), 1e-6)
    w[:, 0] = 1.0
    m = concentration(w)
    assert m["ess_share"] == pytest.approx(8 / (8 * 99), rel=1e-3)  # eight windows: eight effective tokens
    assert m["first_token_share"] == pytest.approx(1.0, abs=1e-3)
    assert m["top1_share"] == pytest.approx(7 / 8, abs=1e-3)  # the top 1 % of 792 tokens is 7 of the 8 sinks


def test_measures_are_medians_over_the_blocks_of_one_kind():
    per_module = {f"model.layers.{b}.self_attn.v_proj": {"ess_share": s} for b, s in enumerate((0.1, 0.5, 0.2))}
    per_module["model.layers.0.mlp.down_proj"] = {"ess_share": 0.9}
    assert by_kind(per_module) == {"self_attn.v_proj": {"ess_share": pytest.approx(0.2)},
                                   "mlp.down_proj": {"ess_share": pytest.approx(0.9)}}
