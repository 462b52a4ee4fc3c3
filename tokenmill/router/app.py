"""The router's HTTP front on aiohttp.web: the OpenAI routes (proxy.py does the proxying),
/health, /metrics, the admin API, API keys and OpenAI-shaped errors.

aiohttp.web, not FastAPI: the router is a hop, and FastAPI/Starlette's request and response
stack was about 40% of its CPU per proxied request (docs/benchmarks.md, router overhead);
aiohttp is already its client to the replicas, so one HTTP stack serves both sides.
"""

from __future__ import annotations

import asyncio
import gc
import hmac
import logging
import time
from collections.abc import Callable

import aiohttp
from aiohttp import web

from tokenmill.router.errors import error
from tokenmill.router.metrics import CONTENT_TYPE
from tokenmill.router.proxy import Fleet

log = logging.getLogger("tokenmill.router")


def _guard(keys: list[bytes]):
    """API keys on every path but /health (compared in constant time), and every error the
    router raises itself (404, 405, 413, a bug) answered as OpenAI JSON."""

    @web.middleware
    async def guard(request: web.Request, handler) -> web.StreamResponse:
        if keys and request.path != "/health":
            auth = request.headers.get("Authorization", "").encode()
            token = auth[7:] if auth[:7].lower() == b"bearer " else b""
            # every key compared, so the time taken does not say which one came close
            if not sum(hmac.compare_digest(token, k) for k in keys):
                return error(401, "invalid or missing API key")
        try:
            return await handler(request)
        except web.HTTPRequestEntityTooLarge as e:
            return error(413, e.text, code="body_too_large")
        except web.HTTPException as e:
            if e.status < 400:
                raise
            return error(e.status, e.reason)
        except (asyncio.CancelledError, ConnectionError):
            raise
        except Exception:  # a bug here must still answer in the shape clients parse
            log.exception("router error on %s %s", request.method, request.path)
            return error(500, "internal router error")

    return guard


async def _json_object(request: web.Request) -> dict:
    try:
        body = await request.json()
    except ValueError as e:
        raise web.HTTPBadRequest(reason=f"the body is not JSON: {e}") from None
    if not isinstance(body, dict):
        raise web.HTTPBadRequest(reason="the body must be a JSON object")
    return body


def create_app(fleet: Fleet, api_keys: list[str] = (), on_shutdown: Callable[[], None] | None = None) -> web.Application:
    """`on_shutdown` runs (on a thread) when the server stops, SIGTERM included."""

    async def lifecycle(_: web.Application):
        s = fleet.settings
        # aiohttp, not httpx: a proxied request costs about a third of the CPU time through it
        # (docs/benchmarks.md, router overhead), and this hop is all the router adds.
        fleet.client = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=s.connect_timeout_s, sock_read=s.read_timeout_s),
            connector=aiohttp.TCPConnector(limit=2048, limit_per_host=0, keepalive_timeout=30),
            skip_auto_headers=("User-Agent",))
        await fleet.tick()  # know the fleet before the first request
        # What start-up built (modules, the CLI's imports) lives as long as the process: out of
        # the collector's sight, each collection of the old generation is cheaper.
        gc.freeze()
        # A proxied request leaves little cyclic garbage: collect young objects 10x less often.
        gc.set_threshold(7000, 10, 10)
        task = asyncio.create_task(fleet.run_health())
        try:
            yield
        finally:
            task.cancel()
            await fleet.client.close()
            if on_shutdown is not None:
                await asyncio.to_thread(on_shutdown)

    async def completions(request: web.Request) -> web.StreamResponse:
        return await fleet.forward("/v1/completions", request)

    async def chat(request: web.Request) -> web.StreamResponse:
        return await fleet.forward("/v1/chat/completions", request)

    async def models(request: web.Request) -> web.StreamResponse:
        return await fleet.models(request)

    async def health(_: web.Request) -> web.Response:
        up = sum(r.healthy and not (r.draining or r.server_draining) for r in fleet.replicas)
        body = {"status": "ok" if up else "unavailable", "replicas": len(fleet.replicas), "healthy": up}
        return web.json_response(body, status=200 if up else 503)

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=fleet.metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    async def replicas(_: web.Request) -> web.Response:
        return web.json_response([
            {"url": r.url, "version": r.version, "healthy": r.healthy, "draining": r.draining,
             "server_draining": r.server_draining, "in_flight": r.in_flight, "pending_blocks": r.pending_blocks,
             "waiting": r.waiting,
             "running": r.running, "kv_usage": r.kv_usage, "index_blocks": len(r.index),
             "tokenizer": fleet.tokenizers.get(r.fingerprint) is not None}
            for r in fleet.replicas])

    async def drain(request: web.Request) -> web.Response:
        body = await _json_object(request)
        r = fleet.replicas.get(str(body.get("url", "")).rstrip("/"))
        if r is None:
            return error(404, "no such replica")
        r.draining = bool(body.get("draining", True))
        log.warning("replica %s %s by the admin API", r.url, "draining" if r.draining else "undrained")
        return web.json_response({"url": r.url, "draining": r.draining})

    async def rollout(_: web.Request) -> web.Response:
        return web.json_response(fleet.rollout.snapshot())

    async def change_rollout(request: web.Request) -> web.Response:
        """{"canary": "v2", "auto": true, "percent": 10} starts one; {"percent": P} sets the
        split (100 promotes, 0 stops sending); {"action": "rollback"} is percent 0."""
        body = await _json_object(request)
        now = time.monotonic()
        try:
            if body.get("canary"):
                event = fleet.rollout.start(str(body["canary"]), now, bool(body.get("auto", True)),
                                            None if body.get("percent") is None else float(body["percent"]))
            elif body.get("action") == "rollback":
                event = fleet.rollout.set_percent(0.0, now, "admin rollback")
            elif "percent" in body:
                event = fleet.rollout.set_percent(float(body["percent"]), now)
            else:
                return error(400, "expected canary, percent or action")
        except (ValueError, TypeError) as e:
            return error(400, str(e))
        fleet.count_rollout(event)
        return web.json_response(fleet.rollout.snapshot())

    app = web.Application(middlewares=[_guard([k.encode() for k in api_keys])],
                          client_max_size=fleet.settings.max_body_bytes)
    app.cleanup_ctx.append(lifecycle)
    app.add_routes([
        web.post("/v1/completions", completions),
        web.post("/v1/chat/completions", chat),
        web.get("/v1/models", models),
        web.get("/health", health),
        web.get("/metrics", metrics),
        web.get("/admin/replicas", replicas),
        web.post("/admin/replicas/drain", drain),
        web.get("/admin/rollout", rollout),
        web.post("/admin/rollout", change_rollout),
    ])
    return app
