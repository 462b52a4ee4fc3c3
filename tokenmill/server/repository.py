"""Model repository control, as Triton's explicit mode: load and unload served models while the
server runs, and list them with their states.

    GET  /v2/repository/index                  [{name, kind, state, reason, bytes}]
    POST /v2/repository/models/{name}/load     loads it (on a thread; answers when ready)
    POST /v2/repository/models/{name}/unload   stops new requests, drains in-flight ones, frees it

The names are the server's, fixed at start-up; each has a loader that builds its engine. A
memory budget bounds the sum of the loaded models' estimated bytes: a load that would pass it
is refused with the numbers, before anything is read.
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from fastapi import FastAPI
from fastapi.responses import JSONResponse

from tokenmill.server.errors import APIError
from tokenmill.server.served import ServedModels

DRAIN_POLL_S = 0.02
DRAIN_TIMEOUT_S = 60.0
ABORT_GRACE_S = 10.0  # after the drain timeout: aborted requests end within a step


@dataclass
class Repository:
    """`loaders`: name -> a function building that model's started-or-not engine; `sizes`: name
    -> its estimated memory in bytes (weights, plus the KV pool for an LLM); `memory_budget`:
    the most all loaded models may take together (None: no bound)."""

    loaders: Mapping[str, Callable[[], object]]
    sizes: Mapping[str, int] = field(default_factory=dict)
    memory_budget: int | None = None
    kinds: Mapping[str, str] = field(default_factory=dict)  # name -> kind as configured, known before loading
    _busy: set[str] = field(default_factory=set)  # names with a load or unload under way

    def check_budget(self, models: ServedModels, name: str) -> None:
        if self.memory_budget is None:
            return
        used = sum(self.sizes.get(n, 0) for n in models.names if n != name and models.state(n) != "unavailable")
        need = self.sizes.get(name, 0)
        if used + need > self.memory_budget:
            raise APIError(409, f"loading {name!r} needs about {need / 2**20:.0f} MiB, but {used / 2**20:.0f} MiB of "
                                f"the {self.memory_budget / 2**20:.0f} MiB memory budget are taken by loaded models; "
                                f"unload one first", code="memory_budget_exceeded")


def add_repository_routes(app: FastAPI, models: ServedModels, repo: Repository | None) -> None:
    def known(name: str) -> None:
        if name not in models.names:
            raise APIError(404, f"the model {name!r} is not in this server's repository: {models.names}",
                           code="model_not_found")
        if repo is None or name not in repo.loaders:
            raise APIError(400, "model control is off: this server was started with fixed engines",
                           code="model_control_disabled")
        if name in repo._busy or models.state(name) in ("loading", "unloading"):
            raise APIError(409, f"the model {name!r} is {models.state(name)}; wait until that ends",
                           code="model_busy")

    @app.get("/v2/repository/index")
    async def index():
        kinds = repo.kinds if repo is not None else {}
        return JSONResponse([{"name": name, "kind": models.kind(name) or kinds.get(name), "state": models.state(name),
                              "reason": models.reason(name),
                              "bytes": repo.sizes.get(name) if repo is not None else None}
                             for name in models.names])

    @app.post("/v2/repository/models/{name}/load")
    async def load(name: str):
        known(name)
        if models.state(name) == "ready":
            return JSONResponse({"name": name, "state": "ready"})
        repo.check_budget(models, name)
        repo._busy.add(name)
        models.mark(name, "loading")
        try:
            engine = await asyncio.to_thread(repo.loaders[name])
            engine.start()
        except Exception as e:
            models.mark(name, "unavailable", f"load failed: {e}")
            raise APIError(400, f"could not load {name!r}: {e}", code="load_failed") from None
        finally:
            repo._busy.discard(name)
        models.attach(name, engine)
        return JSONResponse({"name": name, "state": "ready"})

    @app.post("/v2/repository/models/{name}/unload")
    async def unload(name: str):
        known(name)
        if models.state(name) != "ready":
            return JSONResponse({"name": name, "state": models.state(name)})
        repo._busy.add(name)
        try:
            serving = models.mark(name, "unloading")  # new requests are refused from here on
            await _drain(models, name, serving)
            await asyncio.to_thread(serving.engine.shutdown)
            models.detach(name)
            del serving
            # The weights and the KV pool are freed now, not at some later collection. `tokenmill
            # serve` froze its start's objects out of collections (run.serve): back in first, or
            # an engine loaded at start would keep its cycles; what is left is frozen again.
            frozen = gc.get_freeze_count() > 0
            gc.unfreeze()
            gc.collect()
            if frozen:
                gc.freeze()
        finally:
            repo._busy.discard(name)
        return JSONResponse({"name": name, "state": "unavailable"})


async def _drain(models: ServedModels, name: str, serving) -> None:
    """Wait until no request of the model is left: admitted ones (even those still tokenizing,
    which the engine does not know of yet) and the engine's own. Past the drain timeout, end
    the running ones, again at every poll (one still tokenizing then was not running at the
    first abort), for a grace period; past that the engine is shut down under any straggler,
    which gets a clean error (ServedModels.admitted)."""
    start = time.monotonic()
    while not _idle(models, name, serving):
        waited = time.monotonic() - start
        if waited > DRAIN_TIMEOUT_S + ABORT_GRACE_S:
            return
        if waited > DRAIN_TIMEOUT_S:
            serving.abort_all()
        await asyncio.sleep(DRAIN_POLL_S)


def _idle(models: ServedModels, name: str, serving) -> bool:
    if models.admitted_count(name):
        return False
    engine = serving.engine
    if getattr(serving, "kind", "generate") == "embedding":
        return engine.in_flight == 0
    return not serving.active and not engine.has_unfinished
