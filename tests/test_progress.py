"""progress.py: loops report stage and counts to the context's callback; nothing global is swapped."""

from __future__ import annotations

import threading

from bitalloc import progress
from bitalloc.calibration import calibration_from_tokens
from bitalloc.models import select_modules
from bitalloc.options import QuantOption
from bitalloc.profile.statistics import collect_statistics
from bitalloc.candidates import build_candidate_table

from conftest import make_llama


def test_profiling_loops_report_their_stages_and_counts(calib_ids):
    model = make_llama()
    names = select_modules(model)
    seen: list[tuple[str, int, int]] = []
    with progress.reporting(lambda stage, done, total: seen.append((stage, done, total))):
        stats = collect_statistics(model, names, calibration_from_tokens(calib_ids))
        build_candidate_table(model, names, stats, [QuantOption.int_(4, 32, False)])
    windows = calib_ids.shape[0]
    assert [s for s in seen if s[0] == "calibration windows"] == [("calibration windows", i, windows)
                                                                  for i in range(windows + 1)]
    assert [s for s in seen if s[0] == "candidate errors"] == [("candidate errors", i, len(names))
                                                               for i in range(len(names) + 1)]
    seen.clear()
    collect_statistics(model, names, calibration_from_tokens(calib_ids))  # outside the block: nobody is told
    assert seen == []


def test_a_callback_reaches_only_its_own_thread():
    got: dict[str, list] = {"main": [], "other": []}

    def run(who: str, n: int) -> None:
        with progress.reporting(lambda stage, done, total: got[who].append((stage, done, total))):
            list(progress.steps(range(n), who, show=False))

    t = threading.Thread(target=run, args=("other", 3))
    with progress.reporting(lambda stage, done, total: got["main"].append((stage, done, total))):
        t.start()
        list(progress.steps(range(2), "main", show=False))
        t.join()
    assert got == {"main": [("main", 0, 2), ("main", 1, 2), ("main", 2, 2)],
                   "other": [("other", i, 3) for i in range(4)]}
