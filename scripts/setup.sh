#!/usr/bin/env bash
# Create .venv and install bitalloc with its test extras (dev, and ray for the distributed-profiling tests). torch is pinned to the CPU build first:
# an unpinned torch requirement would pull a multi-GB CUDA build on a CPU machine. Every other
# package is pinned by scripts/constraints.txt (the versions the tests passed with; regenerate it
# with scripts/update_constraints.sh), so a fresh machine resolves exactly what was tested.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
# BITALLOC_VENV: an existing, set-up environment to use as it is (CI's fresh-copy quickstart check).
if [ -n "${BITALLOC_VENV:-}" ] && [ -x "$BITALLOC_VENV/bin/python" ]; then
  "$BITALLOC_VENV/bin/python" -c "import torch, bitalloc; print(f'bitalloc ready ($BITALLOC_VENV): torch {torch.__version__}')"
  exit 0
fi
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
python -m pip install --quiet -c scripts/constraints.txt "torch==2.13.0"
python -m pip install --quiet -c scripts/constraints.txt -e ".[dev,ray]"  # ray: tests/test_ray.py runs in CI
python -c "import torch, bitalloc; print(f'bitalloc ready: torch {torch.__version__}')"
