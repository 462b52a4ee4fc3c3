"""Drive one load shape against a server: warm-ups first (not measured), then every sample at
its arrival offset, at most `max_concurrency` in flight. A request held back by the concurrency
cap starts its clock only when it is sent, as in vLLM: TTFT measures the server, not our queue.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import httpx

from tokenmill.bench.arrivals import arrival_offsets
from tokenmill.bench.client import RequestSettings, send_request
from tokenmill.bench.datasets import SampleRequest
from tokenmill.bench.records import RequestRecord


@dataclass(frozen=True)
class LoadShape:
    request_rate: float = math.inf
    burstiness: float = 1.0
    max_concurrency: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.request_rate > 0:
            raise ValueError(f"--request-rate must be > 0 or inf, got {self.request_rate}")
        if not self.burstiness > 0:
            raise ValueError(f"--burstiness must be > 0, got {self.burstiness}")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"--max-concurrency must be >= 1, got {self.max_concurrency}")

    @property
    def label(self) -> str:
        rate = "inf" if math.isinf(self.request_rate) else f"{self.request_rate:g}"
        conc = "" if self.max_concurrency is None else f", concurrency {self.max_concurrency}"
        return f"rate {rate}{conc}"


@dataclass
class RunResult:
    shape: LoadShape
    records: list[RequestRecord]
    duration: float
    warmup_records: list[RequestRecord]


Progress = Callable[[RequestRecord], None]


async def run_load(
    settings: RequestSettings,
    samples: Sequence[SampleRequest],
    shape: LoadShape,
    num_warmups: int = 0,
    warmup_sample: SampleRequest | None = None,
    request_timeout: float = 600.0,
    on_done: Progress | None = None,
    on_warmup_done: Progress | None = None,
) -> RunResult:
    limit = shape.max_concurrency
    gate = asyncio.Semaphore(limit) if limit else None
    timeout = httpx.Timeout(request_timeout, connect=30.0)
    # No pool limit: the semaphore is the only cap, so pool waits never hide in the timings.
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=limit or 64)

    async with httpx.AsyncClient(timeout=timeout, limits=limits, trust_env=False) as client:

        async def one(sample: SampleRequest, callback: Progress | None) -> RequestRecord:
            if gate is None:
                rec = await send_request(client, settings, sample)
            else:
                async with gate:
                    rec = await send_request(client, settings, sample)
            if callback is not None:
                callback(rec)
            return rec

        warm = []
        if num_warmups and samples:
            # A prompt of its own by default: re-sending a measured prompt would let a prefix
            # cache serve that request's prefill from the warm-up.
            sample = warmup_sample or samples[0]
            warm = await asyncio.gather(*(one(sample, on_warmup_done) for _ in range(num_warmups)))

        offsets = arrival_offsets(len(samples), shape.request_rate, shape.burstiness, shape.seed)
        start = time.perf_counter()
        tasks = []
        for sample, offset in zip(samples, offsets):
            delay = start + offset - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(sample, on_done)))
        records = list(await asyncio.gather(*tasks))
        duration = time.perf_counter() - start
    return RunResult(shape, records, duration, list(warm))
