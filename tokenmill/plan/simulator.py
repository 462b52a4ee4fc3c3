"""Discrete-event simulation of a fleet on a virtual clock, with the engine's own scheduler.

Each replica is the production Scheduler over the production KVCacheManager, built by
Scheduler.from_config as the engine core builds it; where the engine would run the model,
the simulator asks a cost model how long the step takes and hands back one made-up token per
sampling sequence. So batching, chunked prefill, preemption and prefix hits are the engine's
own decisions, not a re-implementation of them.

Events: an arrival routes a request to a replica (tokenmill.router.policy, the router's own
scoring); a replica that is idle starts a step at once; a step's end commits its tokens
(Scheduler.update, as the core does), stamps their times, and starts the next step if there
is work. Requests that arrive during a step wait for the next schedule(), as in the engine.

Clients: open loop (each request at its arrival time), optionally limited to max_concurrency
in flight (a request waits for a free slot, as `tokenmill bench --max-concurrency` does), and
with think_time_s a slot rests that long (exponential, mean think_time_s) after a response
before sending its next request: a closed loop of users.
"""

from __future__ import annotations

import heapq
import math
import random
from collections import deque
from dataclasses import dataclass, field

from tokenmill.bench.metrics import BenchmarkMetrics, compute_metrics
from tokenmill.bench.records import RequestRecord
from tokenmill.config import EngineConfig
from tokenmill.engine.request import Request
from tokenmill.engine.scheduler import Scheduler, SchedulerOutput
from tokenmill.plan.cost import shape_of_chunks
from tokenmill.plan.workload import TraceRequest, prompt_ids
from tokenmill.router.policy import Policy, PolicyConfig, ReplicaView
from tokenmill.sampling import SamplingParams

# How a replica's scheduler is built: the engine core's own way (a seam for tests that compare
# against another KV manager).
simulated_scheduler = Scheduler.from_config

# At one instant: arrivals first, then freed client slots, step ends, and last an idle
# replica waking to step, so requests sent at the same time share its first step.
_ARRIVE, _SLOT_FREE, _STEP_END, _WAKE = 0, 1, 2, 3


@dataclass
class _Tracked:
    """Client-side view of one request (what bench's RequestRecord would hold)."""

    index: int
    trace: TraceRequest
    sent: float = 0.0
    token_times: list[float] = field(default_factory=list)
    first: float = -1.0
    last: float = 0.0
    num_tokens: int = 0
    error: str = ""


class Replica:
    def __init__(self, name: str, config: EngineConfig, num_blocks: int, max_model_len: int, cost_model):
        self.name = name
        self.config = config
        self.scheduler = simulated_scheduler(config, num_blocks, max_model_len)
        self.cost = cost_model
        self.busy = False
        self.current: SchedulerOutput | None = None
        self.num_steps = 0
        self.busy_seconds = 0.0

    @property
    def kv_usage(self) -> float:
        return self.scheduler.kv.pool.usage


@dataclass
class TimelinePoint:
    t: float
    running: int
    waiting: int
    kv_usage: float  # mean over replicas
    preemptions: int  # cumulative, all replicas


@dataclass
class SimResult:
    records: list[RequestRecord]
    duration: float
    metrics: BenchmarkMetrics
    replicas: list[Replica]
    timeline: list[TimelinePoint]
    steps: list[dict]  # per step when log_steps: replica, chunks (id, start, tokens, new), preempted

    @property
    def num_preemptions(self) -> int:
        return sum(r.scheduler.num_preemptions for r in self.replicas)

    @property
    def prefix_hit_rate(self) -> float:
        q = sum(r.scheduler.kv.prefix_queries for r in self.replicas)
        return sum(r.scheduler.kv.prefix_hits for r in self.replicas) / q if q else 0.0

    @property
    def num_steps(self) -> int:
        return sum(r.num_steps for r in self.replicas)

    @property
    def utilization(self) -> float:
        """Share of replica-time spent stepping."""
        return sum(r.busy_seconds for r in self.replicas) / (len(self.replicas) * self.duration) if self.duration else 0.0


class Simulator:
    def __init__(self, config: EngineConfig, num_blocks: int, max_model_len: int, cost_model, vocab_size: int,
                 num_replicas: int = 1, policy: str = "least-load", seed: int = 0,
                 max_concurrency: int | None = None, think_time_s: float = 0.0,
                 log_steps: bool = False, record_itl: bool = True, timeline_every_s: float = 1.0,
                 goodput_slos: dict[str, float] | None = None):
        self.config = config
        self.vocab_size = vocab_size
        self.replicas = [Replica(f"r{i}", config, num_blocks, max_model_len, cost_model) for i in range(num_replicas)]
        self.policy = Policy(PolicyConfig(policy=policy))
        self.rng = random.Random(seed)
        self.max_concurrency = max_concurrency
        self.think_time_s = think_time_s
        self.log_steps = log_steps
        self.record_itl = record_itl
        self.timeline_every_s = timeline_every_s
        self.goodput_slos = goodput_slos
        self._events: list = []
        self._seq = 0
        self._tracked: dict[str, tuple[_Tracked, Replica]] = {}
        self._steps: list[dict] = []
        self._timeline: list[TimelinePoint] = []
        self._next_sample = 0.0

    def _push(self, t: float, kind: int, payload) -> None:
        self._seq += 1
        heapq.heappush(self._events, (t, kind, self._seq, payload))

    # -- the run -------------------------------------------------------------------------
    def run(self, trace: list[TraceRequest]) -> SimResult:
        todo = sorted(enumerate(trace), key=lambda it: it[1].arrival)
        pending: deque[_Tracked] = deque()  # arrived, waiting for a client slot
        free_slots = self.max_concurrency if self.max_concurrency else math.inf
        for i, tr in todo:
            self._push(tr.arrival, _ARRIVE, _Tracked(i, tr))
        done: list[_Tracked] = []
        now = 0.0
        while self._events:
            now, kind, _, payload = heapq.heappop(self._events)
            if kind == _ARRIVE:
                pending.append(payload)
            elif kind == _SLOT_FREE:
                free_slots += 1
            elif kind == _WAKE:
                self._start_step(payload, now)
            else:
                finished = self._end_step(payload, now)
                done.extend(finished)
                for _ in finished:
                    if self.max_concurrency and self.think_time_s > 0:
                        self._push(now + self.rng.expovariate(1.0 / self.think_time_s), _SLOT_FREE, None)
                    elif self.max_concurrency:
                        free_slots += 1
            while pending and free_slots > 0:
                free_slots -= 1
                tracked = pending.popleft()
                if not self._send(tracked, now):
                    done.append(tracked)
                    free_slots += 1
            self._sample(now)
        return self._result(done)

    def _send(self, tracked: _Tracked, now: float) -> bool:
        tracked.sent = now
        tr = tracked.trace
        request = Request(
            request_id=f"req-{tracked.index}", prompt_token_ids=prompt_ids(tracked.index, tr, self.vocab_size),
            params=SamplingParams(max_tokens=tr.output_len, ignore_eos=True), arrival_order=tracked.index,
            max_tokens=tr.output_len,
        )
        replica = self._route(request, now)
        if replica.scheduler.num_waiting >= self.config.scheduler.max_waiting_requests:
            tracked.error = "429: the waiting queue is full"
            return False
        try:
            replica.scheduler.add_request(request)
        except ValueError as e:  # too long for the context or the pool: the server's 400
            tracked.error = str(e)
            return False
        self._tracked[request.request_id] = (tracked, replica)
        if not replica.busy:
            replica.busy = True
            self._push(now, _WAKE, replica)
        return True

    def _route(self, request: Request, now: float) -> Replica:
        if len(self.replicas) == 1:
            return self.replicas[0]
        prefix = self.policy.config.policy == "prefix"
        views = []
        for r in self.replicas:
            s = r.scheduler
            hit = s.kv.get_computed_blocks(request)[1] // s.kv.block_size if prefix else 0
            views.append(ReplicaView(r.name, scraped_at=now, waiting=s.num_waiting, running=s.num_running,
                                     kv_usage=r.kv_usage, in_flight=len(s.requests), hit_blocks=hit))
        blocks = (request.num_tokens - 1) // self.replicas[0].scheduler.kv.block_size
        decision = self.policy.choose(views, now, self.rng, prompt_blocks=blocks)
        return self.replicas[int(decision.replica[1:])]

    def _start_step(self, replica: Replica, now: float) -> None:
        out = replica.scheduler.schedule()
        if out.is_empty:
            replica.busy = False
            return
        if self.log_steps:
            self._steps.append({
                "replica": replica.name,
                "chunks": [(c.request.request_id, c.start, c.num_tokens, c.new) for c in out.chunks],
                "preempted": [r.request_id for r in out.preempted],
            })
        seconds = replica.cost.step_seconds(shape_of_chunks(out.chunks))
        replica.busy = True
        replica.current = out
        replica.num_steps += 1
        replica.busy_seconds += seconds
        self._push(now + seconds, _STEP_END, replica)

    def _end_step(self, replica: Replica, now: float) -> list[_Tracked]:
        out = replica.current
        sampled = {}
        for c in out.chunks:
            if c.samples:
                r = c.request
                sampled[r.request_id] = [_fake_token(r, self.vocab_size)]
        finished = replica.scheduler.update(out, sampled)
        for rid in sampled:
            tracked = self._tracked[rid][0]
            if tracked.first < 0:
                tracked.first = now
            elif self.record_itl:
                tracked.token_times.append(now - tracked.last)
            tracked.last = now
            tracked.num_tokens += 1
        ended = []
        for request in finished:
            ended.append(self._tracked.pop(request.request_id)[0])
        replica.current = None
        self._start_step(replica, now)
        return ended

    def _sample(self, now: float) -> None:
        if now < self._next_sample:
            return
        self._next_sample = now + self.timeline_every_s
        rs = self.replicas
        self._timeline.append(TimelinePoint(
            now, sum(r.scheduler.num_running for r in rs), sum(r.scheduler.num_waiting for r in rs),
            sum(r.kv_usage for r in rs) / len(rs), sum(r.scheduler.num_preemptions for r in rs),
        ))

    def _result(self, done: list[_Tracked]) -> SimResult:
        records = []
        for t in sorted(done, key=lambda x: x.index):
            ok = not t.error and t.num_tokens > 0
            records.append(RequestRecord(
                prompt_len=t.trace.input_len, expected_output_len=t.trace.output_len, start_time=t.sent,
                ttft=(t.first - t.sent) if ok else 0.0, itl=t.token_times if ok else [],
                latency=(t.last - t.sent) if ok else 0.0, output_tokens=t.num_tokens if ok else 0,
                error=t.error, success=ok,
            ))
        ok = [r for r in records if r.success]
        duration = (max(r.end_time for r in ok) - min(r.start_time for r in records)) if ok else 0.0
        metrics = compute_metrics(records, duration, goodput_slos=self.goodput_slos)
        return SimResult(records, duration, metrics, self.replicas, self._timeline, self._steps)


def _fake_token(request: Request, vocab_size: int) -> int:
    # Deterministic in the request and position: a recompute after preemption re-keys the same
    # blocks, as the engine's greedy tokens would.
    return (request.arrival_order * 2654435761 + request.num_output_tokens * 40503 + 7) % vocab_size
