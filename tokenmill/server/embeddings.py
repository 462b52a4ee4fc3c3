"""/v1/embeddings for one served embedding model, over its AsyncEmbedder.

The answer is OpenAI's: one `embedding` per input in input order, as floats or (the official
client's default) base64 of the float32 little-endian bytes, with the tokens counted in usage.
"""

from __future__ import annotations

import base64
import time
from dataclasses import dataclass

import numpy as np
from fastapi import Request
from fastapi.responses import JSONResponse

from tokenmill.engine.async_embedder import AsyncEmbedder, EmbedInputError, QueueFullError
from tokenmill.server.errors import APIError
from tokenmill.server.metrics import EmbeddingMetrics
from tokenmill.server.protocol import EmbeddingRequest
from tokenmill.server.streams import RETRY_AFTER_SECONDS, engine_failure, until_disconnect


@dataclass
class EmbeddingServing:
    engine: AsyncEmbedder
    model_name: str
    metrics: EmbeddingMetrics
    kind = "embedding"

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    def abort_all(self) -> int:
        return 0  # an embedding request is one forward pass: a drain lets it finish

    def check_dimensions(self, dimensions: int | None) -> None:
        native = self.engine.dimensions
        if dimensions is not None and dimensions != native:
            # Cutting a vector short only keeps its meaning for models trained for it
            # (Matryoshka); this one was not, so a shorter vector would be silently worse.
            raise APIError(400, f"the model {self.model_name!r} cannot shorten its embeddings: they have "
                                f"{native} dimensions; leave 'dimensions' out or set it to {native}",
                           param="dimensions", code="unsupported_parameter")

    async def embeddings(self, req: EmbeddingRequest, http: Request) -> JSONResponse:
        self.check_dimensions(req.dimensions)
        start = time.monotonic()
        try:
            result = await until_disconnect(http, self.engine.embed(req.inputs))
        except EmbedInputError as e:
            param = "input" if e.index is None or isinstance(req.input, str) or isinstance(req.input[0], int) \
                else f"input[{e.index}]"
            raise APIError(400, str(e), param=param, code=e.code) from None
        except QueueFullError as e:
            raise APIError(429, f"server busy: {e}", code="queue_full",
                           headers={"Retry-After": RETRY_AFTER_SECONDS}) from None
        except Exception as e:
            raise engine_failure(e) from None
        self.metrics.observe(result.num_tokens, time.monotonic() - start)
        rows = result.embeddings.float().numpy()
        data = [{"object": "embedding", "index": i, "embedding": _encoded(row, req.encoding_format)}
                for i, row in enumerate(rows)]
        usage = {"prompt_tokens": result.num_tokens, "total_tokens": result.num_tokens}
        return JSONResponse({"object": "list", "data": data, "model": self.model_name, "usage": usage})


def _encoded(row: np.ndarray, encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":
        return base64.b64encode(row.astype("<f4", copy=False).tobytes()).decode("ascii")
    return row.tolist()
