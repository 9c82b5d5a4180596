#!/usr/bin/env bash
# CI's check that scripts/quickstart.sh needs nothing outside the repository: copy the tracked files into
# a folder with no ../shared beside it and run the quickstart there, reusing this checkout's venv, the
# fetched model (BITALLOC_SMOLLM2_GGUF) and a profile cache (BITALLOC_SMOLLM2_CACHE) that the slow SmolLM2
# test filled with the same headline command. Arguments go to quickstart.sh (budget, extra plan flags).
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$(pwd)"
: "${BITALLOC_SMOLLM2_GGUF:?set BITALLOC_SMOLLM2_GGUF to the fetched .gguf (scripts/fetch_smollm2.sh)}"
: "${BITALLOC_SMOLLM2_CACHE:?set BITALLOC_SMOLLM2_CACHE to the profile cache of the slow SmolLM2 test}"
parent="$(mktemp -d)"
trap 'rm -rf "$parent"' EXIT
copy="$parent/bitalloc"
mkdir "$copy"
git ls-files -z | tar --null -T - -cf - | tar -xf - -C "$copy"
test ! -e "$parent/shared"
start=$(date +%s)
(cd "$copy" && BITALLOC_VENV="$repo/.venv" BITALLOC_CACHE_DIR="$BITALLOC_SMOLLM2_CACHE" bash scripts/quickstart.sh "$@")
"$repo/.venv/bin/python" - "$copy/plan.json" "${1:-3.2bits}" <<'PY'
import sys
from bitalloc.budget import parse_budget
from bitalloc.plan import Plan
plan = Plan.load(sys.argv[1])
assert plan.calibration["source"] == "builtin:austen", plan.calibration
assert plan.budget.text == parse_budget(sys.argv[2]).text and plan.summary.model_bytes, plan.summary
print(f"quickstart plan: {plan.summary.storage_bits_per_weight:.4f} bits/weight, whole model {plan.summary.model_bytes / 1e6:.2f} MB")
PY
echo "quickstart from a fresh copy without ../shared: ok in $(( $(date +%s) - start ))s"
