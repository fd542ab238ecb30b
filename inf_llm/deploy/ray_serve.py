"""The inf_llm server as a Ray Serve deployment: N replicas of the app of `inf_llm.server.create_app`, each
with its own model copy and memory state (one GPU each on GPU hosts), and the requests of one conversation
routed to the replica that holds its memory state.

    python -m inf_llm.deploy.ray_serve --config PATH --replicas 2 --num-gpus-per-replica 1 --host 0.0.0.0
    RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=inf_llm.deploy.affinity.proxy_middlewares \\
        serve run inf_llm.deploy.ray_serve:app config=PATH replicas=2 num_gpus_per_replica=1

Replica (`InfLLMReplica`): loads the model in its constructor, so Serve sends it traffic only once the model
is ready (a failed load fails the replica, and Serve retries it); then serves the unchanged app through
`@serve.ingress` (late-bound: the app is built in the replica, so every replica has its own state).

Affinity: Ray Serve's model multiplexing, keyed by the conversation. The proxy middleware of `affinity.py`
puts the conversation's key into the `serve_multiplexed_model_id` header; each replica registers the key of
every request it receives as its one "model" (`max_num_models_per_replica=1`: a replica holds the memory
state of one sequence), and Serve's router sends a key to the replica that registered it, a new key to a
replica with none (or the fewest). Responses carry the replica's id in `X-InfLLM-Replica`.

Failure: a replica whose actor dies, or whose health check fails (model failed, worker thread gone), is
replaced by Serve. Its conversations' next turns go to other replicas, which rebuild the memory state from the
conversation text every request carries (a full prefill; `usage.cached_tokens` is 0 there).

Owns: the deployment, its builder and CLI. Must not know: the engine's internals (it reads only the server
state and whether the worker thread is alive).
"""

from __future__ import annotations

import os

from inf_llm import openmp  # noqa: E402  (before torch: bounded OpenMP spinning, see inf_llm/openmp.py)

openmp.configure()

import argparse  # noqa: E402
import asyncio  # noqa: E402
import logging  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402

import ray  # noqa: E402
from pydantic import BaseModel, Field, field_validator  # noqa: E402
from ray import serve  # noqa: E402
from ray.serve import Application  # noqa: E402
from starlette.types import ASGIApp, Message, Receive, Scope, Send  # noqa: E402

from inf_llm.config import InfLLMConfig, default_config_path, load_config  # noqa: E402
from inf_llm.deploy.affinity import PROXY_CALLBACK, PROXY_CALLBACK_ENV  # noqa: E402
from inf_llm.engine.worker import load_engine  # noqa: E402
from inf_llm.errors import ConfigError  # noqa: E402
from inf_llm.server import create_app  # noqa: E402
from inf_llm.server.state import ServerState  # noqa: E402

log = logging.getLogger(__name__)

APP_NAME = "inf_llm"
DEPLOYMENT_NAME = "InfLLMReplica"
# Response headers: the replica that answered, and the routing key it was reached with.
REPLICA_HEADER = "x-infllm-replica"
SESSION_KEY_HEADER = "x-infllm-session-key"
# One memory state per replica: registering a second conversation forgets the first, as the engine does.
SESSIONS_PER_REPLICA = 1
# Seconds between health checks, and before an unanswered one counts as failed. The check only reads
# flags; a replica busy with a long prefill still answers it (the worker is a separate thread).
HEALTH_CHECK_PERIOD_S = 10.0
HEALTH_CHECK_TIMEOUT_S = 30.0
# Seconds a stopping replica waits for its running requests (streams too) before its app shuts down, which
# ends what is left with an error event.
GRACEFUL_SHUTDOWN_TIMEOUT_S = 15.0
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def replica_problem(state: ServerState) -> str | None:
    """Why a replica with this server state should be replaced, or None if it is healthy."""
    if state.state == "error":
        return f"the model failed to load: {state.error}"
    if state.engine is not None and not state.closing and not state.engine.alive:
        return "the generation worker thread has stopped"
    return None


class ReplicaTag:
    """ASGI middleware of a replica's app: registers the request's session key with the multiplexer (so
    Serve routes the conversation's next turns here) and names the replica in the response headers."""

    def __init__(self, app: ASGIApp, replica: InfLLMReplica):
        self.app = app
        self.replica = replica

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        key = serve.get_multiplexed_model_id()
        if key:
            await self.replica.hold_session(key)
        extra = [(REPLICA_HEADER.encode(), self.replica.replica_id.encode())]
        if key:
            extra.append((SESSION_KEY_HEADER.encode(), key.encode()))

        async def tagged(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, tagged)


@serve.deployment(
    name=DEPLOYMENT_NAME,
    health_check_period_s=HEALTH_CHECK_PERIOD_S,
    health_check_timeout_s=HEALTH_CHECK_TIMEOUT_S,
    graceful_shutdown_timeout_s=GRACEFUL_SHUTDOWN_TIMEOUT_S,
)
@serve.ingress()
class InfLLMReplica:
    """One replica: a model, its worker thread and memory state, and the HTTP app in front of them."""

    async def __init__(self, cfg: InfLLMConfig):
        _configure_logging()
        self.cfg = cfg
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        # Loading blocks the constructor (in a thread, so the replica's event loop stays alive): Serve routes
        # to a replica only after it returns. A failure raises, and Serve starts the replica again.
        self.engine = await asyncio.to_thread(load_engine, cfg)
        self.state: ServerState | None = None
        log.info("replica %s: model ready (%s on %s)", self.replica_id, self.engine.info.model_name,
                 self.engine.info.device)

    def __serve_build_asgi_app__(self) -> ASGIApp:
        app = create_app(self.cfg, engine_factory=lambda cfg, progress: self.engine)
        app.add_middleware(ReplicaTag, replica=self)
        self.state = app.state.inf_llm
        return app

    @serve.multiplexed(max_num_models_per_replica=SESSIONS_PER_REPLICA)
    async def hold_session(self, key: str) -> str:
        """Register a conversation on this replica. Nothing to load: the memory state is the engine's."""
        log.info("replica %s: now serving session %s", self.replica_id, key)
        return key

    def check_health(self) -> None:
        """Called by Serve every HEALTH_CHECK_PERIOD_S; raising has the replica replaced."""
        problem = replica_problem(self.state) if self.state is not None else None
        if problem:
            raise RuntimeError(problem)


def _configure_logging(level: str = "INFO") -> None:
    """Give inf_llm's loggers a handler in a Ray worker (Ray configures only its own)."""
    pkg = logging.getLogger("inf_llm")
    pkg.setLevel(level)
    if not pkg.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        pkg.addHandler(handler)


# ------------------------------------------------------------------------------------------- building
def default_gpus(cfg: InfLLMConfig) -> float:
    """GPUs per replica when not given: 0 for `model.device: cpu`, 1 for cuda, and for `auto` 1 if the Ray
    cluster we are connected to (or, before connecting, this machine) has a GPU."""
    device = cfg.model.device
    if device == "cpu":
        return 0.0
    if device != "auto":
        return 1.0
    if ray.is_initialized():
        return 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    import torch

    return 1.0 if torch.cuda.is_available() else 0.0


def deployment(cfg: InfLLMConfig, replicas: int = 1, num_gpus_per_replica: float | None = None,
               num_cpus_per_replica: float = 1.0) -> Application:
    """The Serve application: `replicas` copies of InfLLMReplica serving `cfg`."""
    gpus = default_gpus(cfg) if num_gpus_per_replica is None else num_gpus_per_replica
    log.info("%d replica(s), %g GPU and %g CPU each", replicas, gpus, num_cpus_per_replica)
    return InfLLMReplica.options(
        num_replicas=replicas,
        ray_actor_options={"num_gpus": gpus, "num_cpus": num_cpus_per_replica},
        # The engine runs one request and queues server.max_queue; more wait in Serve's router, which sends
        # them to another replica if this one stays full past the multiplexed-matching timeout (1-2 s).
        max_ongoing_requests=cfg.server.max_queue + 1,
    ).bind(cfg)


class DeployArgs(BaseModel):
    """Arguments of the `app` builder (`serve run inf_llm.deploy.ray_serve:app key=value ...`)."""

    config: str | None = Field(None, description="YAML config (default: $INFLLM_CONFIG or the served default)")
    overrides: list[str] = Field(default_factory=list, description="KEY=VALUE config overrides (space-separated)")
    replicas: int = Field(1, ge=1)
    num_gpus_per_replica: float | None = Field(None, ge=0, description="default: 1 on GPU hosts, else 0")
    num_cpus_per_replica: float = Field(1.0, gt=0)

    @field_validator("overrides", mode="before")
    @classmethod
    def _split(cls, value):
        return value.split() if isinstance(value, str) else value


def build(args: DeployArgs) -> Application:
    cfg = load_config(args.config or default_config_path(), args.overrides)
    return deployment(cfg, args.replicas, args.num_gpus_per_replica, args.num_cpus_per_replica)


def app(args: dict) -> Application:
    """Application builder for `serve run inf_llm.deploy.ray_serve:app config=PATH replicas=2 ...`."""
    return build(DeployArgs.model_validate(args))


# ------------------------------------------------------------------------------------------------ CLI
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m inf_llm.deploy.ray_serve",
        description="Serve inf_llm on Ray Serve: N replicas, a conversation's turns routed to one replica.",
    )
    parser.add_argument("--config", help="YAML config (default: $INFLLM_CONFIG or the served default)")
    parser.add_argument("--replicas", type=int, default=1, help="number of replicas (default 1)")
    parser.add_argument("--num-gpus-per-replica", type=float,
                        help="GPUs per replica (default: 1 if the cluster has GPUs and the model is not on cpu)")
    parser.add_argument("--num-cpus-per-replica", type=float, default=1.0, help="CPUs per replica (default 1)")
    parser.add_argument("--host", help="HTTP bind address of Serve's proxy (default: server.host)")
    parser.add_argument("--port", type=int, help="HTTP port (default: server.port)")
    parser.add_argument("--address", help="Ray cluster to join (e.g. auto); default: start Ray on this machine")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. model.topk=32")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format=LOG_FORMAT)
    if args.replicas < 1:
        print("error: --replicas must be at least 1", file=sys.stderr)
        return 2
    path = args.config if args.config is not None else default_config_path()
    try:
        cfg = load_config(path, args.overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    host = args.host if args.host is not None else cfg.server.host
    port = args.port if args.port is not None else cfg.server.port

    # Serve's HTTP proxy reads this when it starts; a Ray started here inherits it. A cluster started with
    # `ray start` needs it in the environment of that command on every node instead.
    os.environ.setdefault(PROXY_CALLBACK_ENV, PROXY_CALLBACK)
    signal.signal(signal.SIGTERM, _interrupt)  # stop like Ctrl-C: replicas drain, Ray shuts down
    ray.init(address=args.address)
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(deployment(cfg, args.replicas, args.num_gpus_per_replica, args.num_cpus_per_replica),
                  name=APP_NAME, route_prefix="/")
        log.info("config %s; %d replica(s) serving on http://%s:%d", path, args.replicas, host, port)
        threading.Event().wait()
    except KeyboardInterrupt:
        log.info("stopping")
    finally:
        serve.delete(APP_NAME)
        ray.shutdown()
    return 0


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
