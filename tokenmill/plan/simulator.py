"""Discrete-event simulation of a fleet on a virtual clock, with the engine's own scheduler.

Each replica is the production Scheduler over the production KVCacheManager, built by
Scheduler.from_config as the engine core builds it; where the engine would run the model,
the simulator asks a cost model how long the step takes and hands back one made-up token per
sampling sequence. So batching, chunked prefill, preemption and prefix hits are the engine's
own decisions, not a re-implementation of them.

Events: an arrival routes a request to a replica (tokenmill.router.policy, the router's own
scoring); a replica that is idle starts a step at once; a step's end commits its tokens
(Scheduler.update, as the core does), stamps their times, and starts the next step if there
is work. Requests that arrive during a step wait for the next schedule(), as in the engine,
and each lengthens that step by the cost model's arrival_s (the front's work on it).

The front: a request reaches a replica's scheduler the cost model's ingress_s after its
send (HTTP, validation, tokenizing), and each token reaches the client egress_s after its
step ends (streaming); both 0 unless calibrated from client results.

Clients: open loop (each request at its arrival time), optionally limited to max_concurrency
in flight (a request waits for a free slot, as `tokenmill bench --max-concurrency` does), and
with think_time_s a slot rests that long (exponential, mean think_time_s) after a response
before sending its next request: a closed loop of users.

Fast-forward (exact): most steps of a busy replica are steady decode: nobody waiting, every
running request one token from its next. A run of such steps, up to the first step that
gives some request its last token, needs no decision the scheduler could make differently: it
is the same batch every step, growing by one token a row. So the simulator does not call
schedule()/update() for each step: it prices the run with the cost model (decode_step_seconds, one
call per step, no rows built), posts one event at its end, and then applies the run to the
requests and the KV pool in bulk: the same fake tokens, the same block allocations and prefix
keys, in the same order (step by step, requests in the scheduler's order) as the step-by-step
path, so the pool's free queue and evictions are identical. A run ends early at the step in
progress when a request is routed to that replica (the next schedule() must see it), and
routing reads each replica's state as of that instant (KV usage from the run's allocation
counts; with the prefix policy the run is applied up to that instant first). Per-request token
times, steps, preemptions and prefix hits equal the step-by-step simulation's
(tests/plan/test_fast_forward.py); `fast_forward=False` runs every step through the scheduler.
Timeline points are taken on a fixed grid of virtual time, so both paths sample the same
instants.
"""

from __future__ import annotations

import bisect
import heapq
import math
import random
from collections import deque
from dataclasses import dataclass, field
from functools import cached_property

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

# At one instant: arrivals first, then requests through the front (reaching a scheduler),
# freed client slots, step ends, an idle replica waking to step (so requests that reach it at
# the same time share its first step), and last a timeline sample, which sees the instant
# settled.
_ARRIVE, _READY, _SLOT_FREE, _STEP_END, _WAKE, _SAMPLE = 0, 1, 2, 3, 4, 5

# Fast-forward runs: at least this many steps (a shorter one is not worth its set-up), priced
# in chunks that grow from the first (a run is often cut short by an arrival, so pricing all
# its steps up front would be wasted), and never longer than the last (bounds its lists).
_MIN_RUN, _FIRST_CHUNK, _MAX_RUN = 2, 8, 4096


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
        self.current: SchedulerOutput | None = None  # the step in progress (not a run's)
        self.step_end = 0.0  # ... its end
        self.step_seconds = 0.0  # ... and its length (arrivals during it lengthen both)
        self.num_steps = 0
        self.busy_seconds = 0.0
        self.run: _Run | None = None  # a fast-forward run in progress
        self.generation = 0  # bumped when a run's end moves: an older step-end event is stale

    def kv_usage(self, now: float, settled: bool = False) -> float:
        """KV usage at `now`; settled: after every event at `now` (else before its step ends)."""
        pool = self.scheduler.kv.pool
        if self.run is None:
            return pool.usage
        return (self.run.used0 + self.run.allocated_by(now, settled)) / pool.num_blocks


class _Run:
    """A run of steady decode steps on one replica (see Fast-forward above).

    Step j schedules one token for every request (in the scheduler's order) and ends at
    ends[j]: its requests then hold num_tokens0 + j + 1 tokens. Schedule j allocates a block
    for each request whose (num_tokens0 - 1) % block_size == -j % block_size, and keys one
    full block for each whose num_tokens0 % block_size == -j % block_size.
    """

    def __init__(self, requests: list[Request], tokens0: list[int], outputs0: list[int], start: float, length: int,
                 period: list[int], used0: int, block_size: int, keyed: bool):
        self.requests = requests
        self.tokens0 = tokens0  # each request's tokens and output tokens at the run's start
        self.outputs0 = outputs0
        self.sum_start0 = sum(tokens0) - len(requests)
        self.start = start
        self.length = length  # steps planned (an arrival may cut it short)
        self.ends: list[float] = []  # of the steps priced so far
        self.seconds: list[float] = []
        # Blocks allocated by schedules 0..i of every block_size steps (the allocations repeat
        # with that period: period[-1] is one block per request).
        self.period = period
        self.peak = self.allocs(length)  # blocks allocated by the whole planned run
        bs = block_size
        self.used0 = used0
        self.applied = 0  # steps whose schedule and token have been applied to the requests and pool
        self.retry: dict[int, Request] = {}  # position -> request with a full block not yet keyed
        self.keyed = keyed  # prefix caching keys blocks as they fill (block_size > 1)
        # Schedule j's KV work, by residue j % block_size, in the scheduler's order: (position,
        # request, starts a block, fills one). A request starts a block at the residue where
        # (t0 - 1 + j) % bs == 0 and fills one where (t0 + j) % bs == 0: never the same residue
        # when keyed (bs > 1), so each entry is one or the other, and walking the positions in
        # order leaves every list in the scheduler's order.
        self.plans: list[list[tuple[int, Request, bool, bool]]] = [[] for _ in range(bs)]
        for pos, (r, t) in enumerate(zip(requests, self.tokens0)):
            self.plans[(1 - t) % bs].append((pos, r, True, False))
            if keyed:
                self.plans[-t % bs].append((pos, r, False, True))

    @cached_property
    def by_residue(self) -> list[list[tuple[int, Request]]]:
        """(position, request) by (tokens0 - 1) % block_size: for the step-by-step fallback."""
        bs = len(self.plans)
        by_residue: list[list[tuple[int, Request]]] = [[] for _ in range(bs)]
        for pos, (r, t) in enumerate(zip(self.requests, self.tokens0)):
            by_residue[(t - 1) % bs].append((pos, r))
        return by_residue

    def steps_started(self, now: float, settled: bool) -> int:
        """Steps whose schedule has run at `now` (step j > 0 starts when step j - 1 ends)."""
        before = bisect.bisect_right(self.ends, now) if settled else bisect.bisect_left(self.ends, now)
        return min(self.length, 1 + before)

    def allocs(self, steps: int) -> int:
        """Blocks allocated by schedules 0..steps - 1."""
        full, part = divmod(steps, len(self.period))
        return full * self.period[-1] + (self.period[part - 1] if part else 0)

    def allocated_by(self, now: float, settled: bool) -> int:
        return self.allocs(self.steps_started(now, settled))


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
                 goodput_slos: dict[str, float] | None = None, fast_forward: bool = True):
        self.config = config
        self.vocab_size = vocab_size
        self.replicas = [Replica(f"r{i}", config, num_blocks, max_model_len, cost_model) for i in range(num_replicas)]
        # Each scheduler's dict of its requests (the same object for its life): read per arrival.
        self._request_dicts = [r.scheduler.requests for r in self.replicas]
        self.policy = Policy(PolicyConfig(policy=policy))
        self.rng = random.Random(seed)
        self.max_concurrency = max_concurrency
        self.think_time_s = think_time_s
        self.log_steps = log_steps
        self.record_itl = record_itl
        self.timeline_every_s = timeline_every_s
        self.goodput_slos = goodput_slos
        # Only with a cost model that can price a decode batch from its totals.
        self.fast_forward = fast_forward and hasattr(cost_model, "decode_step_seconds")
        self._arrival_s = getattr(cost_model, "arrival_s", 0.0)
        # The front's latency outside the steps: send to scheduler, step end to client.
        self._ingress_s = getattr(cost_model, "ingress_s", 0.0)
        self._egress_s = getattr(cost_model, "egress_s", 0.0)
        self._events: list = []
        self._seq = 0
        self._tracked: dict[str, tuple[_Tracked, Replica]] = {}
        self._steps: list[dict] = []
        self._stale = 0  # step-end events of cut runs, still in the heap
        self._timeline: list[TimelinePoint] = []

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
        self._push(0.0, _SAMPLE, None)
        done: list[_Tracked] = []
        now = 0.0
        while self._events:
            now, kind, _, payload = heapq.heappop(self._events)
            if kind == _ARRIVE:
                pending.append(payload)
            elif kind == _READY:
                if not self._admit(payload, now):
                    done.append(payload)
                    free_slots += 1
            elif kind == _SLOT_FREE:
                free_slots += 1
            elif kind == _WAKE:
                self._start_step(payload, now)
            elif kind == _SAMPLE:
                self._sample(now)
                if len(self._events) > self._stale:  # the timeline ends with the last live event
                    self._push(now + self.timeline_every_s, _SAMPLE, None)
            else:
                replica, generation = payload
                if generation != replica.generation:
                    self._stale -= 1
                    continue  # a run's old end: the run was cut short
                if replica.run is not None and replica.run.length > len(replica.run.ends):
                    self._price_run(replica)  # the next chunk of a run nobody cut short
                    continue
                finished = self._end_run(replica, now) if replica.run is not None else self._end_step(replica, now)
                done.extend(finished)
                for _ in finished:  # the client has the last token egress_s later
                    if self.max_concurrency and self.think_time_s > 0:
                        rest = self.rng.expovariate(1.0 / self.think_time_s)
                        self._push(now + self._egress_s + rest, _SLOT_FREE, None)
                    elif self.max_concurrency and self._egress_s:
                        self._push(now + self._egress_s, _SLOT_FREE, None)
                    elif self.max_concurrency:
                        free_slots += 1
            while pending and free_slots > 0:
                free_slots -= 1
                tracked = pending.popleft()
                tracked.sent = now
                if self._ingress_s:  # through the front first: it reaches a scheduler later
                    self._push(now + self._ingress_s, _READY, tracked)
                elif not self._admit(tracked, now):
                    done.append(tracked)
                    free_slots += 1
        return self._result(done)

    def _admit(self, tracked: _Tracked, now: float) -> bool:
        """Route a request that reached the fleet at `now` and queue it there; False: refused."""
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
        if replica.run is not None:
            self._cut_run(replica, now)
        if self._arrival_s and (replica.run is not None or replica.current is not None):
            self._lengthen_step(replica, self._arrival_s)
        if not replica.busy:
            replica.busy = True
            self._push(now, _WAKE, replica)
        return True

    def _route(self, request: Request, now: float) -> Replica:
        if len(self.replicas) == 1:
            return self.replicas[0]
        if self.policy.config.policy == "least-load":
            return self._least_loaded(request, now)
        return self._route_by_views(request, now)

    def _least_loaded(self, request: Request, now: float) -> Replica:
        """Policy.choose for the least-load policy, without a view per replica per request
        (at fleet scale building them was most of the simulation's time). The same decision
        and the same draw from the rng (tests/plan/test_fast_forward.py): the candidates are
        the replicas not saturated (queue over max_waiting, KV over max_kv_usage; every view
        is fresh, scraped now) or, failing open, all of them; the least loaded win, and a tie
        is broken by rng.choice over them in replica order."""
        replicas = self.replicas
        # A replica's requests are its running and waiting ones: len(requests) is the view's load.
        loads = list(map(len, self._request_dicts))
        low = min(loads)
        # The least loaded level with a replica not saturated (almost always the lowest).
        ties = [r for r, load in zip(replicas, loads) if load == low and not self._saturated(r, now)]
        if ties:
            return self.rng.choice(ties)
        for level in sorted(set(loads))[1:]:
            ties = [r for r, load in zip(replicas, loads) if load == level and not self._saturated(r, now)]
            if ties:
                return self.rng.choice(ties)
        ties = [r for r, load in zip(replicas, loads) if load == low]  # all saturated: fail open
        return self.rng.choice(ties)

    def _saturated(self, replica: Replica, now: float) -> bool:
        """Policy._saturated of the replica's view at `now`."""
        c = self.policy.config
        s = replica.scheduler
        if len(s.waiting) > c.max_waiting:
            return True
        run = replica.run
        if run is not None and (run.used0 + run.peak) / s.kv.pool.num_blocks <= c.max_kv_usage:
            return False  # not even at the run's peak
        return replica.kv_usage(now) > c.max_kv_usage

    def _route_by_views(self, request: Request, now: float) -> Replica:
        prefix = self.policy.config.policy == "prefix"
        views = []
        for r in self.replicas:
            s = r.scheduler
            if prefix and r.run is not None:
                # The hit depends on which cached blocks the run's allocations evicted by now.
                self._apply_run(r, r.run.steps_started(now, settled=False))
            hit = s.kv.get_computed_blocks(request)[1] // s.kv.block_size if prefix else 0
            views.append(ReplicaView(r.name, scraped_at=now, waiting=s.num_waiting, running=s.num_running,
                                     kv_usage=r.kv_usage(now), in_flight=len(s.requests), hit_blocks=hit))
        blocks = (request.num_tokens - 1) // self.replicas[0].scheduler.kv.block_size
        decision = self.policy.choose(views, now, self.rng, prompt_blocks=blocks)
        return self.replicas[int(decision.replica[1:])]

    def _start_step(self, replica: Replica, now: float) -> None:
        if self.fast_forward and self._start_run(replica, now):
            return
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
        replica.step_end, replica.step_seconds = now + seconds, seconds
        self._push(replica.step_end, _STEP_END, (replica, replica.generation))

    def _lengthen_step(self, replica: Replica, extra: float) -> None:
        """The step in progress ends `extra` later: a request arrived during it, and the front's
        work on it shares the cores with the step (Profile.arrival_s). A run was cut at the step
        in progress first, so that step is the run's last."""
        run = replica.run
        if run is not None:
            run.ends[-1] += extra
            run.seconds[-1] += extra
            end = run.ends[-1]
        else:
            replica.step_end += extra
            replica.step_seconds += extra
            end = replica.step_end
        replica.generation += 1
        self._stale += 1
        self._push(end, _STEP_END, (replica, replica.generation))

    def _end_step(self, replica: Replica, now: float) -> list[_Tracked]:
        out = replica.current
        replica.busy_seconds += replica.step_seconds  # at the end, as a run adds its steps: the same sums
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

    # -- fast-forward (see the module docstring) -----------------------------------------
    def _start_run(self, replica: Replica, now: float) -> bool:
        """Start a run if the next steps are steady decode; False: take one step as usual."""
        s = replica.scheduler
        if s.waiting or not s.running or s.num_speculative_tokens or len(s.running) > s.max_num_batched_tokens:
            return False
        if len({r.priority for r in s.running}) > 1:
            return False  # lower priorities are capped and take turns: not every request runs every step
        kv = s.kv
        bs = kv.block_size
        order = list(s.running)  # schedule()'s order: by priority (one here), stable
        length = _MAX_RUN
        counts = [0] * bs
        tokens0, outputs0 = [], []
        for r in order:
            prompt, output = len(r.prompt_token_ids), len(r.output_token_ids)
            t = prompt + output
            tokens0.append(t)
            outputs0.append(output)
            if (r.num_computed_tokens != t - 1 or r.num_computed_tokens < prompt
                    or len(r.block_ids) != -(-(t - 1) // bs)
                    # a block left unkeyed (another held its hash) is retried every step: no run
                    or (kv.enable_caching and r.num_keyed_blocks != (t - 1) // bs)
                    or r.params.stop_token_ids or (r.eos_token_ids and not r.params.ignore_eos)):
                return False
            length = min(length, r.max_tokens - output)  # a run ends at the first request's last token
            counts[(t - 1) % bs] += 1
        # No step of the run may fail to allocate (that would preempt): stop before the pool runs
        # dry. Schedule j allocates counts[-j % bs] blocks, so the first j + 1 schedules allocate
        # (j // bs) * n + period[j % bs] (n = len(order)): whole periods while they fit, then the
        # steps of one more period that still fit.
        free, total, period = kv.num_free_blocks, 0, []
        for i in range(bs):
            total += counts[-i % bs]
            period.append(total)
        full = free // total
        length = min(max(0, length), full * bs + bisect.bisect_right(period, free - full * total))
        if length < _MIN_RUN:
            return False
        replica.run = _Run(order, tokens0, outputs0, now, length, period, kv.pool.num_used_blocks, bs,
                           kv.enable_caching and bs > 1)
        replica.busy = True
        self._price_run(replica)
        return True

    def _price_run(self, replica: Replica) -> None:
        """Price the run's next chunk of steps and post an event at its end."""
        run = replica.run
        done = len(run.ends)
        n = len(run.requests)
        t = run.ends[-1] if run.ends else run.start
        decode = replica.cost.decode_step_seconds
        for j in range(done, min(run.length, max(_FIRST_CHUNK, 2 * done))):
            seconds = decode(n, run.sum_start0 + n * j)
            t = t + seconds  # as a step-by-step end is now + seconds
            run.seconds.append(seconds)
            run.ends.append(t)
        self._push(t, _STEP_END, (replica, replica.generation))

    def _cut_run(self, replica: Replica, now: float) -> None:
        """A request joined the replica's queue at `now`: the run ends with the step in
        progress, so that the next schedule() sees it."""
        run = replica.run
        j = bisect.bisect_left(run.ends, now)  # the first step to end at or after now
        run.length = j + 1
        if len(run.ends) > j + 1:
            del run.ends[j + 1:], run.seconds[j + 1:]
            replica.generation += 1
            self._stale += 1
            self._push(run.ends[j], _STEP_END, (replica, replica.generation))

    def _apply_run(self, replica: Replica, upto: int) -> None:
        """Apply the run's steps before `upto` to its requests and the KV pool: tokens, block
        allocations and prefix keys, step by step in the scheduler's order of requests, as
        schedule() would have made them."""
        run = replica.run
        first = run.applied
        if upto <= first:
            return
        kv = replica.scheduler.kv
        bs, vocab = kv.block_size, self.vocab_size
        # Tokens first (a request's later tokens only let it hash its own blocks early; which
        # blocks get keyed is still bounded by each schedule's own token count).
        for r, o in zip(run.requests, run.outputs0):  # _fake_token_at(r.arrival_order, i, vocab), i = o + first ...
            base = _fake_token_base(r.arrival_order)
            r.output_token_ids.extend([x % vocab for x in range(base + (o + first) * _FAKE_STEP,
                                                                base + (o + upto) * _FAKE_STEP, _FAKE_STEP)])
        keyed = kv.enable_caching and bs > 1
        tokens0 = run.tokens0
        allocate, key, plans = kv.pool.allocate, kv._cache_full_blocks, run.plans
        for j in range(first, upto):
            if not run.retry and (keyed or not kv.enable_caching):
                # What allocate_slots(r, 1) does at step j, without its checks: one block for
                # each request that starts one, and the keys of each that fills one.
                for pos, r, starts, fills in plans[j % bs]:
                    if starts:
                        r.block_ids.append(allocate())
                    if fills:
                        key(r, tokens0[pos] + j)
                        if r.num_keyed_blocks < (tokens0[pos] + j) // bs:
                            run.retry[pos] = r  # its hash is held by another block: retried each step
                continue
            work = run.by_residue[-j % bs]  # requests that need a new block at step j
            if keyed or run.retry:  # and those that fill one (or wait to key one)
                fill = run.by_residue[(-j - 1) % bs] if keyed else []
                if fill or run.retry:
                    work = sorted({**dict(work), **dict(fill), **run.retry}.items(), key=_first)
            for pos, r in work:
                r.num_computed_tokens = tokens0[pos] - 1 + j
                if not kv.allocate_slots(r, 1):
                    raise RuntimeError("a fast-forward run ran out of KV blocks")  # ruled out at its start
                if kv.enable_caching:
                    if r.num_keyed_blocks < (tokens0[pos] + j) // bs:
                        run.retry[pos] = r  # its hash is held by another block: retried each step
                    else:
                        run.retry.pop(pos, None)
        for r, t0 in zip(run.requests, tokens0):
            r.num_computed_tokens = t0 - 2 + upto  # as after update() of step upto - 2
        run.applied = upto

    def _end_run(self, replica: Replica, now: float) -> list[_Tracked]:
        run = replica.run
        k = run.length
        self._apply_run(replica, k)
        ends = run.ends
        scheduler = replica.scheduler
        ended = []
        gaps = [b - a for a, b in zip(ends, ends[1:])]  # every request's ITL after the run's first token
        first_end = ends[0]
        tracked_of = self._tracked
        for r, t0 in zip(run.requests, run.tokens0):  # as update() walks the last step's chunks
            r.num_computed_tokens = t0 - 1 + k
            tracked = tracked_of[r.request_id][0]
            if self.record_itl:
                times = tracked.token_times
                times.append(first_end - tracked.last)
                times.extend(gaps)
            tracked.last = now
            tracked.num_tokens += k
            # Only the last step can finish a request, by its length (a run has no stop or EOS
            # tokens to check): check_stop_token() only where the length is reached.
            if len(r.output_token_ids) >= r.max_tokens:
                status = r.check_stop_token()
                if status is not None:
                    scheduler.finish(r, status)
                    ended.append(tracked_of.pop(r.request_id)[0])
        for seconds in run.seconds:
            replica.busy_seconds += seconds
        replica.num_steps += k
        if self.log_steps:
            for j in range(k):
                self._steps.append({
                    "replica": replica.name,
                    "chunks": [(r.request_id, t0 - 1 + j, 1, False) for r, t0 in zip(run.requests, run.tokens0)],
                    "preempted": [],
                })
        replica.run = None
        self._start_step(replica, now)
        return ended

    def _sample(self, now: float) -> None:
        rs = self.replicas
        self._timeline.append(TimelinePoint(
            now, sum(r.scheduler.num_running for r in rs), sum(r.scheduler.num_waiting for r in rs),
            sum(r.kv_usage(now, settled=True) for r in rs) / len(rs), sum(r.scheduler.num_preemptions for r in rs),
        ))

    def _result(self, done: list[_Tracked]) -> SimResult:
        records = []
        for t in sorted(done, key=lambda x: x.index):
            ok = not t.error and t.num_tokens > 0
            records.append(RequestRecord(
                prompt_len=t.trace.input_len, expected_output_len=t.trace.output_len, start_time=t.sent,
                ttft=(t.first - t.sent + self._egress_s) if ok else 0.0, itl=t.token_times if ok else [],
                latency=(t.last - t.sent + self._egress_s) if ok else 0.0, output_tokens=t.num_tokens if ok else 0,
                error=t.error, success=ok,
            ))
        ok = [r for r in records if r.success]
        duration = (max(r.end_time for r in ok) - min(r.start_time for r in records)) if ok else 0.0
        metrics = compute_metrics(records, duration, goodput_slos=self.goodput_slos)
        return SimResult(records, duration, metrics, self.replicas, self._timeline, self._steps)


def _first(item: tuple) -> int:
    return item[0]


def _fake_token(request: Request, vocab_size: int) -> int:
    return _fake_token_at(request.arrival_order, request.num_output_tokens, vocab_size)


_FAKE_STEP = 40503


def _fake_token_base(arrival_order: int) -> int:
    return arrival_order * 2654435761 + 7


def _fake_token_at(arrival_order: int, index: int, vocab_size: int) -> int:
    # Deterministic in the request and position: a recompute after preemption re-keys the same
    # blocks, as the engine's greedy tokens would. (Integers: _apply_run's form, x % vocab for x
    # stepping by _FAKE_STEP from base + index * step, is the same number.)
    return (_fake_token_base(arrival_order) + index * _FAKE_STEP) % vocab_size
