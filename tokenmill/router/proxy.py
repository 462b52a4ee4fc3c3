"""The HTTP front: OpenAI routes proxied to the chosen replica, streams passed through chunk
by chunk, plus /health, /metrics and the admin API.

A request may move to another replica only while nothing of it has reached the client: a
refused connection, a 5xx/429 status, or a stream that breaks before its first chunk. The
first chunk is read before the response starts, so a retry never duplicates text. After it,
a replica failure ends the stream with an OpenAI error event and [DONE], never a hang.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import random
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import aiohttp
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from tokenmill.router.metrics import CONTENT_TYPE, RouterMetrics
from tokenmill.router.policy import Decision, Policy
from tokenmill.router.prefix_index import block_hashes, usable_blocks
from tokenmill.router.prompts import Tokenizers, prompt_ids
from tokenmill.router.replicas import Replica, ReplicaFile, ReplicaSet, probe
from tokenmill.router.rollout import Outcome, Rollout
from tokenmill.router.settings import RouterSettings

log = logging.getLogger("tokenmill.router")

RETRY_STATUS = (429, 500, 502, 503, 504)
# What a replica failing on the wire looks like: refused, reset, timed out, a broken body.
CLIENT_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError)  # the replica could not take it: another may
_HOP_HEADERS = ("content-type", "authorization", "accept")
VERSION_HEADER = "x-tokenmill-version"  # which version group answered: A/B clients and tests read it


@dataclass
class Fleet:
    """Everything one router knows: replicas, policy, rollout, tokenizers, metrics."""

    replicas: ReplicaSet
    policy: Policy
    rollout: Rollout
    settings: RouterSettings = field(default_factory=RouterSettings)
    replica_file: ReplicaFile | None = None
    rng: random.Random = field(default_factory=random.Random)
    tokenizers: Tokenizers = field(default_factory=Tokenizers)
    client: aiohttp.ClientSession | None = None

    def __post_init__(self):
        self.metrics = RouterMetrics(lambda: (list(self.replicas), self.rollout.snapshot()))

    # -- background: health, replica file, rollout gate ----------------------------------
    async def tick(self) -> None:
        if self.replica_file is not None:
            specs = self.replica_file.read_if_changed()
            if specs is not None:
                self.replicas.sync(specs)
        now = time.monotonic()
        await asyncio.gather(*(probe(self.client, r, now, self.settings.health_timeout_s) for r in self.replicas))
        for r in self.replicas:
            if r.healthy and r.fingerprint and r.model:
                self.tokenizers.ensure(self.client, r.fingerprint, r.url, r.model)
        event = self.rollout.evaluate(time.monotonic())
        if event is not None:
            self.count_rollout(event)

    def count_rollout(self, event) -> None:
        log.warning("rollout %s -> %.0f%% (%s)", event.action, event.percent, event.reason)
        self.metrics.rollout_events.labels(event.action).inc()

    async def run_health(self) -> None:
        while True:
            try:
                await self.tick()
            except Exception:  # one bad tick must not stop health checking for good
                log.exception("health tick failed")
            await asyncio.sleep(self.settings.health_interval_s)

    # -- the decision ----------------------------------------------------------------------
    def pick(self, path: str, body: dict, version: str, session: str | None,
             exclude: set[str]) -> tuple[Replica | None, Decision | None, list[bytes]]:
        pool = [r for r in self.replicas if r.url not in exclude]
        in_version = [r for r in pool if r.version == version]
        # A version with no live replica must not turn into 503s: the others take it.
        if any(r.healthy and not (r.draining or r.server_draining) for r in in_version):
            pool = in_version
        fp = self._fp(pool)
        hashes, prompt_blocks = self._hashes(path, body, pool, fp)
        views = [r.view(r.index.match(hashes) if hashes and r.fingerprint == fp else 0) for r in pool]
        decision = self.policy.choose(views, time.monotonic(), self.rng, prompt_blocks, session)
        if decision is None:
            return None, None, []
        self.metrics.decisions.labels(decision.reason).inc()
        return self.replicas.get(decision.replica), decision, hashes

    def _fp(self, pool: list[Replica]) -> str | None:
        return next((r.fingerprint for r in pool if self.tokenizers.get(r.fingerprint) is not None), None)

    def _hashes(self, path: str, body: dict, pool: list[Replica], fp: str | None) -> tuple[list[bytes], int]:
        """The prompt's usable block hashes under the pool's tokenizer (`fp`), for the policies
        that read them (session falls back to prefix without a key)."""
        if self.policy.config.policy not in ("prefix", "session"):
            return [], 0
        r = next((r for r in pool if r.fingerprint == fp), None)
        if fp is None or r is None or not r.block_size:
            return [], 0
        ids = prompt_ids(self.tokenizers.get(fp), path, body, self.tokenizers.encoders.get(fp))
        if ids is None:
            return [], 0
        n = usable_blocks(len(ids), r.block_size)
        return block_hashes(ids[:n * r.block_size], r.block_size), n

    def headers(self, request: Request) -> dict[str, str]:
        out = {k: v for k, v in request.headers.items() if k.lower() in _HOP_HEADERS}
        if self.settings.replica_api_key:
            out["authorization"] = f"Bearer {self.settings.replica_api_key}"
        return out

    # -- the proxy ------------------------------------------------------------------------
    async def forward(self, path: str, request: Request) -> Response:
        started = time.monotonic()
        raw = await request.body()
        try:
            body = json.loads(raw)
            if not isinstance(body, dict):
                raise ValueError("not an object")
        except ValueError as e:
            return _error(400, f"the body is not a JSON object: {e}", "invalid_request_error")
        stream = bool(body.get("stream"))
        session = request.headers.get(self.settings.session_header) or body.get("user")
        version = self.rollout.version_for(str(session) if session else uuid.uuid4().hex)
        # The body was just parsed as JSON: say so, whatever the client sent (aiohttp would
        # otherwise label raw bytes application/octet-stream, which the replica refuses).
        headers = {**self.headers(request), "content-type": "application/json"}
        tried: set[str] = set()
        for attempt in range(self.settings.max_attempts):
            replica, decision, hashes = self.pick(path, body, version, str(session) if session else None, tried)
            if replica is None:
                break
            if attempt:
                self.metrics.retries.inc()
            tried.add(replica.url)
            replica.index.insert(hashes)
            replica.in_flight += 1
            done = _Done(self, replica, decision, started)
            try:
                answer = await self._attempt(path, raw, headers, stream, attempt, replica, done)
            except asyncio.CancelledError:  # the client left while we waited on the replica
                done.finish(ok=None)
                raise
            if answer is not None:
                return answer
        return _error(503, "no replica could take the request", "service_unavailable")

    async def _attempt(self, path: str, raw: bytes, headers: dict, stream: bool, attempt: int, replica: Replica,
                       done: _Done) -> Response | None:
        """One try on one replica: its response, or None to try another (nothing sent yet)."""
        try:
            resp = await self.client.post(replica.url + path, data=raw, headers=headers)
        except CLIENT_ERRORS as e:
            replica.mark_failed(f"{type(e).__name__} on connect")
            done.finish(ok=False)
            return None
        try:
            if resp.status in RETRY_STATUS and attempt + 1 < self.settings.max_attempts:
                resp.close()
                if resp.status == 503:
                    replica.healthy = False  # draining or loading: the next probe decides
                done.finish(ok=False)
                return None
            if not stream or resp.status != 200:
                content = await resp.read()
                resp.release()
                done.finish(ok=resp.status < 500, usage_from=content)
                return Response(content, resp.status, media_type=resp.headers.get("content-type"),
                                headers={VERSION_HEADER: replica.version})
            chunks = resp.content.iter_any()
            first = await _first_chunk(chunks)
        except CLIENT_ERRORS as e:  # broke before any byte went out: try elsewhere
            resp.close()
            replica.mark_failed(f"{type(e).__name__} before the first byte")
            done.finish(ok=False)
            return None
        except asyncio.CancelledError:
            resp.close()
            raise
        done.first_byte()
        return _Stream(self._relay(first, chunks, resp, done), resp, done,
                       headers={"Cache-Control": "no-cache", VERSION_HEADER: replica.version})

    async def _relay(self, first: bytes, chunks: AsyncIterator[bytes], resp: aiohttp.ClientResponse,
                     done: _Done) -> AsyncIterator[bytes]:
        tail = first[-_TAIL:]
        ok: bool | None = False
        try:
            yield first
            async for chunk in chunks:
                tail = (tail + chunk)[-_TAIL:]
                yield chunk
            ok = True
        except CLIENT_ERRORS as e:
            done.replica.mark_failed(f"{type(e).__name__} mid-stream")
            self.metrics.failovers.labels(done.replica.url).inc()
            error = {"error": {"message": f"the replica failed mid-stream ({type(e).__name__})",
                               "type": "internal_server_error", "code": "replica_failed"}}
            yield f"data: {json.dumps(error)}\n\ndata: [DONE]\n\n".encode()
        except (asyncio.CancelledError, GeneratorExit):
            ok = None  # the client left: no fault of the replica's (closing resp aborts its request)
            raise
        finally:
            # A whole stream frees its connection for reuse; a cut one closes it, which is
            # what tells the replica to abort the request.
            resp.release() if ok else resp.close()
            done.finish(ok=ok, usage_from=_last_usage_event(tail))

    async def models(self, request: Request) -> Response:
        for r in sorted(self.replicas, key=lambda r: not r.healthy):
            try:
                async with self.client.get(r.url + "/v1/models", headers=self.headers(request)) as resp:
                    content = await resp.read()
            except CLIENT_ERRORS:
                continue
            if resp.status < 500:
                return Response(content, resp.status, media_type=resp.headers.get("content-type"))
        return _error(503, "no replica answered", "service_unavailable")


class _Stream(StreamingResponse):
    """Settles its attempt however the response ends: a client gone before the relay even
    started would otherwise leave the replica's stream open and its in-flight count up."""

    def __init__(self, relay: AsyncIterator[bytes], resp: aiohttp.ClientResponse, done: _Done, headers: dict):
        super().__init__(relay, media_type="text/event-stream", headers=headers)
        self._resp, self._done = resp, done

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()
            if not self._done.settled:
                self._resp.close()
                self._done.finish(ok=None)


_TAIL = 16384  # the usage event is the last data event before [DONE]; keep that much of a stream


@dataclass
class _Done:
    """One attempt's bookkeeping, settled exactly once: in-flight count, metrics, rollout."""

    fleet: Fleet
    replica: Replica
    decision: Decision
    started: float
    first_at: float | None = None
    settled: bool = False

    def first_byte(self) -> None:
        self.first_at = time.monotonic()
        self.fleet.metrics.ttft.labels(self.replica.version).observe(self.first_at - self.started)

    def finish(self, ok: bool | None, usage_from: bytes | dict | None = None) -> None:
        """ok: None when the client left before the end (counted, but judged neither way)."""
        if self.settled:
            return
        self.settled = True
        now = time.monotonic()
        r, m = self.replica, self.fleet.metrics
        r.in_flight -= 1
        m.requests.labels(r.url, r.version, {True: "ok", False: "error", None: "cancelled"}[ok]).inc()
        if ok is None:
            return
        m.e2e.labels(r.url, r.version).observe(now - self.started)
        usage = _usage(usage_from)
        tpot = None
        if usage is not None:
            prompt = usage.get("prompt_tokens") or 0
            cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
            if cached is not None:
                predicted = self.decision.hit_blocks * (r.block_size or 0)
                m.predicted.labels(r.url).inc(predicted)
                m.actual.labels(r.url).inc(cached)
                m.prompt_tokens.labels(r.url).inc(prompt)
                m.prediction_error.labels(r.url).observe(abs(predicted - cached))
            out = usage.get("completion_tokens") or 0
            if self.first_at is not None and out > 1:
                tpot = (now - self.first_at) / (out - 1)
        ttft = self.first_at - self.started if self.first_at is not None else None
        self.fleet.rollout.record(r.version, Outcome(ok, ttft, tpot))


async def _first_chunk(chunks: AsyncIterator[bytes]) -> bytes:
    """The first non-empty chunk, taken from the iterator the relay then continues."""
    async for chunk in chunks:
        if chunk:
            return chunk
    return b""


def _usage(source: bytes | dict | None) -> dict | None:
    if isinstance(source, bytes):
        try:
            source = json.loads(source)
        except ValueError:
            return None
    if isinstance(source, dict) and isinstance(source.get("usage"), dict):
        return source["usage"]
    return None


def _last_usage_event(tail: bytes) -> dict | None:
    for line in reversed(tail.split(b"\n")):
        if line.startswith(b"data: {") and b'"usage"' in line:
            try:
                return json.loads(line[6:])
            except ValueError:
                return None
    return None


def _error(status: int, message: str, type_: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": None, "code": None}},
                        status_code=status)


class _Keys:
    """API keys (ASGI middleware, so streams are not wrapped): every path but /health."""

    def __init__(self, app, keys: list[str]):
        self.app, self.keys = app, [k.encode() for k in keys]

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and self.keys and scope["path"] != "/health":
            auth = dict(scope["headers"]).get(b"authorization", b"")
            token = auth[7:] if auth[:7].lower() == b"bearer " else b""
            if not any(hmac.compare_digest(token, k) for k in self.keys):
                await _error(401, "invalid or missing API key", "invalid_request_error")(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(fleet: Fleet, api_keys: list[str] = (), on_shutdown: Callable[[], None] | None = None) -> FastAPI:
    """`on_shutdown` runs (on a thread) when the server stops: uvicorn re-raises SIGTERM once
    it has stopped, so code after uvicorn.run() never runs on SIGTERM."""

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        s = fleet.settings
        # aiohttp, not httpx: a proxied request costs about a third of the CPU time through it
        # (docs/benchmarks.md, router overhead), and this hop is all the router adds.
        fleet.client = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=s.connect_timeout_s, sock_read=s.read_timeout_s),
            connector=aiohttp.TCPConnector(limit=2048, limit_per_host=0, keepalive_timeout=30),
            skip_auto_headers=("User-Agent",))
        await fleet.tick()  # know the fleet before the first request
        task = asyncio.create_task(fleet.run_health())
        try:
            yield
        finally:
            task.cancel()
            await fleet.client.close()
            if on_shutdown is not None:
                await asyncio.to_thread(on_shutdown)

    app = FastAPI(title="tokenmill router", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.fleet = fleet

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await fleet.forward("/v1/completions", request)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await fleet.forward("/v1/chat/completions", request)

    @app.get("/v1/models")
    async def models(request: Request):
        return await fleet.models(request)

    @app.get("/health")
    async def health():
        up = sum(r.healthy and not (r.draining or r.server_draining) for r in fleet.replicas)
        body = {"status": "ok" if up else "unavailable", "replicas": len(fleet.replicas), "healthy": up}
        return JSONResponse(body, status_code=200 if up else 503)

    @app.get("/metrics")
    async def metrics():
        return Response(fleet.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/admin/replicas")
    async def replicas():
        return [{"url": r.url, "version": r.version, "healthy": r.healthy, "draining": r.draining,
                 "server_draining": r.server_draining, "in_flight": r.in_flight, "waiting": r.waiting,
                 "running": r.running, "kv_usage": r.kv_usage, "index_blocks": len(r.index),
                 "tokenizer": fleet.tokenizers.get(r.fingerprint) is not None}
                for r in fleet.replicas]

    @app.post("/admin/replicas/drain")
    async def drain(request: Request):
        body = await request.json()
        r = fleet.replicas.get(str(body.get("url", "")).rstrip("/"))
        if r is None:
            return _error(404, "no such replica", "invalid_request_error")
        r.draining = bool(body.get("draining", True))
        log.warning("replica %s %s by the admin API", r.url, "draining" if r.draining else "undrained")
        return {"url": r.url, "draining": r.draining}

    @app.get("/admin/rollout")
    async def rollout():
        return fleet.rollout.snapshot()

    @app.post("/admin/rollout")
    async def change_rollout(request: Request):
        """{"canary": "v2", "auto": true, "percent": 10} starts one; {"percent": P} sets the
        split (100 promotes, 0 stops sending); {"action": "rollback"} is percent 0."""
        body = await request.json()
        now = time.monotonic()
        try:
            if body.get("canary"):
                event = fleet.rollout.start(str(body["canary"]), now, bool(body.get("auto", True)),
                                            body.get("percent"))
            elif body.get("action") == "rollback":
                event = fleet.rollout.set_percent(0.0, now, "admin rollback")
            elif "percent" in body:
                event = fleet.rollout.set_percent(float(body["percent"]), now)
            else:
                return _error(400, "expected canary, percent or action", "invalid_request_error")
        except (ValueError, TypeError) as e:
            return _error(400, str(e), "invalid_request_error")
        fleet.count_rollout(event)
        return fleet.rollout.snapshot()

    app.add_middleware(_Keys, keys=list(api_keys))
    return app
