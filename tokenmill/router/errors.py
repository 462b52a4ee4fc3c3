"""Every error the router itself answers is OpenAI-shaped JSON: {"error": {message, type, param, code}}
(a replica's own errors pass through as it sent them)."""

from __future__ import annotations

from aiohttp import web

from tokenmill.error_types import ERROR_TYPES


def error(status: int, message: str, code: str | None = None, type_: str | None = None) -> web.Response:
    """OpenAI clients map the status to their exception types, so it matters as much as the body."""
    kind = type_ or ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "internal_server_error")
    return web.json_response({"error": {"message": message, "type": kind, "param": None, "code": code}},
                             status=status)
