"""Every error the router itself answers is OpenAI-shaped JSON: {"error": {message, type, param, code}}
(a replica's own errors pass through as it sent them)."""

from __future__ import annotations

from aiohttp import web

_TYPES = {401: "invalid_request_error", 403: "permission_error", 404: "not_found_error", 429: "rate_limit_error",
          500: "internal_server_error", 503: "service_unavailable"}


def error(status: int, message: str, code: str | None = None, type_: str | None = None) -> web.Response:
    """OpenAI clients map the status to their exception types, so it matters as much as the body."""
    kind = type_ or _TYPES.get(status, "invalid_request_error" if status < 500 else "internal_server_error")
    return web.json_response({"error": {"message": message, "type": kind, "param": None, "code": code}},
                             status=status)
