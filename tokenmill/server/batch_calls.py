"""A batch line answered exactly as the HTTP route would answer it, without HTTP.

The body is validated by the same pydantic model and run by the same Serving method as
/v1/completions, /v1/chat/completions and /v1/embeddings, so a batch result is what the API
returns for the same request; only the transport differs. Used by the server's Batch API and by the offline
`tokenmill run-batch`, both through tokenmill.batch.runner's `Execute` seam.
"""

from __future__ import annotations

import asyncio
import json
import logging

from pydantic import BaseModel, ValidationError

from tokenmill.batch.format import BatchLine, LineError
from tokenmill.server.errors import APIError, error_body, validation_error
from tokenmill.server.protocol import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from tokenmill.server.served import ServedModels

log = logging.getLogger("tokenmill.server")

# url -> (request model, Serving method, the kind of model that answers it).
ENDPOINTS: dict[str, tuple[type[BaseModel], str, str]] = {
    "/v1/completions": (CompletionRequest, "completions", "generate"),
    "/v1/chat/completions": (ChatCompletionRequest, "chat", "generate"),
    "/v1/embeddings": (EmbeddingRequest, "embeddings", "embedding"),
}
URLS = tuple(ENDPOINTS)

# Batch work yields to interactive work (priority 0 by default): a lower value runs first.
BATCH_PRIORITY = 100
# A line the engine turns away because its queue is full waits and tries again: a busy server
# is not the line's fault, and the batch must not end with lines failed for it.
RETRY_BUSY_SECONDS = (0.05, 2.0)  # first wait, longest wait (doubling between)


class _NoClient:
    """Stands in for the HTTP request whose disconnect the handlers watch: a batch line's
    caller never goes away (cancelling the task is how a batch stops)."""

    async def receive(self) -> dict:
        await asyncio.Event().wait()
        return {"type": "http.disconnect"}


class BatchCalls:
    """`Execute` over the served models. `priority`: the least urgent priority batch lines
    run at (a line asking for a larger value keeps it); None runs them as asked."""

    def __init__(self, models: ServedModels, priority: int | None = BATCH_PRIORITY):
        self.models = models
        self.priority = priority

    def parse(self, url: str, body: dict) -> BaseModel:
        """The request a body makes; ValidationError or APIError when it makes none."""
        model, _, _ = ENDPOINTS[url]
        req = model.model_validate(body)
        if getattr(req, "stream", False):
            raise APIError(400, "stream is not supported in a batch", param="stream", code="invalid_value")
        if req.model is not None and req.model not in self.models.names:
            raise APIError(404, f"the model {req.model!r} does not exist; this server serves {self.models.names}",
                           param="model", code="model_not_found")
        return req

    def check(self, line: BatchLine) -> LineError | None:
        """Validate a line's body up front, as the route would (model, its kind, fields, ranges)."""
        try:
            req = self.parse(line.url, line.body)
            kind = ENDPOINTS[line.url][2]
            try:
                serving = self.models.route(req.model, kind)
            except APIError as e:
                if e.status != 503:
                    raise
                return None  # loading or stopping: the line runs later and answers what the route says then
            if kind == "embedding":
                serving.check_dimensions(req.dimensions)
        except ValidationError as e:
            message, param, code = validation_error(list(e.errors()))
            return LineError(line.line, line.custom_id, code, f"line {line.line}: {message}", param)
        except APIError as e:
            return LineError(line.line, line.custom_id, e.code or "invalid_request", f"line {line.line}: {e.message}",
                             e.param)
        return None

    async def __call__(self, url: str, body: dict) -> tuple[int, dict]:
        wait = RETRY_BUSY_SECONDS[0]
        while True:
            status, answer = await self._once(url, body)
            if status != 429:
                return status, answer
            await asyncio.sleep(wait)
            wait = min(2 * wait, RETRY_BUSY_SECONDS[1])

    async def _once(self, url: str, body: dict) -> tuple[int, dict]:
        try:
            req = self.parse(url, body)
            _, method, kind = ENDPOINTS[url]
            # Embeddings have no priority: the embedder runs its queue in arrival order.
            if self.priority is not None and getattr(req, "priority", self.priority) < self.priority:
                req = req.model_copy(update={"priority": self.priority})
            # Counted as the model's own while it runs, so an unload drains it like a request.
            async with self.models.admitted(req.model, kind) as serving:
                response = await getattr(serving, method)(req, _NoClient())
            # Completions answer a pydantic model; embeddings a JSONResponse already encoded.
            return 200, (response.model_dump(mode="json") if isinstance(response, BaseModel)
                         else json.loads(response.body))
        except ValidationError as e:
            message, param, code = validation_error(list(e.errors()))
            return 400, error_body(400, message, param, code)
        except APIError as e:
            return e.status, error_body(e.status, e.message, e.param, e.code, e.type)
        except Exception as e:  # one line's failure is that line's result, never the batch's end
            log.exception("batch line failed")
            return 500, error_body(500, f"internal error: {type(e).__name__}")


def check_lines(calls: BatchCalls, lines: list[BatchLine]) -> tuple[list[BatchLine], list[LineError]]:
    """Split parsed lines into those that will run and those whose body is invalid."""
    good, bad = [], []
    for line in lines:
        error = calls.check(line)
        (bad if error else good).append(error or line)
    return good, bad
