"""Entry points of the server.

    uvicorn inf_llm.serve:app                    # config from $INFLLM_CONFIG or the default served config
    python -m inf_llm.serve --config PATH --host 127.0.0.1 --port 8000 model.topk=32 server.api_key=...
    python -m inf_llm.serve --model PATH                # no YAML: the architecture's preset, the rest auto
    python -m inf_llm.serve --no-warmup                 # ready without compiling the kernels (INFLLM_WARMUP=0)

`app` is created on first access (module __getattr__), so importing this module loads no config; a bad
config then fails with one clear message. The CLI exits with status 2 and a message (no traceback) on bad
arguments or config.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

from inf_llm import openmp  # noqa: E402  (before torch: bounded OpenMP spinning, see inf_llm/openmp.py)

openmp.configure()

from inf_llm.config import CONFIG_ENV_VAR, default_config_path, load_config  # noqa: E402
from inf_llm.errors import InfLLMError  # noqa: E402

log = logging.getLogger("inf_llm.serve")

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Seconds uvicorn waits for open connections after SIGTERM before closing them (streams end sooner: they
# get an error event at once).
GRACEFUL_SHUTDOWN_SECONDS = 10


def _configure_logging(level: str = "info") -> None:
    """Give inf_llm's loggers a handler when the host process configured none (uvicorn configures only its own)."""
    pkg = logging.getLogger("inf_llm")
    pkg.setLevel(level.upper())
    if not pkg.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        pkg.addHandler(handler)


def __getattr__(name: str) -> Any:
    if name != "app":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from inf_llm.server import create_app

    _configure_logging(os.environ.get("INFLLM_LOG_LEVEL", "info"))
    path = default_config_path()
    app = create_app(load_config(path))
    log.info("serving with config %s", path)
    globals()["app"] = app  # created once
    return app


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m inf_llm.serve",
        description="Serve an InfLLM-patched model: web chat at /, /chat (SSE), OpenAI-compatible /v1/*.",
    )
    parser.add_argument("--config", help=f"YAML config (default: ${CONFIG_ENV_VAR} or {default_config_path()}, "
                        f"unless --model is given)")
    parser.add_argument(
        "--model", metavar="ID_OR_PATH",
        help="serve this model without a YAML file: a local model folder, a .gguf file, or a hub id already in "
        "the Hugging Face cache; the memory preset of its architecture (Mistral, Llama, Qwen2, Qwen3: the "
        "paper's settings), the chat template from its tokenizer, everything else auto. With --config: that "
        "config's values with the model replaced",
    )
    parser.add_argument(
        "--no-warmup", action="store_true",
        help="skip the kernels' warm-up before ready (on a CUDA GPU with fattn it compiles the Triton kernels, so "
        "that no request pays for it; off, the first requests do); the same as INFLLM_WARMUP=0",
    )
    parser.add_argument("--host", help="bind address (default: server.host, 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (default: server.port, 8000)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="config overrides in dot notation, e.g. model.topk=32 server.max_queue=4")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    overrides = list(args.overrides)
    if args.host is not None:
        overrides.append(f"server.host={args.host}")
    if args.port is not None:
        overrides.append(f"server.port={args.port}")
    path = args.config if args.config is not None else None if args.model else default_config_path()
    try:
        cfg = load_config(path, overrides, _model_updates(args.model, with_preset=path is None))
    except InfLLMError as exc:  # a bad config, or a --model that is not a local model of a known architecture
        print(f"error: {exc}", file=sys.stderr)
        return 2

    if args.no_warmup:
        os.environ["INFLLM_WARMUP"] = "0"  # read by inf_llm.engine.worker.wants_warm_up when the model is loaded
    from inf_llm.engine.worker import warm_up_setting

    try:
        warm_up_setting()
    except InfLLMError as exc:  # a bad INFLLM_WARMUP
        print(f"error: {exc}", file=sys.stderr)
        return 2

    import uvicorn

    from inf_llm.server import create_app

    logging.basicConfig(level=args.log_level.upper(), format=LOG_FORMAT)
    app = create_app(cfg)
    log.info("config %s; listening on http://%s:%d", path or f"--model {args.model}", cfg.server.host, cfg.server.port)
    server = uvicorn.Server(uvicorn.Config(
        app, host=cfg.server.host, port=cfg.server.port, log_config=None, log_level=args.log_level,
        access_log=False, timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
    ))
    server.run()
    return 0 if server.started else 1


def _model_updates(model: str | None, with_preset: bool) -> dict | None:
    """The config values of --model: its architecture's preset without a config, else only its name."""
    if model is None:
        return None
    from inf_llm.engine import presets  # transformers: only for --model

    return presets.preset(model) if with_preset else presets.model_updates(model)


if __name__ == "__main__":
    sys.exit(main())
