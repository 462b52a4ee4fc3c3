"""The models one server answers for, by name: each an AsyncEngine with its own Serving, or
an AsyncEmbedder with its EmbeddingServing (the model's `kind`: "generate" or "embedding").

A name is declared when the app is made and its engine may come later (the CLI loads models
in the background); until it does, that model's requests answer 503. Requests are routed by
their `model` field; a request without one goes to the only model of the kind it asks for.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager

from tokenmill.engine.async_embedder import AsyncEmbedder
from tokenmill.engine.async_engine import AsyncEngine
from tokenmill.server.embeddings import EmbeddingServing
from tokenmill.server.errors import APIError
from tokenmill.server.metrics import ServerMetrics
from tokenmill.server.protocol import ModelCard
from tokenmill.server.serving import Serving


class ServedModels:
    def __init__(self, names: list[str]):
        if not names:
            raise ValueError("a server needs at least one model name")
        self._serving: dict[str, Serving | EmbeddingServing | None] = dict.fromkeys(names)
        # Beside "ready" (an engine attached): "loading", "unloading", "unavailable" (unloaded,
        # or its load failed: `_reasons` says why). Set by the repository (server/repository.py).
        self._states: dict[str, str] = dict.fromkeys(names, "loading")
        self._reasons: dict[str, str | None] = dict.fromkeys(names)
        self._kinds: dict[str, str | None] = dict.fromkeys(names)
        # Requests routed to a model and not yet answered (admitted()): an unload waits for
        # them, including those still tokenizing, which its engine does not know of yet.
        self._admitted: dict[str, int] = dict.fromkeys(names, 0)
        self.metrics = ServerMetrics(self.stats)

    @property
    def names(self) -> list[str]:
        return list(self._serving)

    @property
    def loaded(self) -> dict[str, AsyncEngine]:
        """The generative engines loaded so far (KV cache, block size, engine stats)."""
        return {name: s.engine for name, s in self._serving.items() if isinstance(s, Serving)}

    def attach(self, name: str, engine: AsyncEngine | AsyncEmbedder) -> None:
        """Start answering for `name` with `engine`. Safe from the loading thread: the names
        are fixed when the app is made, so this only replaces a value (readers iterating on
        the event loop never see the dict change size), and the Serving is whole before the
        one assignment that publishes it."""
        if name not in self._serving:
            raise KeyError(f"{name!r} is not a model of this server: {self.names}")
        if isinstance(engine, AsyncEmbedder):
            serving = EmbeddingServing(engine, name, self.metrics.for_embedding_model(name))
        else:
            serving = Serving(engine, name, self.metrics.for_model(name))
        self._kinds[name], self._reasons[name] = _kind(serving), None
        self._serving[name] = serving
        self._states[name] = "ready"

    def state(self, name: str) -> str:
        return self._states[name]

    def kind(self, name: str) -> str | None:
        """"generate" or "embedding", once the model has been loaded."""
        return self._kinds[name]

    def reason(self, name: str) -> str | None:
        return self._reasons[name]

    def mark(self, name: str, state: str, reason: str | None = None) -> Serving | EmbeddingServing | None:
        """Set a model's state (loading, unloading, unavailable); its Serving, if any."""
        self._states[name], self._reasons[name] = state, reason
        return self._serving[name]

    def detach(self, name: str) -> None:
        """Stop answering for `name` (unloaded): its requests get 404 until it is loaded again."""
        self._serving[name] = None
        self._states[name] = "unavailable"

    def route(self, model: str | None, kind: str = "generate") -> Serving | EmbeddingServing:
        """The Serving for a request's `model` field: OpenAI's 404 model_not_found for a name
        this server does not serve, 503 while that model loads, 400 for a model of the other
        kind (a chat request to an embedding model, an embedding request to an LLM)."""
        if model is None:
            model = self._only_model(kind)
        if model not in self._serving:
            raise APIError(404, f"the model {model!r} does not exist; this server serves {self.names}",
                           param="model", code="model_not_found", type="invalid_request_error")
        serving, state = self._serving[model], self._states[model]
        if state == "unavailable":
            raise APIError(404, f"the model {model!r} is not loaded; load it with POST /v2/repository/models/{model}/load",
                           param="model", code="model_not_found", type="invalid_request_error")
        if state == "unloading":
            raise APIError(503, f"the model {model!r} is being unloaded", code="unloading")
        if serving is None:
            raise APIError(503, f"the model {model!r} is loading", code="loading")
        if serving.engine.dead:
            raise APIError(503, f"the engine of {model!r} has stopped; the server must restart", code="engine_dead")
        if _kind(serving) != kind:
            what = ("an embedding model: it answers /v1/embeddings only" if kind == "generate"
                    else "a generative model: it answers /v1/completions and /v1/chat/completions, not /v1/embeddings")
            raise APIError(400, f"the model {model!r} is {what}", param="model", code="model_kind_mismatch")
        return serving

    @asynccontextmanager
    async def admitted(self, model: str | None, kind: str = "generate") -> AsyncIterator[Serving | EmbeddingServing]:
        """route(), counting the request as the model's own until its handler returns (a
        stream goes on after that, counted by its engine). A request that finds the engine
        shut down under it all the same (an unload's drain ran out of time) is told the
        model went away, not that the server must restart."""
        serving = self.route(model, kind)
        name = serving.model_name
        self._admitted[name] += 1
        try:
            yield serving
        except APIError as e:
            state = self._states[name]
            if e.code != "engine_dead" or (state == "ready" and self._serving[name] is serving):
                raise  # not an unload: this very engine died
            if state == "unavailable":
                raise APIError(404, f"the model {name!r} was unloaded while this request was being prepared",
                               param="model", code="model_not_found", type="invalid_request_error") from None
            # being unloaded, or unloaded and loaded again since: a new request will do
            raise APIError(503, f"the model {name!r} was being unloaded while this request was prepared; retry",
                           code="unloading", headers={"Retry-After": "1"}) from None
        finally:
            self._admitted[name] -= 1

    def admitted_count(self, name: str) -> int:
        return self._admitted[name]

    def _only_model(self, kind: str) -> str:
        if len(self._serving) == 1:
            return self.names[0]
        # A model still loading has no kind yet: only loaded ones can be picked by kind.
        of_kind = [name for name, s in self._serving.items() if s is not None and _kind(s) == kind]
        if len(of_kind) == 1 and "loading" not in self._states.values():
            return of_kind[0]
        raise APIError(400, f"model is required: this server serves {self.names}", param="model")

    def unhealthy(self) -> tuple[str, str] | None:
        """(code, message) of the first model that cannot answer, or None when all can."""
        for name, serving in self._serving.items():
            if self._states[name] in ("unavailable", "unloading"):  # unloaded on purpose: not a fault
                continue
            if serving is None:
                return "loading", f"the model {name!r} is loading"
            if serving.engine.dead:
                return "engine_dead", f"the engine of {name!r} has stopped; restart the server"
        return None

    def stats(self) -> Mapping[str, object]:
        return {name: engine.stats for name, engine in self.loaded.items()}

    def cards(self) -> list[ModelCard]:
        return [ModelCard(id=name, max_model_len=s.max_model_len, kind=_kind(s)) if s is not None
                else ModelCard(id=name)
                for name, s in self._serving.items() if self._states[name] != "unavailable"]

    def abort_all(self) -> int:
        """End every request being answered, on every model; how many were ended."""
        return sum(s.abort_all() for s in self._serving.values() if s is not None)


def _kind(serving: Serving | EmbeddingServing) -> str:
    return "embedding" if isinstance(serving, EmbeddingServing) else "generate"
