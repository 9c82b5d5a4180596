"""bench/paired.py: the difference between two scored plans and its paired standard error over test windows."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "bench"))
from paired import comparison_rows, paired_difference  # noqa: E402


def test_paired_difference_is_the_mean_and_its_standard_error():
    mean, se = paired_difference([1.0, 2.0, 4.0], [0.5, 1.0, 2.0])  # differences 0.5, 1, 2
    assert mean == pytest.approx(3.5 / 3)
    sd = math.sqrt(sum((d - 3.5 / 3) ** 2 for d in (0.5, 1.0, 2.0)) / 2)
    assert se == pytest.approx(sd / math.sqrt(3))


def test_a_shift_shared_by_every_window_is_significant_though_windows_vary_widely():
    base = {"variant": "u", "model": "m", "bpw": 4.0, "window_nll": [1.0, 3.0, 2.0, 5.0], "window_kl": [0.1, 0.3, 0.2, 0.5]}
    plan = {**base, "variant": "p", "window_nll": [x + 0.01 + 0.001 * i for i, x in enumerate(base["window_nll"])]}
    rows = {r[0]: r for r in comparison_rows([base, plan], "u", None)}
    assert rows["p"][4].startswith("+0.0115") and rows["p"][4].endswith("*")
    assert rows["p"][5] == "+0.0000 ± 0.0000 "  # same KL in every window: no difference, not marked
    first_two = {r[0]: r for r in comparison_rows([base, plan], "u", 2)}
    assert first_two["p"][4].startswith("+0.0105")
    with pytest.raises(SystemExit, match="no row with variant 'x'"):
        comparison_rows([base], "x", None)
