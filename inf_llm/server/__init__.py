"""The HTTP server: FastAPI app factory, routers, pydantic wire protocol, SSE. Knows nothing of torch."""

from inf_llm.server.app import create_app

__all__ = ["create_app"]
