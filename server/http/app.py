"""The FastAPI app factory: one app owns one engine (on app.state), built by the lifespan."""
from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server.http.auth import require_metrics_key

from server.http.errors import error_response, install_error_handlers
from server.http.metrics import Metrics
from server.engine.model_loader import BaseModel
from server.http.routes_adapters import router as adapters_router
from server.http.routes_openai import router as openai_router
from server.http.settings import Settings
from server.http.state import ServerState

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None, base: BaseModel | None = None) -> FastAPI:
    """Build an app; `base` lets tests hand in an already loaded model."""
    settings = settings or Settings()
    metrics = Metrics(settings.max_adapter_labels)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state = ServerState(settings, base, metrics)
        app.state.server, app.state.settings = state, settings
        state.start()
        try:
            yield
        finally:
            state.stop(settings.shutdown_timeout)

    app = FastAPI(title="loraserve", version="0.1.0", lifespan=lifespan,
                  description="Multi-adapter LoRA inference server with an OpenAI-compatible API.")
    # Endpoints read per-app objects from app.state, never from closures: FastAPI keeps endpoint
    # callables in process-wide caches, which would keep every app's engine alive in a process
    # that builds several apps (the tests).
    app.state.metrics = metrics
    install_error_handlers(app)
    app.include_router(openai_router)
    app.include_router(adapters_router)

    @app.get("/health", include_in_schema=True)
    async def health() -> dict:
        """The process is up (liveness); it does not wait for the model."""
        return {"status": "ok"}

    @app.get("/ready")
    async def ready(request: Request):
        """200 once the model is loaded and the engine runs (readiness), else 503."""
        state: ServerState = request.app.state.server
        if state.is_ready:
            return JSONResponse({"status": "ready", "model": state.model_name})
        if state.load_error is not None:
            return error_response(503, f"model failed to load: {state.load_error}", "load_failed")
        return error_response(503, "the model is still loading", "not_ready", headers={"Retry-After": "5"})

    @app.get("/metrics", dependencies=[Depends(require_metrics_key)])
    async def prometheus_metrics(request: Request) -> Response:
        """Prometheus text format; see the README's Operating section for every series."""
        return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
