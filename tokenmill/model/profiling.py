"""Torch profiler traces of the engine's steps (`tokenmill serve --profile-dir`, then POST
/start_profile and /stop_profile, as vLLM has them).

The profiler records the operators of the thread that started it, so it is started and
stopped on the engine thread (AsyncEngine.call), between two steps. The trace is Chrome's
format: open it in Perfetto, or give it to `tokenmill doctor --profile`.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile


STEP_RANGE = "tokenmill.step"  # the name of each step's range in a trace


class StepProfiler:
    def __init__(self):
        self._active: profile | None = None

    @property
    def running(self) -> bool:
        return self._active is not None

    def start(self) -> None:
        if self._active is not None:
            raise RuntimeError("a profile is already being recorded")
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        self._active = profile(activities=activities)
        self._active.start()

    def stop(self, directory: str | Path) -> Path:
        if self._active is None:
            raise RuntimeError("no profile is being recorded")
        active, self._active = self._active, None
        active.stop()
        path = Path(directory) / f"tokenmill-{time.strftime('%Y%m%d-%H%M%S')}-{time.monotonic_ns() % 10**6}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        active.export_chrome_trace(str(path))
        return path
