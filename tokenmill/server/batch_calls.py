"""A batch line answered exactly as the HTTP route would answer it, without HTTP.

The body is validated by the same pydantic model and run by the same Serving method as
/v1/completions and /v1/chat/completions, so a batch result is byte-for-byte what the API
returns; only the transport differs. Used by the server's Batch API and by the offline
`tokenmill run-batch`, both through tokenmill.batch.runner's `Execute` seam.
"""

from __future__ import annotations

import asyncio
import logging

from pydantic import BaseModel, ValidationError

from tokenmill.batch.format import BatchLine, LineError
from tokenmill.server.errors import APIError, error_body, validation_error
from tokenmill.server.protocol import ChatCompletionRequest, CompletionRequest
from tokenmill.server.served import ServedModels

log = logging.getLogger("tokenmill.server")

# url -> (request model, Serving method). /v1/embeddings joins here once the server has it.
ENDPOINTS: dict[str, tuple[type[BaseModel], str]] = {
    "/v1/completions": (CompletionRequest, "completions"),
    "/v1/chat/completions": (ChatCompletionRequest, "chat"),
}
URLS = tuple(ENDPOINTS)

# Batch work yields to interactive work (priority 0 by default): a lower value runs first.
BATCH_PRIORITY = 100


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
        model, _ = ENDPOINTS[url]
        req = model.model_validate(body)
        if req.stream:
            raise APIError(400, "stream is not supported in a batch", param="stream", code="invalid_value")
        if req.model is not None and req.model not in self.models.names:
            raise APIError(404, f"the model {req.model!r} does not exist; this server serves {self.models.names}",
                           param="model", code="model_not_found")
        return req

    def check(self, line: BatchLine) -> LineError | None:
        """Validate a line's body up front, as the route would (model, fields, ranges)."""
        try:
            self.parse(line.url, line.body)
        except ValidationError as e:
            message, param, code = validation_error(list(e.errors()))
            return LineError(line.line, line.custom_id, code, f"line {line.line}: {message}", param)
        except APIError as e:
            return LineError(line.line, line.custom_id, e.code or "invalid_request", f"line {line.line}: {e.message}",
                             e.param)
        return None

    async def __call__(self, url: str, body: dict) -> tuple[int, dict]:
        try:
            req = self.parse(url, body)
            if self.priority is not None and req.priority < self.priority:
                req = req.model_copy(update={"priority": self.priority})
            serving = self.models.route(req.model)
            response = await getattr(serving, ENDPOINTS[url][1])(req, _NoClient())
            return 200, response.model_dump(mode="json")
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
