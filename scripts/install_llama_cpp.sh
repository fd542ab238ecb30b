#!/usr/bin/env bash
# Build llama-cpp-python from its source distribution (PyPI has no wheel) into the project's venv, for
# benchmark/cpu_peers.py. About 15 minutes on 2 cores.
#   scripts/install_llama_cpp.sh          an AVX2 build (what a CPU without AVX-512 runs; the default)
#   scripts/install_llama_cpp.sh native   tuned for this CPU (-DGGML_NATIVE=ON)
set -euo pipefail
VENV=${VENV:-.venv}
VERSION=0.3.36
case "${1:-avx2}" in
  avx2) flags="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF" ;;
  native) flags="-DGGML_NATIVE=ON" ;;
  *) echo "usage: $0 [avx2|native]" >&2; exit 2 ;;
esac
if [ ! -x "$VENV/bin/python" ]; then
  echo "no $VENV/bin/python: run 'make setup' first" >&2
  exit 1
fi
CMAKE_ARGS="$flags -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF" \
CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
  "$VENV/bin/python" -m pip install --no-binary llama-cpp-python "llama-cpp-python==$VERSION"
"$VENV/bin/python" -c "import llama_cpp; print('llama_cpp', llama_cpp.__version__, 'installed')"
