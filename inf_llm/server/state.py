"""What one app instance holds: the config, the loading state, the engine once loaded, the metrics.

Loading runs in a daemon thread started by the lifespan, so the port answers (503) at once and a SIGTERM
during a long load still exits promptly.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Literal

from inf_llm import sampling
from inf_llm.config import InfLLMConfig, MemoryType
from inf_llm.engine.worker import Engine, ShuttingDownError, load_engine
from inf_llm.errors import InfLLMError, NotReadyError
from inf_llm.sampling import Surface
from inf_llm.server.metrics import Metrics

log = logging.getLogger(__name__)

EngineFactory = Callable[[InfLLMConfig, Callable[[str, float], None]], Engine]


class ServerState:
    def __init__(self, cfg: InfLLMConfig, engine_factory: EngineFactory | None = None):
        self.cfg = cfg
        self.engine_factory: EngineFactory = engine_factory or (lambda c, progress: load_engine(c, progress))
        self.state: Literal["loading", "ready", "error"] = "loading"
        self.phase = "starting"
        self.fraction = 0.0
        self.error: str | None = None
        self.engine: Engine | None = None
        self.closing = False
        self.started_at = time.time()
        self._loader: threading.Thread | None = None
        self.metrics = (
            Metrics(running=lambda: self.engine.running if self.engine else 0,
                    queued=lambda: self.engine.queued if self.engine else 0)
            if cfg.server.metrics else None
        )

    # --- loading ----------------------------------------------------------------------------------
    def start_loading(self) -> None:
        if self._loader is None:
            self._loader = threading.Thread(target=self._load, name="inf_llm-loader", daemon=True)
            self._loader.start()

    def _progress(self, phase: str, fraction: float) -> None:
        self.phase, self.fraction = phase, float(fraction)

    def _load(self) -> None:
        try:
            engine = self.engine_factory(self.cfg, self._progress)
        except InfLLMError as exc:
            self._failed(str(exc))
            return
        except Exception as exc:  # any loader failure must reach /status instead of killing a thread silently
            log.exception("loading the model failed")
            self._failed(f"{type(exc).__name__}: {exc}")
            return
        if self.metrics is not None:
            metrics = self.metrics
            engine.on_finished = lambda job: metrics.record(job.final)
        self.engine = engine
        if self.closing:
            engine.shutdown(wait=None)
            return
        self.phase, self.fraction, self.state = "ready", 1.0, "ready"
        log.info("model ready: %s on %s", engine.info.model_name, engine.info.device)

    def _failed(self, message: str) -> None:
        log.error("model failed to load: %s", message)
        self.error, self.state = message, "error"

    # --- requests ---------------------------------------------------------------------------------
    def engine_or_raise(self) -> Engine:
        if self.closing:
            raise ShuttingDownError("the server is shutting down")
        if self.state == "ready" and self.engine is not None:
            return self.engine
        if self.state == "error":
            raise NotReadyError(f"the model failed to load: {self.error}")
        raise NotReadyError(f"the model is loading ({self.phase}, {round(self.fraction * 100)}%); retry shortly")

    @property
    def model_name(self) -> str:
        if self.engine is not None:
            return self.engine.info.model_name
        return self.cfg.server.model_name or self.cfg.model.path

    def status(self, full: bool = True) -> dict:
        """The /status body; without `full` only what a health check needs (an API key guards the rest: the
        system prompt, a load error's text)."""
        engine = self.engine
        cfg = engine.cfg if engine is not None else self.cfg  # once loaded, with the auto keys resolved
        m, g, srv = cfg.model, cfg.generation, cfg.server
        public = {
            "ready": self.state == "ready" and not self.closing,
            "state": self.state,
            "progress": {"phase": self.phase, "fraction": round(self.fraction, 4)},
            "auth_required": bool(srv.api_key),
        }
        if not full:
            return public
        return {
            **public,
            "model": self.model_name,
            "type": MemoryType(m.type).value,
            "device": self.engine.info.device if self.engine is not None else m.device,
            "memory": {"type": MemoryType(m.type).value, "n_init": m.n_init, "n_local": m.n_local,
                       "block_size": m.block_size, "topk": m.topk, "max_cached_block": m.max_cached_block,
                       "exc_block_size": m.exc_block_size, "repr_topk": m.repr_topk},
            "max_len": cfg.max_len,
            "error": self.error,
            "limits": {"max_prompt_tokens": srv.max_prompt_tokens, "max_new_tokens_limit": srv.max_new_tokens_limit,
                       "max_client_requests": srv.max_client_requests},
            "generation_defaults": {**{f.name: getattr(g, f.name) for f in sampling.on(Surface.STATUS)},
                                    "system_prompt": g.system_prompt},
            "generation_fields": self.generation_fields(),
            "auto": engine.info.auto if engine is not None else None,
            "warmup_s": engine.info.warmup_seconds if engine is not None else None,
            "dtype": engine.info.dtype if engine is not None else None,
            "linear": engine.info.linear if engine is not None else None,
        }

    def generation_fields(self) -> list[dict]:
        """Every sampling field a /chat request may set, with the config's default and the bounds this server
        enforces (max_new_tokens: at most server.max_new_tokens_limit): what a client builds its form from."""
        g, limit = self.cfg.generation, self.cfg.server.max_new_tokens_limit
        fields = []
        for f in sampling.on(Surface.CHAT):
            body = {**f.schema(), "default": getattr(g, f.name)}
            if f.name == "max_new_tokens":
                body["maximum"] = min(body["maximum"], limit)
            fields.append(body)
        return fields

    # --- shutdown ---------------------------------------------------------------------------------
    def begin_shutdown(self) -> None:
        """Non-blocking: refuse new work, end running and queued jobs with an error event."""
        if self.closing:
            return
        self.closing = True
        log.info("shutting down: ending in-flight requests")
        if self.engine is not None:
            self.engine.shutdown(wait=None)

    def finish_shutdown(self, timeout: float = 5.0) -> None:
        """Blocking (call from a thread): wait for the worker to stop."""
        self.begin_shutdown()
        if self.engine is not None:
            self.engine.shutdown(wait=timeout)
