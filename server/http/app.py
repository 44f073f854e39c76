"""The FastAPI app factory: one app owns one engine (on app.state), built by the lifespan."""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server.engine.model_loader import BaseModel

from .auth import require_metrics_key
from .body_limit import BodyLimit
from .errors import error_response, install_error_handlers
from .executors import AnalysisPool, install_serving_executor
from .metrics import Metrics
from .routes_adapters import router as adapters_router
from .routes_analysis import AdapterAnalyses
from .routes_analysis import router as analysis_router
from .routes_openai import router as openai_router
from .settings import Settings
from .state import ServerState

log = logging.getLogger(__name__)


def create_app(
    settings: Settings | None = None, base: BaseModel | None = None, on_fatal: Callable[[str], None] | None = None
) -> FastAPI:
    """Build an app; `base` lets tests hand in an already loaded model. `on_fatal(reason)` is called
    when the app can no longer serve (startup failed, engine thread died): the CLI exits on it."""
    settings = settings or Settings()
    metrics = Metrics(settings.max_adapter_labels)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        serving = install_serving_executor(settings.serving_workers)
        analysis = AnalysisPool(settings.analysis_workers, settings.max_queued_analyses)
        state = ServerState(settings, base, metrics, on_fatal)
        app.state.server, app.state.analysis_pool = state, analysis
        state.start()
        try:
            yield
        finally:
            state.stop(settings.shutdown_timeout)
            analysis.shutdown()
            serving.shutdown(wait=False)

    app = FastAPI(
        title="loraserve",
        version="0.1.0",
        lifespan=lifespan,
        description="Multi-adapter LoRA inference server with an OpenAI-compatible API.",
    )
    # Endpoints read per-app objects from app.state, never from closures: FastAPI keeps endpoint
    # callables in process-wide caches, which would keep every app's engine alive in a process
    # that builds several apps (the tests).
    app.state.metrics, app.state.settings = metrics, settings
    app.state.adapter_analyses = AdapterAnalyses()
    install_error_handlers(app)
    app.add_middleware(BodyLimit)
    app.include_router(openai_router)
    app.include_router(adapters_router)
    app.include_router(analysis_router)

    @app.get("/health", include_in_schema=True)
    async def health(request: Request):
        """Liveness: 200 while the process can serve or is still loading; 503 once startup failed or
        the engine thread died (the process is then exiting, or must be restarted)."""
        failure = request.app.state.server.failure
        if failure is not None:
            return error_response(503, failure, "unhealthy")
        return {"status": "ok"}

    @app.get("/ready")
    async def ready(request: Request):
        """200 once the model is loaded and the engine runs (readiness), else 503."""
        state: ServerState = request.app.state.server
        if state.is_ready:
            return JSONResponse({"status": "ready", "model": state.model_name})
        if state.failure is not None:
            return error_response(503, state.failure, "load_failed" if state.load_error else "engine_dead")
        return error_response(503, "the model is still loading", "not_ready", headers={"Retry-After": "5"})

    @app.get("/metrics", dependencies=[Depends(require_metrics_key)])
    async def prometheus_metrics(request: Request) -> Response:
        """Prometheus text format; see docs/operating.md (Operating) for every series."""
        return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
