"""--log-requests: the text of each engine request and of its answer, for debugging only.

Off by default: prompts and completions are user data, and logs travel further than responses
do (aggregators, tickets, screenshots). Without it the server logs requests by path and status
only (uvicorn's access line) and errors by kind, never a body.
"""

from __future__ import annotations

import itertools
import logging

from tokenmill.server.guard import ENGINE_PATHS

log = logging.getLogger("tokenmill.requests")

MAX_LOGGED_BYTES = 16 * 1024  # of each body: enough to debug with, not a second copy of a big prompt


def _clip(data: bytes) -> str:
    text = data[:MAX_LOGGED_BYTES].decode("utf-8", errors="replace")
    return text + (f"... ({len(data)} bytes)" if len(data) > MAX_LOGGED_BYTES else "")


class RequestLog:
    """ASGI middleware: logs an engine request's body when it is read, and the response's
    status and body (a stream's events included) when it ends."""

    def __init__(self, app):
        self.app = app
        self._ids = itertools.count(1)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] not in ENGINE_PATHS:
            return await self.app(scope, receive, send)
        number = next(self._ids)
        status = 0
        body = bytearray()
        logged = False

        def log_response() -> None:
            nonlocal logged
            if not logged:
                logged = True
                log.info("response %d %d: %s", number, status, _clip(bytes(body)))

        async def logged_receive():
            message = await receive()
            if message["type"] == "http.request" and message.get("body"):
                log.info("request %d %s: %s", number, scope["path"], _clip(message["body"]))
            return message

        async def logged_send(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                if len(body) <= MAX_LOGGED_BYTES:
                    body.extend(message.get("body", b""))
                if not message.get("more_body", False):
                    # Logged before the last byte leaves, so the line is written by the time
                    # the client has its answer (a reader of the log never races the client).
                    log_response()
            await send(message)

        try:
            await self.app(scope, logged_receive, logged_send)
        finally:
            log_response()  # a response cut short (disconnect, error) is logged with what was sent
