"""AsyncEmbedder: an encoder model on its own thread behind an asyncio API, batching the inputs
of concurrent requests together (continuous micro-batching under a token budget).

An embedding is one forward pass: no KV cache, no steps to interleave. What batching buys is
fewer, larger GEMMs; so whatever inputs wait when the worker becomes free form its next batch,
up to `max_batch_tokens` tokens and `max_batch_inputs` inputs, first come first served. A
request's inputs may span several batches; its answer is whole when its last one is done.
Results do not depend on which batch an input lands in (the model packs, see model/bert.py).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from tokenmill.engine.async_engine import EngineDeadError, RequestFailedError
from tokenmill.engine.engine import QueueFullError
from tokenmill.model.tokenizer import Tokenizer

__all__ = ["AsyncEmbedder", "EmbedLimits", "EmbedInputError", "EngineDeadError", "QueueFullError",
           "RequestFailedError", "embed_in_batches"]

log = logging.getLogger("tokenmill")


class EmbedInputError(ValueError):
    """One input cannot be embedded (too long, empty, a token id out of range); `index` says which."""

    def __init__(self, message: str, index: int | None = None, code: str = "invalid_value"):
        super().__init__(message)
        self.index = index
        self.code = code


@dataclass(frozen=True)
class EmbedLimits:
    max_input_tokens: int  # the model's own limit, special tokens included
    max_batch_tokens: int = 8192  # tokens in one forward pass
    max_batch_inputs: int = 256  # inputs in one forward pass
    max_request_inputs: int = 2048  # inputs in one request (OpenAI's limit)
    max_queued_inputs: int = 16384  # waiting inputs before new requests get QueueFullError

    def __post_init__(self):
        if min(self.max_input_tokens, self.max_batch_inputs, self.max_request_inputs, self.max_queued_inputs) < 1:
            raise ValueError("embedding limits must be positive")
        if self.max_batch_tokens < self.max_input_tokens:
            raise ValueError(f"max_batch_tokens ({self.max_batch_tokens}) must hold one whole input "
                             f"({self.max_input_tokens} tokens): inputs are never split")


@dataclass(frozen=True)
class EmbedResult:
    embeddings: torch.Tensor  # [inputs, dim], float32
    num_tokens: int  # tokens embedded, special tokens included (the usage count)


def next_batch(lengths: Sequence[int], limits: EmbedLimits) -> int:
    """How many of the waiting inputs (their token counts, in order) the next batch takes."""
    tokens = 0
    for n, length in enumerate(lengths[: limits.max_batch_inputs]):
        if tokens + length > limits.max_batch_tokens:
            return n
        tokens += length
    return min(len(lengths), limits.max_batch_inputs)


def embed_in_batches(embed: Callable[[list[list[int]]], torch.Tensor], seqs: list[list[int]],
                     limits: EmbedLimits) -> torch.Tensor:
    """Offline: all of `seqs` through `embed`, batch by batch under the limits."""
    out = []
    start = 0
    while start < len(seqs):
        n = next_batch([len(s) for s in seqs[start:start + limits.max_batch_inputs]], limits)
        out.append(embed(seqs[start:start + n]))
        start += n
    return torch.cat(out) if out else torch.empty(0)


@dataclass
class _Job:
    seqs: list[list[int]]
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    rows: list[torch.Tensor | None] = field(default_factory=list)
    left: int = 0

    def __post_init__(self):
        self.rows = [None] * len(self.seqs)
        self.left = len(self.seqs)

    @property
    def abandoned(self) -> bool:
        return self.future.done()  # cancelled by a client that left, or already failed


class AsyncEmbedder:
    kind = "embedding"

    def __init__(self, model, tokenizer: Tokenizer, limits: EmbedLimits,
                 special_ids: tuple[int, int] | None = None, source: str = ""):
        """`model.embed(seqs) -> [n, dim]`; `special_ids`: the (first, last) tokens the model's
        template puts around a text, also put around inputs given as token ids."""
        self.model = model
        self.tokenizer = tokenizer
        self.limits = limits
        self.special_ids = special_ids
        self.source = source
        self._pending: deque[tuple[_Job, int]] = deque()
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stop = False
        self._closed = False  # shut down for good: an unloaded model's engine never starts again
        self.errored: BaseException | None = None
        self.in_flight = 0  # requests accepted and not yet answered (read by unload's drain)
        self.num_batches = 0
        self.num_embedded = 0

    @property
    def max_model_len(self) -> int:
        return self.limits.max_input_tokens

    @property
    def dimensions(self) -> int:
        return self.model.config.hidden_size

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def dead(self) -> bool:
        thread = self._thread
        return self.errored is not None or (thread is not None and not thread.is_alive())

    def start(self) -> None:
        if self._closed:
            raise EngineDeadError("the embedding engine was shut down")
        if self._thread is None:
            self._stop = False
            self._thread = threading.Thread(target=self._loop, name="tokenmill-embed", daemon=True)
            self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        with self._wake:
            self._stop = self._closed = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    # -- inputs --------------------------------------------------------------------------
    def encode_texts(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.backend.encode_batch(texts, add_special_tokens=True)]

    def wrap_ids(self, ids: list[int]) -> list[int]:
        """Token ids are a text already tokenized: the model's special tokens go around them
        as around a text, so a text and its ids embed alike."""
        if self.special_ids is None:
            return list(ids)
        first, last = self.special_ids
        return [first, *ids, last]

    def check(self, seqs: list[list[int]], one_request: bool = True) -> None:
        if one_request and len(seqs) > self.limits.max_request_inputs:
            raise EmbedInputError(f"at most {self.limits.max_request_inputs} inputs per request, got {len(seqs)}",
                                  code="array_above_max_length")
        vocab = self.vocab_size
        for i, ids in enumerate(seqs):
            if len(ids) > self.limits.max_input_tokens:
                raise EmbedInputError(
                    f"input {i} has {len(ids)} tokens; this model's maximum input length is "
                    f"{self.limits.max_input_tokens} tokens (special tokens included)", i, "context_length_exceeded")
            if not ids:
                raise EmbedInputError(f"input {i} is empty", i)
            if max(ids) >= vocab or min(ids) < 0:
                raise EmbedInputError(f"input {i} has a token id outside the vocabulary (0..{vocab - 1})", i)

    async def embed(self, inputs: list[str] | list[list[int]]) -> EmbedResult:
        """Embed texts, or token-id lists (without the model's special tokens). Raises
        EmbedInputError for a bad input, QueueFullError when too much waits, EngineDeadError."""
        if not inputs:
            raise EmbedInputError("no input given")
        if any(isinstance(x, str) and not x for x in inputs):
            raise EmbedInputError("an input is an empty string", next(i for i, x in enumerate(inputs) if x == ""))
        if isinstance(inputs[0], str):
            # Tokenizing hundreds of texts takes milliseconds: not on the event loop.
            seqs = await asyncio.to_thread(self.encode_texts, list(inputs)) if len(inputs) > 8 \
                else self.encode_texts(list(inputs))
        else:
            seqs = [self.wrap_ids(ids) for ids in inputs]
        self.check(seqs)
        return EmbedResult(await self.embed_ids(seqs), sum(len(s) for s in seqs))

    async def embed_ids(self, seqs: list[list[int]]) -> torch.Tensor:
        """Embed checked token-id sequences (special tokens included)."""
        self.start()
        if self.dead:
            raise EngineDeadError(f"the embedding engine has stopped ({type(self.errored).__name__})")
        loop = asyncio.get_running_loop()
        job = _Job(seqs, loop.create_future(), loop)
        with self._wake:
            if len(self._pending) + len(seqs) > self.limits.max_queued_inputs:
                raise QueueFullError(f"{len(self._pending)} inputs are waiting to be embedded; retry later")
            self._pending.extend((job, i) for i in range(len(seqs)))
            self.in_flight += 1
            self._wake.notify()
        try:
            return await job.future
        finally:
            with self._wake:
                self.in_flight -= 1

    # -- worker thread -------------------------------------------------------------------
    def _take(self) -> list[tuple[_Job, int]] | None:
        """The next batch: waiting inputs in arrival order, under the token and input budgets
        (one input always fits: the limits guarantee a whole input fits the token budget)."""
        limits = self.limits
        with self._wake:
            while not self._stop and not self._pending:
                self._wake.wait()
            if self._stop:
                return None
            taken: list[tuple[_Job, int]] = []
            tokens = 0
            while self._pending and len(taken) < limits.max_batch_inputs:
                job, i = self._pending[0]
                if job.abandoned:  # its client left, or another of its inputs failed
                    self._pending.popleft()
                    continue
                if tokens + len(job.seqs[i]) > limits.max_batch_tokens:
                    break
                taken.append(self._pending.popleft())
                tokens += len(job.seqs[i])
            return taken

    def _loop(self) -> None:
        try:
            while (batch := self._take()) is not None:
                if batch:
                    self._run(batch)
        except BaseException as e:  # the loop itself broke: fail everyone waiting
            self.errored = e
            log.exception("embedding engine loop failed")
            with self._wake:
                waiting, self._pending = list(self._pending), deque()
            for job, _ in waiting:
                _settle(job, EngineDeadError(f"the embedding engine has stopped ({type(e).__name__})"))

    def _run(self, batch: list[tuple[_Job, int]]) -> None:
        try:
            rows = self.model.embed([job.seqs[i] for job, i in batch])
        except Exception as e:  # this batch's inputs fail; the engine goes on
            log.exception("embedding batch failed")
            for job in {id(j): j for j, _ in batch}.values():
                _settle(job, RequestFailedError(f"embedding failed: {type(e).__name__}"))
            return
        self.num_batches += 1
        self.num_embedded += len(batch)
        for (job, i), row in zip(batch, rows):
            job.rows[i] = row
            job.left -= 1
            if job.left == 0:
                _settle(job, torch.stack(job.rows))


def _settle(job: _Job, value) -> None:
    def done() -> None:
        if job.future.done():
            return
        if isinstance(value, BaseException):
            job.future.set_exception(value)
        else:
            job.future.set_result(value)

    job.loop.call_soon_threadsafe(done)
