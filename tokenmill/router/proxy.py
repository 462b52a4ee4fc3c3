"""The proxy: an OpenAI request goes to the chosen replica, its answer comes back, a stream
chunk by chunk as the replica writes it (app.py holds the routes around it).

A request may move to another replica only while nothing of it has reached the client: a
refused connection, a 5xx/429 status, or a stream that breaks before its first chunk. The
first chunk is read before the response starts, so a retry never duplicates text. After it,
a replica failure ends the stream with an OpenAI error event and [DONE], never a hang.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
import uuid
from collections import deque
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web

from tokenmill.router.errors import error
from tokenmill.router.metrics import RouterMetrics
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
    hash_memo: dict[tuple, bytes] = field(default_factory=dict)  # block_hashes' memo

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
        # A version with no live replica (a canary whose one replica just failed) must not
        # turn into 503s: stable takes it, and only with stable gone too do the other groups
        # (a version staged but not rolled out must not get traffic while stable can take it).
        for group in (version, self.rollout.stable):
            members = [r for r in pool if r.version == group]
            if any(r.healthy and not (r.draining or r.server_draining) for r in members):
                pool = members
                break
        fp = self._fp(pool)
        hashes = self._hashes(path, body, pool, fp)
        views = [r.view(r.index.match(hashes) if hashes and r.fingerprint == fp else 0) for r in pool]
        decision = self.policy.choose(views, time.monotonic(), self.rng, len(hashes), session)
        if decision is None:
            return None, None, []
        self.metrics.decisions.labels(decision.reason).inc()
        if log.isEnabledFor(logging.DEBUG):  # the evidence for tuning the policy, off by default
            log.debug("route %s (%s) blocks=%d %s", decision.replica, decision.reason, len(hashes),
                      " ".join(f"{v.name}:hit={v.hit_blocks},pending={v.pending_blocks},load={v.load},"
                               f"kv={v.kv_usage:.2f}" for v in views))
        return self.replicas.get(decision.replica), decision, hashes

    def _fp(self, pool: list[Replica]) -> str | None:
        return next((r.fingerprint for r in pool if self.tokenizers.get(r.fingerprint) is not None), None)

    def _hashes(self, path: str, body: dict, pool: list[Replica], fp: str | None) -> list[bytes]:
        """The prompt's usable block hashes under the pool's tokenizer (`fp`), for the policies
        that read them (session falls back to prefix without a key)."""
        if self.policy.config.policy not in ("prefix", "session"):
            return []
        r = next((r for r in pool if r.fingerprint == fp), None)
        if fp is None or r is None or not r.block_size:
            return []
        ids = prompt_ids(self.tokenizers.get(fp), path, body, self.tokenizers.encoders.get(fp))
        if ids is None:
            return []
        n = usable_blocks(len(ids), r.block_size)
        return block_hashes(ids[:n * r.block_size], r.block_size, self.hash_memo)

    def headers(self, request: web.Request) -> dict[str, str]:
        h = request.headers
        out = {k: h[k] for k in _HOP_HEADERS if k in h}
        if self.settings.replica_api_key:
            out["authorization"] = f"Bearer {self.settings.replica_api_key}"
        return out

    # -- the proxy ------------------------------------------------------------------------
    async def forward(self, path: str, request: web.Request) -> web.StreamResponse:
        started = time.monotonic()
        raw = await request.read()  # the app's client_max_size bounds it (413)
        try:
            body = json.loads(raw)
            if not isinstance(body, dict):
                raise ValueError("not an object")
        except ValueError as e:
            return error(400, f"the body is not a JSON object: {e}")
        stream = bool(body.get("stream"))
        session = request.headers.get(self.settings.session_header) or body.get("user")
        # A request without a session gets a random split key, drawn only while there is a split.
        version = self.rollout.version_for(str(session) if session else
                                           uuid.uuid4().hex if self.rollout.splitting else "")
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
            done = _Done(self, replica, decision, started, pending=len(hashes) - decision.hit_blocks)
            replica.pending_blocks += done.pending
            try:
                answer = await self._attempt(request, path, raw, headers, stream, attempt, replica, done)
            except asyncio.CancelledError:  # the client left while we waited on the replica
                done.finish(ok=None)
                raise
            if answer is not None:
                return answer
        return error(503, "no replica could take the request")

    async def _attempt(self, request: web.Request, path: str, raw: bytes, headers: dict, stream: bool, attempt: int,
                       replica: Replica, done: _Done) -> web.StreamResponse | None:
        """One try on one replica: the response sent, or None to try another (nothing sent yet)."""
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
                return web.Response(body=content, status=resp.status,
                                    headers=_answer_headers(resp, replica.version))
            # readany, not iter_any: one await per chunk, no async generator in between. It
            # returns b"" only at the end of the body.
            first = await resp.content.readany()
        except CLIENT_ERRORS as e:  # broke before any byte went out: try elsewhere
            resp.close()
            replica.mark_failed(f"{type(e).__name__} before the first byte")
            done.finish(ok=False)
            return None
        except asyncio.CancelledError:
            resp.close()
            raise
        done.first_byte()
        return await self._relay(request, first, resp, done)

    async def _relay(self, request: web.Request, first: bytes, resp: aiohttp.ClientResponse,
                     done: _Done) -> web.StreamResponse:
        """Pass the stream through chunk by chunk: each replica read is written to the client
        as it comes (aiohttp sends the headers with the first chunk, in one write)."""
        out = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                          VERSION_HEADER: done.replica.version})
        # The usage event is the last data event before [DONE]: the last few reads hold it.
        # Kept as chunks and joined once at the end, not copied on every chunk.
        tail: deque[bytes] = deque((first,), maxlen=_TAIL_CHUNKS)
        # None until the client has had the whole stream: a client that leaves after that (while
        # the replica's body end is still read) was served, not cancelled.
        ok: bool | None = None
        reusable = False  # the replica's body was read to its end: its connection can serve again
        try:
            await out.prepare(request)
            chunk, content, broke = first, resp.content, None
            while chunk and not chunk.endswith(_LAST_EVENT):
                await out.write(chunk)
                try:
                    chunk = await content.readany()
                except CLIENT_ERRORS as e:
                    broke = type(e).__name__
                    break
                if done.pending:  # a second read: past the role-only chunk, so past prefill
                    done.prefilled()
                tail.append(chunk)
            if broke is not None:
                done.replica.mark_failed(f"{broke} mid-stream")
                self.metrics.failovers.labels(done.replica.url).inc()
                event = {"error": {"message": f"the replica failed mid-stream ({broke})",
                                   "type": "internal_server_error", "code": "replica_failed"}}
                chunk = f"data: {json.dumps(event)}\n\ndata: [DONE]\n\n".encode()
            # The last event and the stream's terminator leave in one write.
            await out.write_eof(chunk)
            ok = broke is None
            reusable = ok and await _read_to_end(content)
        except ConnectionError:  # the client left: no fault of the replica's
            pass
        finally:
            # A whole stream frees its connection for reuse; a cut one closes it, which is
            # what tells the replica to abort the request.
            resp.release() if reusable else resp.close()
            done.finish(ok=ok, usage_from=_last_usage_event(b"".join(tail)) if ok else None)
        return out

    async def models(self, request: web.Request) -> web.StreamResponse:
        for r in sorted(self.replicas, key=lambda r: not r.healthy):
            try:
                async with self.client.get(r.url + "/v1/models", headers=self.headers(request)) as resp:
                    content = await resp.read()
            except CLIENT_ERRORS:
                continue
            if resp.status < 500:
                return web.Response(body=content, status=resp.status, headers=_answer_headers(resp, r.version))
        return error(503, "no replica answered")


def _answer_headers(resp: aiohttp.ClientResponse, version: str) -> dict[str, str]:
    return {"Content-Type": resp.headers.get("Content-Type", "application/json"), VERSION_HEADER: version}


_LAST_EVENT = b"data: [DONE]\n\n"  # an OpenAI stream's last event: nothing follows it
_TAIL_CHUNKS = 8  # replica reads kept for the usage event (it is a few hundred bytes, in the last one or two)


@dataclass
class _Done:
    """One attempt's bookkeeping, settled exactly once: in-flight count, metrics, rollout."""

    fleet: Fleet
    replica: Replica
    decision: Decision
    started: float
    pending: int = 0  # its predicted uncached blocks, counted in replica.pending_blocks until prefilled
    first_at: float | None = None
    settled: bool = False

    def prefilled(self) -> None:
        """Its prefill is done (or it ended): its blocks stop counting as work ahead of others.
        A chat stream's first event is the role alone, sent before prefill; the read after it
        carries the first token (a completion's first read already does: one token late)."""
        self.replica.pending_blocks -= self.pending
        self.pending = 0

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
        self.prefilled()
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


async def _read_to_end(content: aiohttp.StreamReader) -> bool:
    """After [DONE] only the body's end is left (usually in the same read): take it, so the
    connection goes back to the pool instead of being closed."""
    try:
        while await content.readany():
            pass
    except CLIENT_ERRORS:
        return False
    return True


def _usage(source: bytes | dict | None) -> dict | None:
    if isinstance(source, bytes):
        if b'"usage"' not in source:  # most error bodies: not worth a parse
            return None
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
