"""The OpenAI Batch API's routes: /v1/files and /v1/batches, over tokenmill.batch's service.

Thin: each route checks its input, asks the BatchService or its Store, and answers in
OpenAI's shapes (the exact schema is in openapi.py). The jobs themselves run on the service's
own thread through BatchCalls, the same handlers the HTTP routes use, at low priority.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Literal

from fastapi import FastAPI, File, Form, Query, Request, UploadFile
from fastapi.responses import FileResponse

from tokenmill.batch.service import BatchService
from tokenmill.batch.store import Store
from tokenmill.server.batch_calls import URLS, BatchCalls
from tokenmill.server.errors import APIError
from tokenmill.server.protocol import BatchCreateRequest
from tokenmill.server.served import ServedModels

PURPOSES = ("batch",)  # what an upload may be for; results are written as purpose batch_output
MAX_FILES_PAGE, MAX_BATCHES_PAGE = 10000, 100  # OpenAI's largest `limit` (files also its default)


def start_batches(models: ServedModels, data_dir: Path) -> BatchService:
    calls = BatchCalls(models)
    return BatchService(Store(data_dir), calls, URLS, calls.check, ready=lambda: models.unhealthy() is None)


def _only(http: Request, *names: str) -> None:
    """Refuse query parameters a route does not take, or takes once but got several of, as the
    schema says (no silent ignoring)."""
    unknown = next((k for k in http.query_params if k not in names), None)
    if unknown is not None:
        raise APIError(400, f"unknown query parameter {unknown[:80]!r}; this route takes {list(names)}",
                       param=unknown[:80], code="unknown_parameter")
    # Each takes one value; given twice, FastAPI would quietly keep the last (schemathesis).
    repeated = next((k for k in names if len(http.query_params.getlist(k)) > 1), None)
    if repeated is not None:
        raise APIError(400, f"query parameter {repeated!r} given more than once", param=repeated,
                       code="invalid_value")


@contextmanager
def _cursor(after: str | None):
    """An `after` that names no file or batch is the client's mistake: a 400 saying so, not an
    empty page that would read as the end of the list."""
    try:
        yield
    except KeyError:
        raise APIError(400, f"after: no such id {str(after)[:80]!r} to continue from (it may have been deleted)",
                       param="after", code="invalid_value") from None


def _page(page: list[dict], more: bool) -> dict:
    return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None, "has_more": more}


def add_batch_routes(app: FastAPI, service: BatchService) -> None:
    store = service.store

    def found(value: dict | None, what: str, value_id: str) -> dict:
        if value is None:
            raise APIError(404, f"no such {what}: {value_id[:80]!r}", param=f"{what}_id", code=f"{what}_not_found")
        return value

    def file_or_404(file_id: str) -> dict:
        return found(store.file(file_id), "file", file_id)

    @app.post("/v1/files")
    async def upload(file: UploadFile = File(...), purpose: str = Form(...)):
        if purpose not in PURPOSES:
            raise APIError(400, f"purpose must be one of {list(PURPOSES)}", param="purpose", code="invalid_value")
        content = await file.read()
        try:
            content.decode("utf-8")
        except UnicodeDecodeError:
            raise APIError(400, "a batch file must be UTF-8 JSON lines", param="file", code="invalid_file") from None
        return store.add_file((file.filename or "upload.jsonl")[:255], purpose, content)

    @app.get("/v1/files")
    async def list_files(http: Request, purpose: str | None = Query(None, max_length=64),
                         after: str | None = Query(None, max_length=128),
                         limit: int = Query(MAX_FILES_PAGE, ge=1, le=MAX_FILES_PAGE),
                         order: Literal["asc", "desc"] = Query("desc")):
        _only(http, "purpose", "after", "limit", "order")
        with _cursor(after):
            page, more = store.files(purpose, after, limit, order)
        return _page(page, more)

    @app.get("/v1/files/{file_id}")
    async def retrieve_file(file_id: str):
        return file_or_404(file_id)

    @app.get("/v1/files/{file_id}/content")
    async def file_content(file_id: str):
        file_or_404(file_id)
        return FileResponse(store.path(file_id), media_type="application/octet-stream")

    @app.delete("/v1/files/{file_id}")
    async def delete_file(file_id: str):
        file_or_404(file_id)
        store.delete_file(file_id)
        return {"id": file_id, "object": "file", "deleted": True}

    @app.post("/v1/batches")
    async def create_batch(req: BatchCreateRequest):
        found = file_or_404(req.input_file_id)
        if found["purpose"] != "batch":
            raise APIError(400, "input_file_id must name a file uploaded with purpose 'batch'",
                           param="input_file_id", code="invalid_value")
        return service.create(req.input_file_id, req.endpoint, req.completion_window, req.metadata)

    @app.get("/v1/batches")
    async def list_batches(http: Request, after: str | None = Query(None, max_length=128),
                           limit: int = Query(20, ge=1, le=MAX_BATCHES_PAGE)):
        _only(http, "after", "limit")
        with _cursor(after):
            page, more = service.list(after, limit)
        return _page(page, more)

    @app.get("/v1/batches/{batch_id}")
    async def retrieve_batch(batch_id: str):
        return found(service.get(batch_id), "batch", batch_id)

    @app.post("/v1/batches/{batch_id}/cancel")
    async def cancel_batch(batch_id: str):
        return found(service.cancel(batch_id), "batch", batch_id)
