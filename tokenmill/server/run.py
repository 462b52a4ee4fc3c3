"""Run the app under uvicorn with a graceful drain on SIGTERM.

uvicorn's own SIGTERM handling closes the listening socket at once, so new clients see
"connection refused" rather than a 503 a load balancer understands, and it re-raises the
signal afterwards (exit status -15). Here the first SIGTERM only starts a drain: new engine
requests and /health get 503, in-flight ones finish (up to a deadline), then the server
exits normally with status 0. A second SIGTERM, or SIGINT, stops at once as uvicorn does.
"""

from __future__ import annotations

import gc
import logging
import signal
import threading
import time
from collections.abc import Callable, Mapping

import uvicorn

from tokenmill.engine.async_engine import AsyncEngine
from tokenmill.server.app import attach_engine, begin_drain, create_app
from tokenmill.server.repository import Repository
from tokenmill.startup import log_since_process_start

log = logging.getLogger("tokenmill.server")


class DrainingServer(uvicorn.Server):
    # After the deadline, requests still running are aborted; they answer within a step,
    # but a client that stopped reading should not hold the exit forever.
    ABORT_GRACE_SECONDS = 5.0

    def __init__(self, config: uvicorn.Config, drain_timeout: float):
        super().__init__(config)
        self.drain_timeout = drain_timeout
        self.drain_started: float | None = None
        self.aborted_at: float | None = None

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        log_since_process_start("HTTP server listening")  # models load meanwhile, on their own thread

    @property
    def _state(self):
        return self.config.app.state.tm

    def handle_exit(self, sig: int, frame) -> None:
        if sig == signal.SIGTERM and self.drain_started is None and not self.should_exit:
            self.drain_started = time.monotonic()
            begin_drain(self.config.app)
            log.info("SIGTERM: draining %d in-flight requests (up to %.0fs)", self._state.in_flight, self.drain_timeout)
            return
        super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        if self.drain_started is not None and not self.should_exit:
            self.should_exit = self._drained(time.monotonic())
        return await super().on_tick(counter)

    def _drained(self, now: float) -> bool:
        if self._state.in_flight == 0:
            return True
        if self.aborted_at is None:
            if now - self.drain_started <= self.drain_timeout:
                return False
            n = self.config.app.state.models.abort_all()
            log.warning("drain deadline passed: aborted %d requests", n)
            self.aborted_at = now
            return False
        return now - self.aborted_at > self.ABORT_GRACE_SECONDS


def _freeze_the_start() -> None:
    """`tokenmill serve` starts with the cyclic GC off (cli.cmd_serve). Once the models loaded at
    start are in, it is on again, with what the start made frozen out of its full collections,
    which would otherwise go over all of it again; an unload unfreezes before it collects
    (repository.py). Frozen uncollected, the start's own cyclic garbage stays: about 7k objects,
    1 MiB (imports' closures and generic aliases), where collecting it first held the GIL 0.2 s."""
    gc.freeze()
    gc.enable()
    log.info("startup: cyclic GC on again, %d objects of the start frozen out of its collections", gc.get_freeze_count())


def serve(
    loaders: Mapping[str, Callable[[], AsyncEngine]], host: str = "127.0.0.1", port: int = 8000,
    api_keys: list[str] = (), max_body_bytes: int | None = None, drain_timeout: float = 30.0,
    log_level: str = "info", allowed_origins: list[str] = (), log_requests: bool = False,
    model_bytes: Mapping[str, int] | None = None, memory_budget: int | None = None,
    profile_dir: str | None = None, data_dir=None, model_kinds: Mapping[str, str] | None = None,
    unloaded: Mapping[str, str] | None = None,
) -> int:
    """Start answering at once (503 for each model until its loader, run on a thread, has
    built its engine), serve until drained or stopped, and return the process exit status.
    `loaders`: served model name -> a function that builds its AsyncEngine (or AsyncEmbedder);
    they also load the models again after an unload (/v2/repository). `model_bytes`: each
    model's estimated memory, summed against `memory_budget` when loading. `model_kinds`: each
    model's kind as configured, listed before it is loaded. `unloaded`: name -> why, for the
    models not loaded at start (listed as unavailable until a /v2/repository load)."""
    kwargs = {} if max_body_bytes is None else {"max_body_bytes": max_body_bytes}
    repository = Repository(loaders, dict(model_bytes or {}), memory_budget, dict(model_kinds or {}))
    app = create_app(dict.fromkeys(loaders), api_keys=api_keys, allowed_origins=allowed_origins,
                     log_requests=log_requests, repository=repository, profile_dir=profile_dir,
                     data_dir=data_dir, **kwargs)
    for name, reason in (unloaded or {}).items():
        app.state.models.mark(name, "unavailable", reason)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="off",
                            timeout_graceful_shutdown=5)
    server = DrainingServer(config, drain_timeout)
    engines: list = []
    failed: list[BaseException] = []

    at_start = [name for name in loaders if name not in (unloaded or {})]

    def load() -> None:
        # One after another: loading is bound by disk and memory bandwidth, not by waiting.
        try:
            for name in at_start:
                try:
                    engine = loaders[name]()
                    engine.start()
                    engines.append(engine)
                    if name == at_start[-1]:
                        _freeze_the_start()
                    attach_engine(app, name, engine)
                    log.info("model %r loaded; serving on http://%s:%d", name, host, port)
                    log_since_process_start(f"model {name!r} ready")
                except BaseException as e:  # the server cannot serve without it: stop
                    failed.append(e)
                    log.error("could not load the model %r: %s", name, e)
                    server.should_exit = True
                    return
        finally:
            gc.enable()  # (a failed or empty start too)

    threading.Thread(target=load, name="tokenmill-load", daemon=True).start()
    try:
        server.run()
    finally:
        for engine in engines:
            engine.shutdown()
    return 1 if failed else 0
