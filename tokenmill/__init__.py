"""tokenmill: an LLM serving engine small enough to read."""

from tokenmill.config import EngineConfig
from tokenmill.sampling import SamplingParams

__all__ = ["EngineConfig", "SamplingParams", "LLM", "AsyncEngine", "build_async_engine", "RequestOutput"]


def __getattr__(name: str):
    # Lazy so that `import tokenmill` (e.g. for SamplingParams in a client) stays torch-free.
    if name == "LLM":
        from tokenmill.llm import LLM

        return LLM
    if name == "AsyncEngine":
        from tokenmill.engine.async_engine import AsyncEngine

        return AsyncEngine
    if name == "build_async_engine":  # AsyncEngine(engine) wired from an EngineConfig
        from tokenmill.build import build_async_engine

        return build_async_engine
    if name == "RequestOutput":
        from tokenmill.outputs import RequestOutput

        return RequestOutput
    raise AttributeError(name)
