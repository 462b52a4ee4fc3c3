"""FastAPI app factory: the OpenAI routes, /health, /metrics, /v1/models.

The app serves engines by model name (tokenmill.server.served). An engine may be attached
after the app starts serving (the CLI loads models in the background); until then /health
and that model's requests answer 503.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.middleware.cors import CORSMiddleware

from tokenmill.engine.async_embedder import AsyncEmbedder
from tokenmill.engine.async_engine import AsyncEngine
from tokenmill.server.errors import error_response, install_error_handlers
from tokenmill.server.guard import Guard, ServerState
from tokenmill.server.info import add_info_routes
from tokenmill.server.metrics import CONTENT_TYPE
from tokenmill.server.openapi import install_openapi
from tokenmill.server.protocol import ChatCompletionRequest, CompletionRequest, EmbeddingRequest, ModelList
from tokenmill.server.profiling import add_profile_routes
from tokenmill.server.repository import Repository, add_repository_routes
from tokenmill.server.request_log import RequestLog
from tokenmill.server.served import ServedModels
from tokenmill.server.streams import ClientGone

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024


def create_app(
    engines: Mapping[str, AsyncEngine | AsyncEmbedder | None],
    api_keys: list[str] | tuple[str, ...] = (),
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    allowed_origins: list[str] | tuple[str, ...] = (),
    log_requests: bool = False,
    repository: Repository | None = None,
    profile_dir: str | None = None,
    data_dir: Path | None = None,
) -> FastAPI:
    """`engines`: model name -> AsyncEngine, or None for one still loading (attach_engine()
    later). Requests are routed by their `model` field. `allowed_origins`: the browser origins
    CORS lets in (none by default: no CORS headers at all). `log_requests`: log prompts and
    completions (off by default: they are user data). `repository`: how to load each model
    again, enabling /v2/repository load and unload (off without it). `profile_dir`: where
    /start_profile and /stop_profile write torch profiler traces (off without it). `data_dir`:
    where the Batch API keeps its files and SQLite records (no /v1/files nor /v1/batches
    without one)."""
    state = ServerState(api_keys=[k.encode() for k in api_keys if k], max_body_bytes=max_body_bytes)
    models = ServedModels(list(engines))
    app = FastAPI(title="tokenmill", docs_url=None, redoc_url=None)
    app.state.tm = state
    app.state.models = models
    install_error_handlers(app)
    install_openapi(app)
    # The last added runs first: CORS answers a browser's preflight (which carries no key)
    # before the guard asks for one; the request log sees the body the guard has read.
    if log_requests:
        app.add_middleware(RequestLog)
    app.add_middleware(Guard, state=state)
    if allowed_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(allowed_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])

    @app.exception_handler(ClientGone)
    async def _gone(_: Request, __: ClientGone) -> Response:
        return Response(status_code=499)  # nobody reads it; the engine requests are already aborted

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, http: Request):
        async with models.admitted(req.model) as serving:
            return await serving.completions(req, http)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, http: Request):
        async with models.admitted(req.model) as serving:
            return await serving.chat(req, http)

    @app.post("/v1/embeddings")
    async def embeddings(req: EmbeddingRequest, http: Request):
        async with models.admitted(req.model, "embedding") as serving:
            return await serving.embeddings(req, http)

    @app.get("/v1/models")
    async def list_models() -> ModelList:
        return ModelList(data=models.cards())

    @app.get("/health")
    async def health():
        if state.draining:
            return error_response(503, "server is shutting down", code="draining")
        problem = models.unhealthy()
        if problem is not None:
            code, message = problem
            return error_response(503, message, code=code)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(models.metrics.render(), media_type=CONTENT_TYPE)

    @app.post("/reset_prefix_cache")
    async def reset_prefix_cache():
        # Every loaded model's cache; one still loading has nothing cached yet.
        loaded = models.loaded
        if not loaded:
            return error_response(503, "no model is loaded yet", code="loading")
        results = [await engine.call(lambda e: e.reset_prefix_cache()) for engine in loaded.values()]
        return JSONResponse({"reset": all(bool(ok) for ok in results)})

    add_info_routes(app, models)  # for tokenmill router's prefix prediction
    add_repository_routes(app, models, repository)
    add_profile_routes(app, models, profile_dir)

    if data_dir is not None:
        from tokenmill.server.batches import add_batch_routes, start_batches

        app.state.batches = start_batches(models, Path(data_dir))
        add_batch_routes(app, app.state.batches)

    for name, engine in engines.items():
        if engine is not None:
            attach_engine(app, name, engine)
    return app


def attach_engine(app: FastAPI, name: str, engine: AsyncEngine | AsyncEmbedder) -> None:
    app.state.models.attach(name, engine)


def begin_drain(app: FastAPI) -> None:
    """Stop admitting: new engine requests and /health get 503; in-flight ones run on."""
    app.state.tm.draining = True
