"""Every error leaves the server as OpenAI-shaped JSON: {"error": {message, type, param, code}}.

OpenAI clients map the status code to their own exception types (400 BadRequestError, 401
AuthenticationError, 404 NotFoundError, 429 RateLimitError, ...), so the status matters as
much as the body. FastAPI's own 422 validation shape is replaced by a 400.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from tokenmill.error_types import ERROR_TYPES
from tokenmill.server.protocol import ErrorInfo, ErrorResponse

log = logging.getLogger("tokenmill.server")


class APIError(Exception):
    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None,
        headers: dict[str, str] | None = None, type: str | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers
        self.type = type  # where OpenAI's differs from the status's usual one (model_not_found)


def error_body(status: int, message: str, param: str | None = None, code: str | int | None = None,
               type: str | None = None) -> dict:
    """The JSON an error answers with (also a failed batch line's response body)."""
    error = ErrorInfo(message=message, type=type or ERROR_TYPES.get(status, "error"), param=param, code=code)
    return ErrorResponse(error=error).model_dump()


def error_response(
    status: int, message: str, param: str | None = None, code: str | int | None = None,
    headers: dict[str, str] | None = None, type: str | None = None,
) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code, type), status_code=status, headers=headers)


_SCALAR_LABELS = {"str", "int", "float", "bool", "none", "dict", "list", "[key]"}
_MAX_SHOWN = 80  # characters of a client's own value quoted back in a message


def _is_label(part: str) -> bool:
    """A union member's label in a pydantic location (str, list[...], constrained-int,
    NamedToolChoice), not a field name: field names are snake_case."""
    return part in _SCALAR_LABELS or "[" in part or "-" in part or part[:1].isupper()


def param_path(loc: tuple) -> str | None:
    """A pydantic location as OpenAI writes a parameter: messages[0].content[1].text."""
    out: list[str | int] = []
    label, tag_next = "", False
    for i, part in enumerate(loc):
        # FastAPI's first part says where the value came from; OpenAI names the parameter alone.
        if part == "body" or (i == 0 and part in ("query", "path")):
            continue
        if isinstance(part, int):
            out.append(part)
            # Items of a tagged union (a message by role, a content part by type) carry their
            # tag in the location right after the index: it names no field.
            tag_next = "tagged-union" in label or (len(out) >= 2 and out[-2] == "messages")
        elif _is_label(part):
            label = part
        elif tag_next:
            tag_next = False
        else:
            out.append(part)
            label = ""
    text = ""
    for part in out:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text or None


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= _MAX_SHOWN else text[:_MAX_SHOWN] + "...'"


def _is_type_error(err: dict) -> bool:
    kind = err.get("type", "")
    return kind.endswith(("_type", "_parsing")) or kind in ("literal_error", "is_instance_of")


def _pick(errors: list[dict]) -> dict:
    """Of a union's failed branches, the one that got furthest: a bad value inside a list of
    token ids says more than "not a string"; a content part of the wrong `type` is reported
    as that, not as the fields that type would have needed."""
    def rank(e: dict) -> tuple:
        loc = e.get("loc", ())
        return len(loc), bool(loc) and loc[-1] == "type", not _is_type_error(e)

    return max(errors, key=rank)


def _bound_code(kind: str, ctx: dict) -> str:
    bound = next(iter(ctx.values()), 0)
    number = "integer" if isinstance(bound, int) else "decimal"
    return f"{number}_{'below_min' if kind.startswith('greater') else 'above_max'}_value"


def validation_error(errors: list[dict]) -> tuple[str, str | None, str]:
    """(message, param, code) for pydantic's errors, in OpenAI's words; never echoes more
    than a short quote of the input (it may be huge, or a prompt)."""
    if not errors:
        return "invalid request", None, "invalid_value"
    first = _pick(errors)
    kind, ctx = first.get("type", ""), first.get("ctx") or {}
    param = param_path(tuple(first.get("loc", ())))
    if kind == "json_invalid":
        return f"malformed JSON body: {ctx.get('error', 'invalid JSON')}", None, "invalid_json"
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        field_name = str(ctx.get("discriminator", "")).strip("'")
        param = f"{param}.{field_name}" if param else field_name
        if kind == "union_tag_not_found":
            return f"Missing required parameter: '{param}'.", param, "missing_required_parameter"
        return (f"Invalid value for '{param}': {_shown(ctx.get('tag'))}. Supported values are: "
                f"{ctx.get('expected_tags')}.", param, "invalid_value")
    if kind == "missing":
        return f"Missing required parameter: '{param}'.", param, "missing_required_parameter"
    if kind == "value_error":
        message = str(ctx.get("error", first.get("msg", "invalid value")))
        field_name, sep, rest = message.partition(": ")
        if sep and field_name.isidentifier():
            param = f"{param}.{field_name}" if param else field_name
            message = rest
        return f"Invalid '{param}': {message}" if param else message, param, "invalid_value"
    if _is_type_error(first):
        # Every branch of a union failed on its type: say which types would do.
        wanted = dict.fromkeys(e.get("msg", "").removeprefix("Input should be ") for e in errors
                               if _is_type_error(e) and param_path(tuple(e.get("loc", ()))) == param)
        code = "invalid_value" if kind == "literal_error" else "invalid_type"
        return f"Invalid type for '{param}': expected {' or '.join(wanted)}.", param, code
    if kind.startswith(("greater_than", "less_than")):
        code = _bound_code(kind, ctx)
    elif kind in ("too_long", "string_too_long"):
        code = "array_above_max_length" if kind == "too_long" else "string_above_max_length"
    elif kind in ("too_short", "string_too_short"):
        code = "array_below_min_length" if kind == "too_short" else "string_below_min_length"
    else:
        code = "invalid_value"
    loc = tuple(first.get("loc", ()))
    if loc and loc[-1] == "[key]":  # a map's key (logit_bias's token ids): name the map, quote the key
        param = param_path(loc[:-2])
        return f"Invalid key {_shown(loc[-2])} in '{param}': {first.get('msg')}.", param, code
    return f"Invalid '{param}': {first.get('msg', 'invalid value')}.", param, code


def _allowed_methods(request: Request) -> list[str]:
    """Every method some route serves at this path: Starlette's 405 names only the first
    route's, and a path with one route per method (GET and POST /v1/files) has several."""
    methods: set[str] = set()
    for route in request.app.routes:
        if route.matches(request.scope)[0] is not Match.NONE:
            methods |= set(getattr(route, "methods", None) or ())
    return sorted(methods)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.param, exc.code, exc.headers, exc.type)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param, code = validation_error(list(exc.errors()))
        return error_response(400, message, param, code)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        headers = getattr(exc, "headers", None)
        if exc.status_code == 404:
            message = "not found: no such route"
        if exc.status_code == 405:
            headers = {**(headers or {}), "Allow": ", ".join(_allowed_methods(request))}
        return error_response(exc.status_code, message, headers=headers)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")  # the traceback, never the request body
        return error_response(500, f"internal error: {type(exc).__name__}")
