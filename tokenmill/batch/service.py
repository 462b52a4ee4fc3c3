"""The Batch API's jobs: create, run, cancel, expire, and resume after a restart.

Jobs run on their own thread and event loop, apart from the HTTP server's, so a batch never
waits on the server's loop nor slows it; they call the engine through `execute` (the
server's own handlers) at a low priority, so interactive traffic goes first.

Lifecycle: validating (every line parsed and checked; bad ones go to the error file) ->
in_progress -> finalizing (output and error files registered) -> completed; failed when
there is nothing valid to run; cancelling -> cancelled; expired past the completion window.
A restart finds every active batch in the store and runs it again: the result files say
which custom_ids are done, so each is answered exactly once.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable

from tokenmill.batch.format import BatchLine, LineError, parse_lines
from tokenmill.batch.results import ResultFiles
from tokenmill.batch.runner import Execute, run_lines
from tokenmill.batch.store import Store, new_id

log = logging.getLogger("tokenmill.batch")

WINDOWS = {"24h": 24 * 3600}  # OpenAI's one completion window
MAX_REPORTED_ERRORS = 100  # of the line errors, how many the batch object itself lists


def _public(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if not k.startswith("_")}


class BatchService:
    def __init__(
        self, store: Store, execute: Execute, urls: tuple[str, ...],
        check: Callable[[BatchLine], LineError | None], ready: Callable[[], bool], concurrency: int = 128,
    ):
        self.store = store
        self.execute = execute
        self.urls = urls
        self.check = check  # a line's body validated up front, as the route would
        self.ready = ready  # the model can answer (it may still be loading after a restart)
        self.concurrency = concurrency
        self._tasks: dict[str, asyncio.Task] = {}
        self._loop = asyncio.new_event_loop()
        threading.Thread(target=self._loop.run_forever, name="tokenmill-batches", daemon=True).start()
        for batch in store.active_batches():
            log.info("resuming batch %s (%s)", batch["id"], batch["status"])
            self._start(batch["id"])

    # -- the API's verbs (called from the HTTP loop) ---------------------------------------
    def create(self, input_file_id: str, endpoint: str, completion_window: str, metadata: dict | None) -> dict:
        now = int(time.time())
        batch_id = new_id("batch")
        batch = {
            "id": batch_id, "object": "batch", "endpoint": endpoint, "errors": None, "input_file_id": input_file_id,
            "completion_window": completion_window, "status": "validating", "output_file_id": None,
            "error_file_id": None, "created_at": now, "in_progress_at": None,
            "expires_at": now + WINDOWS[completion_window], "finalizing_at": None, "completed_at": None,
            "failed_at": None, "expired_at": None, "cancelling_at": None, "cancelled_at": None,
            "request_counts": {"total": 0, "completed": 0, "failed": 0}, "metadata": metadata,
            "_output": new_id("file"), "_error": new_id("file"),
        }
        self.store.put_batch(batch)
        self._start(batch_id)
        return _public(batch)

    def get(self, batch_id: str) -> dict | None:
        batch = self.store.batch(batch_id)
        return _public(batch) if batch else None

    def list(self, after: str | None, limit: int) -> tuple[list[dict], bool]:
        page, more = self.store.batches(after, limit)
        return [_public(b) for b in page], more

    def cancel(self, batch_id: str) -> dict | None:
        batch = self.store.batch(batch_id)
        if batch is None:
            return None
        if batch["status"] in ("validating", "in_progress"):
            batch = self.store.update_batch(batch_id, status="cancelling", cancelling_at=int(time.time()))
            task = self._tasks.get(batch_id)
            if task is not None:
                self._loop.call_soon_threadsafe(task.cancel)
            else:  # not running (yet): nothing in flight to wait for
                self._start(batch_id)
        return _public(batch)

    # -- jobs (on the batch thread) ------------------------------------------------------
    def _start(self, batch_id: str) -> None:
        def spawn() -> None:
            self._tasks[batch_id] = self._loop.create_task(self._job(batch_id))

        self._loop.call_soon_threadsafe(spawn)

    def _set(self, batch: dict, **changes) -> None:
        batch.update(self.store.update_batch(batch["id"], **changes))

    async def _job(self, batch_id: str) -> None:
        batch = self.store.batch(batch_id)
        try:
            if batch["status"] == "cancelling":
                return self._finish(batch, "cancelled")
            if time.time() >= batch["expires_at"]:
                return self._finish(batch, "expired")
            await self._run(batch)
        except asyncio.CancelledError:
            self._finish(self.store.batch(batch_id), "cancelled")
        except TimeoutError:
            self._finish(self.store.batch(batch_id), "expired")
        except Exception as e:  # the batch fails; the server and the other batches go on
            log.exception("batch %s failed", batch_id)
            self._finish(self.store.batch(batch_id), "failed", {"code": "internal_error", "message": type(e).__name__})
        finally:
            self._tasks.pop(batch_id, None)

    async def _run(self, batch: dict) -> None:
        path = self.store.path(batch["input_file_id"])
        if not path.exists():
            return self._finish(batch, "failed", {"code": "invalid_file", "message": "the input file is gone"})
        # Lines are checked against the models (their kind: an embedding line for an LLM fails
        # up front), so wait until they are loaded: a check must find the same on every resume.
        while not self.ready():  # after a restart the model may still be loading
            await asyncio.sleep(0.2)
        text = await asyncio.to_thread(path.read_text, "utf-8", "replace")
        # A line must ask for the batch's own endpoint (OpenAI's rule).
        allowed = (batch["endpoint"],) if batch["endpoint"] in self.urls else ()
        parsed, bad = parse_lines(text.splitlines(), allowed)
        lines = []
        for line in parsed:
            error = self.check(line)
            (bad.append(error) if error else lines.append(line))
        bad.sort(key=lambda e: e.line)
        reported = [{"code": e.code, "message": e.message, "param": e.param, "line": e.line}
                    for e in bad[:MAX_REPORTED_ERRORS]]
        errors = {"object": "list", "data": reported} if reported else None
        total = len(lines) + len(bad)
        if total == 0:
            return self._finish(batch, "failed", {"code": "empty_file", "message": "the input file has no requests"})
        self._set(batch, errors=errors, request_counts={"total": total, "completed": 0, "failed": 0})
        if batch["status"] == "validating":
            self._set(batch, status="in_progress", in_progress_at=int(time.time()))
        results = ResultFiles(self.store.path(batch["_output"]), self.store.path(batch["_error"]))
        last = [0.0]

        def progress(_: int) -> None:  # counts in the store, at most a few times a second
            if time.monotonic() - last[0] > 0.5:
                last[0] = time.monotonic()
                self._counts(batch, results)

        try:
            await asyncio.wait_for(run_lines(lines, bad, self.execute, results, self.concurrency, progress),
                                   max(0.0, batch["expires_at"] - time.time()))
        finally:
            self._counts(batch, results)
            results.close()
        self._set(batch, status="finalizing", finalizing_at=int(time.time()))
        self._finish(batch, "completed")

    def _counts(self, batch: dict, results: ResultFiles) -> None:
        counts = dict(batch["request_counts"], completed=results.num_completed, failed=results.num_failed)
        self._set(batch, request_counts=counts)

    def _finish(self, batch: dict, status: str, error: dict | None = None) -> None:
        """The end state, with whatever results exist registered as the output and error files."""
        now = int(time.time())
        changes: dict = {"status": status, f"{status}_at": now}
        for key, field, name in (("_output", "output_file_id", "output"), ("_error", "error_file_id", "errors")):
            if self.store.path(batch[key]).exists() and self.store.path(batch[key]).stat().st_size:
                self.store.register_file(batch[key], f"{batch['id']}_{name}.jsonl", "batch_output")
                changes[field] = batch[key]
        if error is not None:
            changes["errors"] = {"object": "list", "data": [error | {"param": None, "line": None}]}
        self._set(batch, **changes)
