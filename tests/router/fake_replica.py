"""A replica stand-in for rollout tests: answers the OpenAI routes at once (or late, or with a
500), and publishes the health and load a `tokenmill serve` does, but no tokenizer (the router
then routes without prefix prediction). It runs on its own event loop in a thread, so a test
starts it in milliseconds; the router in front of it is the real `tokenmill router` process."""

from __future__ import annotations

import asyncio
import json
import threading

from aiohttp import web

from tests.server.conftest import free_port

USAGE = {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9, "prompt_tokens_details": {"cached_tokens": 0}}


class FakeReplica:
    """mode: "ok"; "errors" (every completion a 500); "slow" (the first byte after `delay` s);
    "late_end" (a stream's body ends `delay` s after its [DONE] event)."""

    def __init__(self, mode: str = "ok", delay: float = 0.5):
        self.mode, self.delay = mode, delay
        self.completions = 0  # requests that reached the completion routes
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> FakeReplica:
        self._thread.start()
        if not self._started.wait(10):
            raise RuntimeError("the fake replica did not start")
        return self

    def __exit__(self, *_):
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._main())

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        app = web.Application()
        app.add_routes([web.get("/health", self._health), web.get("/metrics", self._metrics),
                        web.post("/v1/completions", self._complete), web.post("/v1/chat/completions", self._complete)])
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", self.port).start()
        self._started.set()
        await self._stop.wait()
        await runner.cleanup()

    async def _health(self, _: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _metrics(self, _: web.Request) -> web.Response:
        return web.Response(text='vllm:num_requests_waiting{model_name="m"} 0\n'
                                 'vllm:num_requests_running{model_name="m"} 0\n'
                                 'vllm:kv_cache_usage_perc{model_name="m"} 0.1\n')

    async def _complete(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.completions += 1
        if self.mode == "errors":
            return web.json_response({"error": {"message": "canary broke", "type": "internal_server_error",
                                                "param": None, "code": None}}, status=500)
        if self.mode == "slow":
            await asyncio.sleep(self.delay)
        if not body.get("stream"):
            return web.json_response({"choices": [{"index": 0, "text": "ok ok ok ok", "finish_reason": "length"}],
                                      "usage": USAGE})
        out = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await out.prepare(request)
        for _ in range(4):
            await out.write(b'data: {"choices": [{"index": 0, "text": "ok "}]}\n\n')
        await out.write(f"data: {json.dumps({'choices': [], 'usage': USAGE})}\n\ndata: [DONE]\n\n".encode())
        if self.mode == "late_end":
            await asyncio.sleep(self.delay)
        await out.write_eof()
        return out
