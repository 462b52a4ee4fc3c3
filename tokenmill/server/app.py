"""FastAPI app factory: the OpenAI routes, /health, /metrics, /v1/models.

One engine per app. The engine may be attached after the app starts serving (the CLI loads
the model in the background), and until then /health and the engine routes answer 503.
"""

from __future__ import annotations

import dataclasses
import json
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from tokenmill.server.errors import error_response, install_error_handlers
from tokenmill.server.guard import Guard, ServerState
from tokenmill.server.metrics import CONTENT_TYPE, ServerMetrics
from tokenmill.server.errors import APIError
from tokenmill.server.protocol import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    DeltaFunctionCall,
    DeltaToolCall,
    FunctionCall,
    ModelCard,
    ModelList,
    ToolCall,
    _SamplingFields,
)
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


class StructuredServing(Serving):
    """Serving plus structured output (response_format, guided_*) and tool calls.

    Kept here as a thin layer over Serving (whose owner was not editing it); fold it in later.
    """

    def sampling_params(self, req: _SamplingFields, max_tokens: int, logprobs: int | None):
        params = super().sampling_params(req, max_tokens, logprobs)
        field_name = None
        try:
            structured, field_name = req.structured_output()
            if isinstance(req, ChatCompletionRequest) and _tool_mode(req) is not None:
                from tokenmill.structured.tools import tool_call_constraint

                if structured is not None:
                    raise ValueError("tool_choice required/named cannot be combined with response_format")
                field_name = "tool_choice"
                named = req.tool_choice.function.name if _tool_mode(req) == "named" else None
                structured = tool_call_constraint([t.function.model_dump() for t in req.tools], named)
        except ValueError as e:
            raise APIError(400, str(e), param=field_name or "response_format") from None
        if structured is None:
            return params
        try:  # compiled (and cached) here, so a bad one is a 400 before it reaches the engine
            self.engine.engine.grammars.validate(structured)
        except ValueError as e:
            raise APIError(400, f"{field_name}: {e}", param=field_name) from None
        return dataclasses.replace(params, structured=structured)

    async def chat(self, req: ChatCompletionRequest, http: Request):
        mode = _tool_mode(req)
        if req.tool_choice not in (None, "none", "auto") and not req.tools:
            raise APIError(400, "tool_choice needs tools", param="tool_choice")
        response = await super().chat(req, http)
        if mode is None and not (req.tools and req.tool_choice in (None, "auto")):
            return response
        if isinstance(response, ChatCompletionResponse):
            from tokenmill.structured.tools import parse_auto_tool_calls, parse_tool_call

            for choice in response.choices:
                text = choice.message.content or ""
                if mode is not None:
                    call = parse_tool_call(text)
                    calls = [call] if call is not None else []
                else:
                    calls = parse_auto_tool_calls(text)
                if calls:
                    choice.message.tool_calls = [ToolCall(id=_call_id(), function=FunctionCall(name=n, arguments=a))
                                                 for n, a in calls]
                    choice.message.content = None
                    if choice.finish_reason == "stop":
                        choice.finish_reason = "tool_calls"
            return response
        if mode is not None:  # streaming a constrained call: rewrite content deltas as tool_call deltas
            response.body_iterator = _tool_call_events(response.body_iterator)
        return response


def _tool_mode(req: ChatCompletionRequest) -> str | None:
    if not req.tools or req.tool_choice in (None, "none", "auto"):
        return None
    return "required" if req.tool_choice == "required" else "named"


def _call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


async def _tool_call_events(events):
    from tokenmill.structured.tools import ToolCallStream

    streams: dict[int, tuple[ToolCallStream, list[str], str]] = {}
    try:
        async for event in events:
            body = event[len("data: "):].strip()
            if not event.startswith("data: {") or '"chat.completion.chunk"' not in body:
                yield event
                continue
            chunk = ChatCompletionChunk.model_validate(json.loads(body))
            for choice in chunk.choices:
                delta = choice.delta
                if delta.content is None or delta.role is not None:
                    continue
                stream, texts, call_id = streams.setdefault(choice.index, (ToolCallStream(), [], _call_id()))
                texts.append(delta.content)
                name, args = stream.feed("".join(texts), choice.finish_reason is not None)
                delta.content = None
                if name is not None or args:
                    delta.tool_calls = [DeltaToolCall(
                        index=0, id=call_id if name is not None else None, type="function" if name else None,
                        function=DeltaFunctionCall(name=name, arguments=args),
                    )]
                if choice.finish_reason == "stop":
                    choice.finish_reason = "tool_calls"
            yield f"data: {chunk.model_dump_json()}\n\n"
    finally:
        await events.aclose()


def attach_engine(app: FastAPI, engine) -> None:
    app.state.serving = StructuredServing(engine, app.state.model_name, app.state.metrics)
    app.state.tm.engine = engine


def begin_drain(app: FastAPI) -> None:
    """Stop admitting: new engine requests and /health get 503; in-flight ones run on."""
    app.state.tm.draining = True
