"""A scripted OpenAI-compatible streaming server for testing the bench client.

It is a fake on purpose: the unit under test is the client, and a script (fixed TTFT, fixed
gap between tokens, failures on chosen requests, TTFT growing with requests in flight) gives
timings the measurements must reproduce. It runs uvicorn on 127.0.0.1 in a thread.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from dataclasses import dataclass, field

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse


@dataclass
class Script:
    ttft_s: float = 0.02
    itl_s: float = 0.01
    # Extra TTFT per request in flight (including this one): a server that queues.
    ttft_per_inflight_s: float = 0.0
    send_usage: bool = True
    role_chunk_first: bool = True  # chat: an opening role-only chunk, which is not a token
    fail_http: set[int] = field(default_factory=set)   # request numbers answered with HTTP 500
    drop_stream: set[int] = field(default_factory=set)  # request numbers cut after 2 tokens
    error_event: set[int] = field(default_factory=set)  # request numbers ending in an error event
    seen: int = 0
    inflight: int = 0
    bodies: list[dict] = field(default_factory=list)


def make_app(script: Script) -> FastAPI:
    app = FastAPI()

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": "fake-model", "object": "model"}]}

    async def handle(request: Request, chat: bool):
        body = await request.json()
        script.bodies.append(body)
        n = script.seen
        script.seen += 1
        if n in script.fail_http:
            return JSONResponse({"error": {"message": "scripted failure", "type": "server_error"}}, status_code=500)
        tokens = int(body.get("max_tokens") or 16)

        def chunk(text: str | None, role: bool = False) -> str:
            if chat:
                delta = {"role": "assistant"} if role else {"content": text}
                choice = {"index": 0, "delta": delta, "finish_reason": None}
            else:
                choice = {"index": 0, "text": text, "finish_reason": None}
            return f"data: {json.dumps({'id': 'x', 'choices': [choice]})}\n\n"

        async def stream():
            script.inflight += 1
            try:
                if chat and script.role_chunk_first:
                    yield chunk(None, role=True)
                await asyncio.sleep(script.ttft_s + script.ttft_per_inflight_s * script.inflight)
                for i in range(tokens):
                    if i:
                        await asyncio.sleep(script.itl_s)
                    if n in script.drop_stream and i == 2:
                        raise ConnectionResetError("scripted drop")
                    if n in script.error_event and i == 2:
                        yield f"data: {json.dumps({'error': {'message': 'scripted error event'}})}\n\n"
                        return
                    yield chunk(f" w{i}")
                if script.send_usage:
                    usage = {"prompt_tokens": 3, "completion_tokens": tokens, "total_tokens": tokens + 3}
                    yield f"data: {json.dumps({'id': 'x', 'choices': [], 'usage': usage})}\n\n"
                yield "data: [DONE]\n\n"
            finally:
                script.inflight -= 1

        return StreamingResponse(stream(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await handle(request, chat=True)

    return app


class FakeServer:
    def __init__(self, script: Script | None = None):
        self.script = script or Script()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        sock.close()
        config = uvicorn.Config(make_app(self.script), host="127.0.0.1", port=self.port, log_level="error")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> FakeServer:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("fake server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
