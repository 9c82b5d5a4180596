"""Execute notebooks/quickstart.ipynb on a small slice so it never rots (needs SmolLM2, like the slow test)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GGUF = os.environ.get("BITALLOC_SMOLLM2_GGUF", "")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path(GGUF).is_file(), reason="set BITALLOC_SMOLLM2_GGUF (scripts/fetch_smollm2.sh)"),
]


def test_quickstart_notebook_runs_and_saves_a_valid_plan(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(ROOT / "notebooks" / "quickstart.ipynb", as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "commit notebooks with outputs cleared"
    monkeypatch.setenv("OMP_NUM_THREADS", str(os.cpu_count() or 1))  # the kernel runs a 135M model
    monkeypatch.setenv("BITALLOC_ROOT", str(ROOT))
    monkeypatch.setenv("BITALLOC_NB_OUT", str(tmp_path))
    monkeypatch.setenv("BITALLOC_CACHE_DIR", str(tmp_path / "cache"))
    nbclient.NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    from bitalloc.plan import Plan

    plan = Plan.load(tmp_path / "smollm2-3.5bits.json")
    assert plan.summary.storage_bits_per_weight <= 3.5
    printed = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
    assert "KL" in printed and "top-1" in printed
