"""FastAPI app factory: the OpenAI routes, /health, /metrics, /v1/models.

One engine per app. The engine may be attached after the app starts serving (the CLI loads
the model in the background), and until then /health and the engine routes answer 503.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from tokenmill.server.errors import error_response, install_error_handlers
from tokenmill.server.guard import Guard, ServerState
from tokenmill.server.metrics import CONTENT_TYPE, ServerMetrics
from tokenmill.server.protocol import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList
from tokenmill.server.serving import Serving
from tokenmill.server.streams import ClientGone

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024


def create_app(
    engine,
    model_name: str,
    api_keys: list[str] | tuple[str, ...] = (),
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
) -> FastAPI:
    """`engine` is an AsyncEngine, or None to attach one later with attach_engine()."""
    state = ServerState(api_keys=[k.encode() for k in api_keys if k], max_body_bytes=max_body_bytes)
    metrics = ServerMetrics(lambda: state.engine.stats if state.engine is not None else None, model_name)
    app = FastAPI(title="tokenmill", docs_url=None, redoc_url=None)
    app.state.tm = state
    app.state.metrics = metrics
    app.state.serving = None
    app.state.model_name = model_name
    install_error_handlers(app)
    app.add_middleware(Guard, state=state)

    @app.exception_handler(ClientGone)
    async def _gone(_: Request, __: ClientGone) -> Response:
        return Response(status_code=499)  # nobody reads it; the engine requests are already aborted

    def serving() -> Serving:
        return app.state.serving

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, http: Request):
        return await serving().completions(req, http)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, http: Request):
        return await serving().chat(req, http)

    @app.get("/v1/models")
    async def models() -> ModelList:
        max_len = state.engine.engine.max_model_len if state.engine is not None else None
        return ModelList(data=[ModelCard(id=model_name, max_model_len=max_len)])

    @app.get("/health")
    async def health():
        if state.engine is None:
            return error_response(503, "model is loading", code="loading")
        if state.draining:
            return error_response(503, "server is shutting down", code="draining")
        if getattr(state.engine, "errored", None) is not None:
            return error_response(503, "engine failed", code="engine_error")
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.post("/reset_prefix_cache")
    async def reset_prefix_cache():
        ok = await state.engine.call(lambda e: e.reset_prefix_cache())
        return JSONResponse({"reset": bool(ok)})

    if engine is not None:
        attach_engine(app, engine)
    return app


def attach_engine(app: FastAPI, engine) -> None:
    app.state.serving = Serving(engine, app.state.model_name, app.state.metrics)
    app.state.tm.engine = engine


def begin_drain(app: FastAPI) -> None:
    """Stop admitting: new engine requests and /health get 503; in-flight ones run on."""
    app.state.tm.draining = True
