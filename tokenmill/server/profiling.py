"""POST /start_profile and /stop_profile (vLLM's routes): torch profiler traces of every
loaded model's engine steps, written under `--profile-dir`. Without that flag they answer 400:
profiling slows every step and writes files, so it is opt-in at start-up."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.responses import JSONResponse

from tokenmill.server.errors import error_response
from tokenmill.server.served import ServedModels


def add_profile_routes(app: FastAPI, models: ServedModels, profile_dir: str | None) -> None:
    async def each_engine(fn):
        if profile_dir is None:
            return None, error_response(400, "profiling is off: start the server with --profile-dir DIR",
                                        code="profiling_disabled")
        loaded = models.loaded
        if not loaded:
            return None, error_response(503, "no model is loaded yet", code="loading")
        try:
            return [await engine.call(fn) for engine in loaded.values()], None
        except RuntimeError as e:  # already started / never started
            return None, error_response(409, str(e), code="profile_state")

    @app.post("/start_profile")
    async def start_profile():
        _, error = await each_engine(lambda e: e.start_profile())
        return error or JSONResponse({"profiling": True})

    @app.post("/stop_profile")
    async def stop_profile():
        traces, error = await each_engine(lambda e: e.stop_profile(profile_dir))
        return error or JSONResponse({"profiling": False, "traces": traces})
