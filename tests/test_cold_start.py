"""Layering that keeps the command line fast: `bitalloc --help`, `import bitalloc` and re-planning
from a profile folder import neither torch nor transformers, and the solvers are numpy-only.

Each check runs in a fresh interpreter (this test process has torch loaded already) and reads
`sys.modules` there, so an eager import anywhere on the path fails it.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import bitalloc
from bitalloc.api import profile_model
from bitalloc.options import default_options

from conftest import make_llama

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "accelerate", "safetensors", "gguf")
PROBE = """
import json, sys
{body}
print("MODULES=" + json.dumps(sorted(m for m in {heavy!r} if m in sys.modules)))
"""


def heavy_modules_after(body: str, cwd: Path = REPO) -> tuple[list[str], subprocess.CompletedProcess]:
    """Which of HEAVY a fresh interpreter has imported after running `body`."""
    code = PROBE.format(body=body, heavy=HEAVY)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, timeout=120)
    line = [s for s in result.stdout.splitlines() if s.startswith("MODULES=")]
    assert line, result.stdout + result.stderr
    return json.loads(line[-1].removeprefix("MODULES=")), result


def run_cli_body(*args: str) -> str:
    """Run the CLI's main() in-process in the probe interpreter, keeping its exit code."""
    return (f"sys.argv = ['bitalloc', *{list(args)!r}]\n"
            "from bitalloc.cli import main\n"
            "try:\n    main()\nexcept SystemExit as e:\n    print('EXIT=' + str(e.code))\n")


def test_import_and_help_do_not_import_torch():
    loaded, _ = heavy_modules_after("import bitalloc; bitalloc.Plan; bitalloc.parse_budget('4bits')")
    assert loaded == []
    loaded, result = heavy_modules_after(run_cli_body("--help"))
    assert loaded == []
    assert "plan" in result.stdout and "profile" in result.stdout  # the help itself came out


def test_exports_resolve_to_the_api_functions():
    """The lazy package still hands out the functions, not the same-named submodules (bitalloc/plan.py)."""
    import bitalloc.plan  # noqa: F401  (the import system would bind the module over the export)
    import bitalloc.profile.artifact  # noqa: F401

    assert callable(bitalloc.plan) and bitalloc.plan.__module__ == "bitalloc.api"
    assert callable(bitalloc.profile) and bitalloc.profile.__module__ == "bitalloc.api"
    assert set(bitalloc.__all__) <= set(dir(bitalloc))
    with pytest.raises(AttributeError):
        bitalloc.no_such_name  # noqa: B018
    # submodules stay reachable as attributes, as when the package imported them eagerly (and cost nothing more)
    loaded, result = heavy_modules_after("import bitalloc; print('SOLVERS=' + ','.join(bitalloc.solvers.available_solvers()))")
    assert loaded == [] and "SOLVERS=dp,evolutionary,ilp,lagrangian" in result.stdout


def test_replan_from_profile_folder_is_numpy_only(tmp_path, calib_ids):
    folder = tmp_path / "prof"
    options = default_options(bits=(2, 3, 4, 8), group_sizes=(32, None))
    profile_model(make_llama(), calib_ids, folder, signals=("fisher", "spikes", "table"), options=options)
    expected = bitalloc.plan_from_profile(folder, "4bits").to_json()

    out = tmp_path / "plan.json"
    loaded, result = heavy_modules_after(run_cli_body("plan", "--profile", str(folder), "--budget", "4bits",
                                                      "--out", str(out)))
    assert "EXIT=" not in result.stdout or "EXIT=0" in result.stdout, result.stderr
    assert loaded == []
    assert out.read_text() == expected  # the same plan, byte for byte, as the in-process API
    loaded, _ = heavy_modules_after(f"import bitalloc; bitalloc.pareto_from_profile({str(folder)!r}, '3.0:4.0:0.5bits')")
    assert loaded == []


def test_solvers_import_no_torch():
    """solvers/ is installed as bitalloc.solvers and must stay numpy-only: no torch or transformers, and no
    import of the rest of bitalloc (which could bring them in), at any level of any file."""
    for path in sorted((REPO / "solvers").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                assert node.level <= 1, f"{path.name}:{node.lineno} imports from outside solvers/"
                names = [node.module or ""] if node.level == 0 else []
            else:
                continue
            for name in names:
                assert name.split(".")[0] not in (*HEAVY, "bitalloc"), f"{path.name}:{node.lineno} imports {name}"
    body = ("import numpy as np\nfrom bitalloc import solvers\n"
            "p = solvers.Problem(cost=np.array([[3.0, 1.0, 0.0], [5.0, 2.0, 0.0]]), "
            "storage_bits=np.array([[2.0, 4.0, 16.0], [2.0, 4.0, 16.0]]), max_storage_bits=8.0, group_names=('a', 'b'))\n"
            "print('CHOICES=' + json.dumps({s: solvers.solve(p, s).choice.tolist() for s in ('ilp', 'dp', 'lagrangian')}))\n")
    loaded, result = heavy_modules_after(body)
    assert loaded == []
    choices = json.loads(next(s for s in result.stdout.splitlines() if s.startswith("CHOICES=")).removeprefix("CHOICES="))
    assert choices == {"ilp": [1, 1], "dp": [1, 1], "lagrangian": [1, 1]}  # 4 + 4 bits: the only fit of cost 3
