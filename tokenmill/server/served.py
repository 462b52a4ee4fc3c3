"""The models one server answers for, by name: each an AsyncEngine with its own Serving.

A name is declared when the app is made and its engine may come later (the CLI loads models
in the background); until it does, that model's requests answer 503. Requests are routed by
their `model` field; a request without one goes to the only model when there is just one.
"""

from __future__ import annotations

from collections.abc import Mapping

from tokenmill.engine.async_engine import AsyncEngine
from tokenmill.server.errors import APIError
from tokenmill.server.metrics import ServerMetrics
from tokenmill.server.protocol import ModelCard
from tokenmill.server.serving import Serving


class ServedModels:
    def __init__(self, names: list[str]):
        if not names:
            raise ValueError("a server needs at least one model name")
        self._serving: dict[str, Serving | None] = dict.fromkeys(names)
        self.metrics = ServerMetrics(self.stats)

    @property
    def names(self) -> list[str]:
        return list(self._serving)

    @property
    def loaded(self) -> dict[str, AsyncEngine]:
        return {name: s.engine for name, s in self._serving.items() if s is not None}

    def attach(self, name: str, engine: AsyncEngine) -> None:
        """Start answering for `name` with `engine`. Safe from the loading thread: the names
        are fixed when the app is made, so this only replaces a value (readers iterating on
        the event loop never see the dict change size), and the Serving is whole before the
        one assignment that publishes it."""
        if name not in self._serving:
            raise KeyError(f"{name!r} is not a model of this server: {self.names}")
        self._serving[name] = Serving(engine, name, self.metrics.for_model(name))

    def route(self, model: str | None) -> Serving:
        """The Serving for a request's `model` field: OpenAI's 404 model_not_found for a name
        this server does not serve, 503 while that model loads."""
        if model is None:
            if len(self._serving) > 1:
                raise APIError(400, f"model is required: this server serves {self.names}", param="model")
            model = self.names[0]
        if model not in self._serving:
            raise APIError(404, f"the model {model!r} does not exist; this server serves {self.names}",
                           param="model", code="model_not_found", type="invalid_request_error")
        serving = self._serving[model]
        if serving is None:
            raise APIError(503, f"the model {model!r} is loading", code="loading")
        if serving.engine.dead:
            raise APIError(503, f"the engine of {model!r} has stopped; the server must restart", code="engine_dead")
        return serving

    def unhealthy(self) -> tuple[str, str] | None:
        """(code, message) of the first model that cannot answer, or None when all can."""
        for name, serving in self._serving.items():
            if serving is None:
                return "loading", f"the model {name!r} is loading"
            if serving.engine.dead:
                return "engine_dead", f"the engine of {name!r} has stopped; restart the server"
        return None

    def stats(self) -> Mapping[str, object]:
        return {name: engine.stats for name, engine in self.loaded.items()}

    def cards(self) -> list[ModelCard]:
        return [ModelCard(id=name, max_model_len=s.max_model_len if s is not None else None)
                for name, s in self._serving.items()]

    def abort_all(self) -> int:
        """End every request being answered, on every model; how many were ended."""
        return sum(s.abort_all() for s in self._serving.values() if s is not None)
