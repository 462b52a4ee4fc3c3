"""AsyncEngine: the engine loop on its own thread behind an asyncio API.

The forward pass runs in a worker thread (torch releases the GIL), so the event loop that
serves HTTP is never blocked. All engine state is touched by that thread only: callers send
it commands (add, abort) through a queue and get outputs back on per-request asyncio queues.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from tokenmill.engine.engine import Engine, QueueFullError, failure_of
from tokenmill.outputs import RequestOutput
from tokenmill.sampling import SamplingParams, StructuredOutput

__all__ = ["AsyncEngine", "EngineDeadError", "QueueFullError", "RequestFailedError"]

log = logging.getLogger("tokenmill")

STATS_LOG_INTERVAL_S = 5.0  # like vLLM's periodic stats line: enough to watch, not to flood


class RequestFailedError(RuntimeError):
    """Something failed inside this request's own work; the engine and the other requests
    go on (HTTP 500 for this request alone)."""


class EngineDeadError(RuntimeError):
    """The engine loop has stopped: nothing will be answered until the process restarts
    (HTTP 503; /health says so too)."""


@dataclass
class _Add:
    request_id: str
    prompt: str | list[int]
    params: SamplingParams
    arrival_time: float
    priority: int = 0


@dataclass
class _Abort:
    request_id: str


@dataclass
class _Call:
    """Run fn(engine) on the engine thread (e.g. reset the prefix cache) and return its value."""

    fn: object
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop


class AsyncEngine:
    def __init__(self, engine: Engine):
        self.engine = engine
        self._commands: queue.Queue = queue.Queue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.errored: BaseException | None = None

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def stats(self):
        return self.engine.stats

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def block_size(self) -> int:
        """Tokens per KV block: the unit of prefix-cache hits (a router hashes the same blocks)."""
        return self.engine.kv.block_size

    @property
    def max_kv_tokens(self) -> int:
        """Tokens the whole KV pool holds: no request can ever be longer."""
        return self.engine.kv.num_blocks * self.engine.kv.block_size

    @property
    def has_unfinished(self) -> bool:
        return self.engine.has_unfinished

    @property
    def dead(self) -> bool:
        """The loop failed, or its thread is gone without being shut down."""
        thread = self._thread
        return self.errored is not None or (thread is not None and not thread.is_alive())

    def _check_alive(self) -> None:
        if self._stop.is_set():  # shut down (a model unloaded): no loop would ever answer
            raise EngineDeadError("the engine was shut down")
        if self.dead:
            raise EngineDeadError(f"the engine has stopped ({type(self.errored).__name__}); the server must restart")

    async def check_structured(self, spec: StructuredOutput) -> None:
        """Compile (and cache) a constraint without blocking the event loop; raises ValueError
        naming what is wrong."""
        # Shielded: the future is shared through the compiler's cache, and a client that goes
        # away mid-compile must not cancel it for every later request with this constraint.
        await asyncio.shield(asyncio.wrap_future(self.engine.grammars.submit(spec)))

    def start(self) -> None:
        self._check_alive()  # one shut down stays down: its model was unloaded
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="tokenmill-engine", daemon=True)
            self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._commands.put(None)
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    async def generate(
        self, prompt: str | list[int], params: SamplingParams, request_id: str, arrival_time: float | None = None,
        priority: int = 0,
    ) -> AsyncIterator[RequestOutput]:
        """Yield cumulative outputs until the request finishes. Closing the generator early
        (a client that went away) aborts the request and frees its KV blocks. `priority`: a
        lower value is scheduled first (vLLM's convention; batch work runs high)."""
        self.start()
        self._check_alive()
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        if params.structured is not None:
            # Compiled here, off the engine thread, so the engine never waits for a grammar
            # and a bad one fails before the request is queued.
            await self.check_structured(params.structured)
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (loop, q)
        finished = False
        try:
            # After registering: a loop that dies from now on fails this stream, one that died
            # before is seen here (errored is set before the streams are failed).
            self._check_alive()
            self._commands.put(_Add(request_id, prompt, params, arrival_time or time.monotonic(), priority))
            while True:
                item = await q.get()
                if isinstance(item, BaseException):
                    finished = True  # the engine never kept it, or already dropped it
                    raise item
                # Coalesce: only the newest cumulative output matters to a slow consumer. A failure
                # behind it is raised after it: the tokens made before the fault still reach the
                # caller (raised at once, a slow consumer lost them).
                failure = None
                while not q.empty() and not item.finished:
                    nxt = q.get_nowait()
                    if isinstance(nxt, BaseException):
                        failure, finished = nxt, True  # the engine already dropped the request
                        break
                    item = nxt
                yield item
                if failure is not None:
                    raise failure
                if item.finished:
                    finished = True
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self._commands.put(_Abort(request_id))

    def abort(self, request_id: str) -> None:
        self._commands.put(_Abort(request_id))

    async def call(self, fn):
        """Run fn(engine) between two steps, on the engine thread."""
        self.start()
        self._check_alive()
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._commands.put(_Call(fn, future, loop))
        if self.dead:  # died before taking the command: nobody else will answer it
            self._fail_commands()
        return await future

    # -- engine thread -------------------------------------------------------------------
    def _deliver(self, request_id: str, item) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            loop, q = stream
            loop.call_soon_threadsafe(q.put_nowait, item)

    def _handle(self, command) -> None:
        if isinstance(command, _Add):
            try:
                self.engine.add_request(command.request_id, command.prompt, command.params, command.arrival_time,
                                        command.priority)
            except Exception as exc:  # bad request: tell the caller, keep serving
                self._deliver(command.request_id, exc)
            else:
                if command.request_id not in self._streams:  # caller left before we got here
                    self.engine.abort_request(command.request_id)
        elif isinstance(command, _Abort):
            out = self.engine.abort_request(command.request_id)
            if out is not None:
                self._deliver(command.request_id, out)
        elif isinstance(command, _Call):
            try:
                result = command.fn(self.engine)
            except Exception as exc:
                command.loop.call_soon_threadsafe(command.future.set_exception, exc)
            else:
                command.loop.call_soon_threadsafe(command.future.set_result, result)

    def _log_stats(self, last: tuple[float, int, int, int]) -> tuple[float, int, int, int]:
        """One line every few seconds while there is work: throughput, queue, KV, hit rate."""
        now = time.monotonic()
        t0, gen0, q0, h0 = last
        if now - t0 < STATS_LOG_INTERVAL_S:
            return last
        s = self.engine.stats
        queries, hits = s.prefix_cache_queries - q0, s.prefix_cache_hits - h0
        if s.generation_tokens_total != gen0 or queries:
            log.info(
                "generation %.1f tok/s, running %d, waiting %d, KV usage %.1f%%, preemptions %d, "
                "prefix cache hit rate %.1f%% (%d/%d prompt tokens)",
                (s.generation_tokens_total - gen0) / (now - t0), s.num_running, s.num_waiting,
                100 * s.kv_usage, s.num_preemptions, 100 * hits / queries if queries else 0.0, hits, queries,
            )
            if s.spec_num_draft_tokens:
                log.info(
                    "speculative decoding: %.1f%% of %d draft tokens accepted, per position %s",
                    100 * s.spec_acceptance_rate, s.spec_num_draft_tokens, s.spec_accepted_per_pos,
                )
        return now, s.generation_tokens_total, s.prefix_cache_queries, s.prefix_cache_hits

    def _loop(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # noqa: BLE001  (whatever stops the loop, nobody may be left waiting)
            log.critical("engine loop died: %r; failing every request", exc, exc_info=True)
            self._die(exc)
        else:
            self._fail_waiting(EngineDeadError("the engine was shut down"))

    def _die(self, exc: BaseException) -> None:
        """The loop cannot go on: say so (errored first, see generate()), give every block
        back so the gauges stay true, and end every stream and call with an error."""
        self.errored = exc
        try:
            for request_id in list(self.engine.outputs.groups):
                self.engine.abort_request(request_id)
        except Exception:
            log.exception("could not abort the requests of a dead engine")
        self._fail_waiting(EngineDeadError(f"the engine stopped: {type(exc).__name__}"))

    def _fail_waiting(self, error: Exception) -> None:
        for request_id in list(self._streams):
            self._deliver(request_id, error)
        self._fail_commands()

    def _fail_commands(self) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if isinstance(command, _Call):
                error = EngineDeadError("the engine has stopped")
                command.loop.call_soon_threadsafe(_set_exception, command.future, error)

    def _run(self) -> None:
        last = (time.monotonic(), 0, 0, 0)
        while not self._stop.is_set():
            last = self._log_stats(last)
            # Idle: sleep until a command comes. Busy: take whatever is queued, then step.
            try:
                command = self._commands.get(timeout=None if not self.engine.has_unfinished else 0)
            except queue.Empty:
                command = None
            while command is not None:
                self._handle(command)
                try:
                    command = self._commands.get_nowait()
                except queue.Empty:
                    command = None
            if self._stop.is_set() or not self.engine.has_unfinished:
                continue
            # A fault of one request ends that request inside the step (finish_reason
            # "error"); an exception out of step() is the engine's own and ends the loop.
            for out in self.engine.step():
                failure = failure_of(out) if out.finished else None
                self._deliver(out.request_id, out if failure is None else RequestFailedError(failure))


def _set_exception(future: asyncio.Future, error: Exception) -> None:
    if not future.done():
        future.set_exception(error)
