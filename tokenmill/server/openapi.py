"""The server's OpenAPI schema, exact: what each route takes and every answer it can give.

FastAPI derives the request bodies from the pydantic models (tokenmill.server.protocol) but,
left alone, documents a 422 the server never sends (errors.py answers 400 in OpenAI's shape),
says nothing of the streamed answers, the error statuses, the API key, or the routes that
return plain responses. Clients generate code from this schema and the fuzz tests generate
bodies from it, so it is completed here, in one table, rather than guessed by the framework.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from tokenmill.server.protocol import (
    ChatCompletionChunk,
    ChatCompletionResponse,
    CompletionResponse,
    EmbeddingResponse,
    ErrorResponse,
    HealthStatus,
    ModelList,
    PrefixCacheReset,
)

_REF = "#/components/schemas/{model}"
_ERROR_TEXT = {
    400: "invalid request: the error's param names the offending field",
    401: "missing or wrong API key",
    404: "unknown model (code model_not_found) or route",
    409: "the model is loading or unloading, or a load would pass the memory budget (the message says by how "
         "much); for profiling: a profile already started, or none to stop",
    413: "request body over the size limit",
    429: "the engine's queue is full; retry after the Retry-After header's seconds",
    500: "internal error",
    503: "the model is loading, its engine failed, or the server is draining",
}
_ENGINE_ERRORS = (400, 401, 404, 413, 429, 500, 503)
_SSE_NOTE = ("each event's data is one {chunk} as JSON, an ErrorResponse if generation fails after the "
             "stream started, and last the text [DONE]")


def _json(model: type[BaseModel]) -> dict:
    return {"application/json": {"schema": {"$ref": _REF.format(model=model.__name__)}}}


def _answer(description: str, content: dict) -> dict:
    return {"description": description, "content": content}


def _generation(model: type[BaseModel], chunk: type[BaseModel]) -> dict:
    """A generation route's 200: one JSON body, or (stream=true) server-sent events. Before
    OpenAPI 3.2 a text/event-stream `schema` describes one event (as schemathesis reads it)."""
    payload = {"contentMediaType": "application/json",
               "contentSchema": {"oneOf": [{"$ref": _REF.format(model=chunk.__name__)},
                                           {"$ref": _REF.format(model=ErrorResponse.__name__)}]}}
    data = {"type": "string", "description": _SSE_NOTE.format(chunk=chunk.__name__),
            "anyOf": [{"const": "[DONE]"}, payload]}
    event = {"type": "object", "required": ["data"], "properties": {"data": data}}
    return _answer("the completion (stream=false), or its chunks as server-sent events (stream=true)",
                   {**_json(model), "text/event-stream": {"schema": event}})


def _errors(statuses: tuple[int, ...]) -> dict:
    return {str(s): _answer(_ERROR_TEXT[s], _json(ErrorResponse)) for s in statuses}


_INT, _STR = {"type": "integer"}, {"type": "string"}
_LIMITS = {"type": "object", "properties": {
    "max_num_seqs": _INT, "max_num_batched_tokens": _INT, "num_kv_blocks": _INT, "enable_prefix_caching": {"type": "boolean"},
    "kv_cache_tokens": _INT, "kv_cache_dtype": {"anyOf": [_STR, {"type": "null"}]},
    "speculative_method": {"anyOf": [_STR, {"type": "null"}]}, "num_speculative_tokens": _INT,
    "speculative_disable_by_batch_size": _INT}}
_INFO = {"type": "object", "required": ["models"], "properties": {"models": {"type": "array", "items": {
    "type": "object", "required": ["id", "block_size", "max_model_len", "fingerprint"],
    "properties": {"id": _STR, "block_size": _INT, "max_model_len": _INT, "fingerprint": _STR, "limits": _LIMITS}}}}}
_TOKENIZER = {"type": "object", "required": ["tokenizer_json", "eos_token_ids", "fingerprint"], "properties": {
    "tokenizer_json": _STR, "bos_token_id": {"anyOf": [_INT, {"type": "null"}]},
    "eos_token_ids": {"type": "array", "items": _INT}, "chat_template": {"anyOf": [_STR, {"type": "null"}]},
    "add_bos_token": {"type": "boolean"}, "fingerprint": _STR}}

_REPO_STATE = {"type": "string", "enum": ["loading", "ready", "unloading", "unavailable"]}
_REPO_INDEX = {"type": "array", "items": {"type": "object", "required": ["name", "kind", "state", "reason", "bytes"],
               "properties": {"name": _STR, "kind": {"anyOf": [{"type": "string", "enum": ["generate", "embedding"]},
                                                               {"type": "null"}]},
                              "state": _REPO_STATE, "reason": {"anyOf": [_STR, {"type": "null"}]},
                              "bytes": {"anyOf": [_INT, {"type": "null"}]}}}}
_REPO_ANSWER = {"type": "object", "required": ["name", "state"], "properties": {"name": _STR, "state": _REPO_STATE}}
_REPO_ERRORS = (400, 401, 404, 409)

# The Batch API (server/batches.py): OpenAI's file and batch objects.
_NULL = {"type": "null"}
_TIME = {"anyOf": [_INT, _NULL]}
_FILE = {"type": "object", "required": ["id", "object", "bytes", "created_at", "filename", "purpose"], "properties": {
    "id": _STR, "object": {"const": "file"}, "bytes": _INT, "created_at": _INT, "filename": _STR,
    "purpose": {"enum": ["batch", "batch_output"]}, "status": _STR}}
_LINE_ERROR = {"type": "object", "required": ["code", "message"], "properties": {
    "code": _STR, "message": _STR, "param": {"anyOf": [_STR, _NULL]}, "line": _TIME}}
_BATCH = {"type": "object", "required": ["id", "object", "endpoint", "input_file_id", "status", "request_counts"],
          "properties": {
    "id": _STR, "object": {"const": "batch"}, "endpoint": _STR, "input_file_id": _STR, "completion_window": _STR,
    "status": {"enum": ["validating", "failed", "in_progress", "finalizing", "completed", "expired", "cancelling",
                        "cancelled"]},
    "errors": {"anyOf": [_NULL, {"type": "object", "required": ["object", "data"], "properties": {
        "object": {"const": "list"}, "data": {"type": "array", "items": _LINE_ERROR}}}]},
    "output_file_id": {"anyOf": [_STR, _NULL]}, "error_file_id": {"anyOf": [_STR, _NULL]},
    **{f"{t}_at": _TIME for t in ("created", "in_progress", "expires", "finalizing", "completed", "failed",
                                  "expired", "cancelling", "cancelled")},
    "request_counts": {"type": "object", "required": ["total", "completed", "failed"],
                       "properties": {"total": _INT, "completed": _INT, "failed": _INT}},
    "metadata": {"anyOf": [_NULL, {"type": "object", "additionalProperties": _STR}]}}}


def _list_of(item: dict, **extra) -> dict:
    return {"application/json": {"schema": {"type": "object", "required": ["object", "data", "has_more"],
                                            "properties": {"object": {"const": "list"}, "data": {
                                                "type": "array", "items": item}, "has_more": {"type": "boolean"},
                                                **extra}}}}


def _one(schema: dict) -> dict:
    return {"application/json": {"schema": schema}}


_DELETED = {"type": "object", "required": ["id", "object", "deleted"],
            "properties": {"id": _STR, "object": {"const": "file"}, "deleted": {"type": "boolean"}}}
_ID_OR_NULL = {"anyOf": [_STR, _NULL]}
BATCH_ROUTES: dict[str, dict[str, dict[str, Any]]] = {
    "/v1/files": {
        "post": {"200": _answer("the stored file (purpose batch: one request per line)", _one(_FILE)),
                 **_errors((400, 401, 413))},
        "get": {"200": _answer("the stored files, newest first (`order`); `after` pages on",
                               _list_of(_FILE, first_id=_ID_OR_NULL, last_id=_ID_OR_NULL)), **_errors((400, 401))}},
    "/v1/files/{file_id}": {
        "get": {"200": _answer("the file's record", _one(_FILE)), **_errors((401, 404))},
        "delete": {"200": _answer("the file is gone", _one(_DELETED)), **_errors((401, 404))}},
    "/v1/files/{file_id}/content": {
        "get": {"200": _answer("the file's bytes (JSON lines)",
                               {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}),
                **_errors((401, 404))}},
    "/v1/batches": {
        "post": {"200": _answer("the new batch (status validating)", _one(_BATCH)), **_errors((400, 401, 404, 413))},
        "get": {"200": _answer("batches, newest first; `after` pages on",
                               _list_of(_BATCH, first_id=_ID_OR_NULL, last_id=_ID_OR_NULL)), **_errors((400, 401))}},
    "/v1/batches/{batch_id}": {"get": {"200": _answer("the batch", _one(_BATCH)), **_errors((401, 404))}},
    "/v1/batches/{batch_id}/cancel": {
        "post": {"200": _answer("the batch (cancelling, or as it was if already ended)", _one(_BATCH)),
                 **_errors((401, 404))}},
}

# path -> method -> status -> answer. Every status a route can send is listed.
ROUTES: dict[str, dict[str, dict[str, Any]]] = {
    "/v1/completions": {"post": {"200": _generation(CompletionResponse, CompletionResponse),
                                 **_errors(_ENGINE_ERRORS)}},
    "/v1/chat/completions": {"post": {"200": _generation(ChatCompletionResponse, ChatCompletionChunk),
                                      **_errors(_ENGINE_ERRORS)}},
    "/v1/embeddings": {"post": {"200": _answer("one embedding per input, in input order", _json(EmbeddingResponse)),
                                **_errors(_ENGINE_ERRORS)}},
    "/v1/models": {"get": {"200": _answer("the served models", _json(ModelList)), **_errors((401,))}},
    "/health": {"get": {"200": _answer("every model is loaded and its engine runs", _json(HealthStatus)),
                        **_errors((503,))}},
    "/metrics": {"get": {"200": _answer("Prometheus text exposition (vLLM metric names)",
                                        {"text/plain": {"schema": {"type": "string"}}}), **_errors((401,))}},
    "/reset_prefix_cache": {"post": {"200": _answer("whether every loaded model's cache was reset",
                                                    _json(PrefixCacheReset)), **_errors((401, 503))}},
    # Torch profiler traces of the engine steps (server/profiling.py); 400 without --profile-dir.
    "/start_profile": {"post": {"200": _answer("every loaded engine records its steps", {"application/json": {
        "schema": {"type": "object", "required": ["profiling"], "properties": {"profiling": {"type": "boolean"}}}}}),
        **_errors((400, 401, 409, 503))}},
    "/stop_profile": {"post": {"200": _answer("the traces written (Chrome trace JSON), one per engine", {
        "application/json": {"schema": {"type": "object", "required": ["profiling", "traces"], "properties": {
            "profiling": {"type": "boolean"}, "traces": {"type": "array", "items": _STR}}}}}),
        **_errors((400, 401, 409, 503))}},
    # Model control (server/repository.py), as Triton's explicit mode.
    "/v2/repository/index": {"get": {"200": _answer("every model of the repository with its state",
                                                    {"application/json": {"schema": _REPO_INDEX}}), **_errors((401,))}},
    "/v2/repository/models/{name}/load": {"post": {"200": _answer("the model is loaded and ready",
                                                                  {"application/json": {"schema": _REPO_ANSWER}}),
                                                   **_errors(_REPO_ERRORS)}},
    "/v2/repository/models/{name}/unload": {"post": {"200": _answer("the model's requests drained and it is unloaded",
                                                                    {"application/json": {"schema": _REPO_ANSWER}}),
                                                     **_errors(_REPO_ERRORS)}},
    # What a router reads of this server (server/info.py).
    "/v1/tokenmill/info": {"get": {"200": _answer("per model: block size, context, tokenizer fingerprint, batch and cache limits",
                                                  {"application/json": {"schema": _INFO}}), **_errors((401,))}},
    "/v1/tokenmill/tokenizer": {"get": {"200": _answer("a model's tokenizer as the engine uses it",
                                                       {"application/json": {"schema": _TOKENIZER}}),
                                        **_errors((400, 401, 404))}},
    **BATCH_ROUTES,  # served only with a data directory
}
_OPEN = ("/health",)  # reachable without a key (guard.OPEN_PATHS)
_DESCRIBED = (CompletionResponse, ChatCompletionResponse, ChatCompletionChunk, EmbeddingResponse, ErrorResponse,
              ModelList, HealthStatus, PrefixCacheReset)


def exact_openapi(app: FastAPI) -> dict:
    schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
    components = schema.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    for unused in ("HTTPValidationError", "ValidationError"):  # FastAPI's 422, never sent
        schemas.pop(unused, None)
    _, defs = models_json_schema([(m, "serialization") for m in _DESCRIBED], ref_template=_REF)
    schemas.update(defs.get("$defs", {}))
    components["securitySchemes"] = {"apiKey": {"type": "http", "scheme": "bearer",
                                                "description": "needed when the server was given API keys"}}
    for path, methods in ROUTES.items():
        if path not in schema["paths"]:
            continue  # a route this app does not serve (the Batch API without a data directory)
        for method, answers in methods.items():
            op = schema["paths"][path][method]
            op["responses"] = answers
            op["security"] = [] if path in _OPEN else [{"apiKey": []}]
            if "requestBody" in op:
                op["requestBody"]["required"] = True
    return schema


def install_openapi(app: FastAPI) -> None:
    """Serve exact_openapi() at /openapi.json (built once, on first request)."""
    cached: dict = {}

    def openapi() -> dict:
        if not cached:
            cached.update(exact_openapi(app))
        return cached

    app.openapi = openapi
