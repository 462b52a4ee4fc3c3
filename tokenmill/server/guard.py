"""The door: API keys, body size limit and drain, before any route runs.

A plain ASGI middleware (not a FastAPI dependency) so it covers every path, unknown ones
included, and can refuse an oversized body before anything parses it. Whether a model is
loaded is the route's question (tokenmill.server.served): the door cannot tell which model
a request is for without parsing its body.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass, field

from tokenmill.server.errors import error_response

OPEN_PATHS = ("/health",)  # reachable without a key (load balancers probe it)
ENGINE_PATHS = ("/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/reset_prefix_cache")


@dataclass
class ServerState:
    """Mutable state shared by the guard, the routes and the drain logic."""

    api_keys: list[bytes] = field(default_factory=list)
    max_body_bytes: int = 4 * 1024 * 1024
    max_upload_bytes: int = 200 * 1024 * 1024  # /v1/files: a batch file (OpenAI's limit is 200 MB)
    draining: bool = False
    in_flight: int = 0  # requests on ENGINE_PATHS still being answered (streams included)

    def authorized(self, header: bytes | None) -> bool:
        if not self.api_keys:
            return True
        if not header or not header[:7].lower() == b"bearer ":
            return False
        given = header[7:].strip()
        # Compare against every key (no early exit) so timing says nothing about which matched.
        ok = False
        for key in self.api_keys:
            ok |= hmac.compare_digest(given, key)
        return ok


class Guard:
    def __init__(self, app, state: ServerState):
        self.app = app
        self.state = state

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path: str = scope["path"]
        headers = dict(scope["headers"])  # last value wins; fine for the two we read
        if path not in OPEN_PATHS and not self.state.authorized(headers.get(b"authorization")):
            return await error_response(
                401, "invalid or missing API key (send 'Authorization: Bearer <key>')", code="invalid_api_key"
            )(scope, receive, send)
        engine_path = path in ENGINE_PATHS
        if engine_path and self.state.draining:
            return await error_response(503, "server is shutting down", code="draining")(scope, receive, send)
        limit = self.state.max_upload_bytes if path == "/v1/files" else self.state.max_body_bytes
        declared = headers.get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            return await self._too_large(scope, receive, send)
        # Read the whole body here (it is bounded) so chunked uploads are capped as well.
        chunks, total = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            total += len(body)
            if total > limit:
                return await self._too_large(scope, receive, send)
            chunks.append(body)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # afterwards: the real channel, so disconnects are seen

        if not engine_path:
            return await self.app(scope, replay, send)
        self.state.in_flight += 1
        try:
            await self.app(scope, replay, send)
        finally:
            self.state.in_flight -= 1

    async def _too_large(self, scope, receive, send) -> None:
        limit = self.state.max_upload_bytes if scope["path"] == "/v1/files" else self.state.max_body_bytes
        await error_response(
            413, f"request body exceeds the limit of {limit} bytes", code="body_too_large"
        )(scope, receive, send)
