#!/usr/bin/env bash
# Download into .wheels/ (git-ignored) the wheels that the lent GPU machine lacks, for its Python 3.12 on
# manylinux x86_64. That machine has torch, transformers, triton and numpy but no network, so these are
# carried there with the working tree and installed offline (see CONTRIBUTING.md, "Running on the GPU machine"):
#
#   pip install --no-index --find-links .wheels -r .wheels/requirements.txt
#
# Versions follow requirements.txt. pip resolves the whole dependency closure for the target platform (so
# pydantic-core matches pydantic, and small pure-python dependencies such as annotated-types come along);
# on the machine, pip takes from .wheels only what is not installed already.
set -euo pipefail
cd "$(dirname "$(realpath "$0")")/.."

DEST=${DEST:-.wheels}
PYVER=${PYVER:-3.12}
mkdir -p "$DEST"

# Each line: a requirement as pinned in requirements.txt where it is pinned there.
pin() { grep -iE "^$1([=<>~ ]|$)" requirements.txt | head -n 1 | sed 's/[[:space:]]*#.*//' || true; }
PACKAGES=(
    "$(pin pydantic)"
    pydantic-core
    "$(pin omegaconf)"
    antlr4-python3-runtime
    "$(pin fastapi)"
    starlette
    "$(pin sse-starlette)"
    "$(pin uvicorn)"
    "$(pin gguf)"
    "$(pin prometheus-client)"
    # benchmark/ scorers imported by the evaluation runner (benchmark.metrics -> rapidfuzz)
    "$(grep -iE '^rapidfuzz==' requirements-test.txt | head -n 1)"
)
# Drop empty entries (a package missing from requirements.txt).
REQS=()
for p in "${PACKAGES[@]}"; do [ -n "$p" ] && REQS+=("$p"); done
printf '%s\n' "${REQS[@]}" > "$DEST/requirements.txt"

# Download only (nothing is installed here), binary wheels for the target interpreter and platform.
python3 -m pip download --disable-pip-version-check --only-binary=:all: \
    --python-version "$PYVER" --implementation cp --platform manylinux2014_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    -d "$DEST" -r "$DEST/requirements.txt"

echo "wheels for Python $PYVER in $DEST:"
ls -1 "$DEST"
du -sh "$DEST"
