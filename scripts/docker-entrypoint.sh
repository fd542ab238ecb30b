#!/bin/sh
# Entry point of the container image (Dockerfile): serve on 0.0.0.0:$PORT.
#
# Inside a container the server's own default (server.host 127.0.0.1) would be unreachable from outside, so
# the host is always 0.0.0.0 here; the port comes from $PORT. Arguments are passed on to
# `python -m inf_llm.serve`: options first, then KEY=VALUE config overrides, e.g.
#   docker run IMAGE --config /app/config/working/qwen-4b-inf-llm.yaml model.topk=32
# (argparse refuses options placed between overrides). A first argument that is neither an option nor an
# override is a command to run instead, e.g. `docker run -it IMAGE bash`.
#
# Environment:
#   PORT                 listening port (default 8000)
#   INFLLM_CONFIG        config file, read by the server itself (the image sets the default served config)
#   INFLLM_LOG_LEVEL     debug, info (default), warning or error
#   INFLLM_API_KEY       when non-empty, required from clients (server.api_key). It goes in as an OmegaConf
#                        reference, ${oc.env:INFLLM_API_KEY}, so the key never appears on a command line.
#   INFLLM_CORS_ORIGINS  comma-separated origins allowed to call the API from a browser (server.cors_origins;
#                        default: the config's, i.e. same-origin only)
set -eu

case "${1:-}" in
    "" | -* | *=*) ;;
    *) exec "$@" ;;
esac

set -- --host 0.0.0.0 --port "${PORT:-8000}" --log-level "${INFLLM_LOG_LEVEL:-info}" "$@"
if [ -n "${INFLLM_API_KEY:-}" ]; then
    # Single quotes: OmegaConf, not the shell, resolves the reference.
    # shellcheck disable=SC2016
    set -- "$@" 'server.api_key=${oc.env:INFLLM_API_KEY}'
fi
if [ -n "${INFLLM_CORS_ORIGINS:-}" ]; then
    origins=$(printf '%s' "$INFLLM_CORS_ORIGINS" | sed 's/[[:space:]]//g; s/,/","/g')
    set -- "$@" "server.cors_origins=[\"$origins\"]"
fi
# exec: the server is PID 1's process, so `docker stop` (SIGTERM) reaches it and it shuts down gracefully.
exec python -m inf_llm.serve "$@"
