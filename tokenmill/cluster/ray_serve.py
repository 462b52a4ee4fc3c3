"""tokenmill on Ray Serve: one AsyncEngine per replica behind the server's own FastAPI app.

    serve run deploy/ray/serve.yaml                      # or:
    serve run tokenmill.cluster.ray_serve:build_app model=smollm2 num_replicas=2

What Serve gets from tokenmill (docs/deploy.md, "Ray Serve"):
- the ingress: `tokenmill.server.app.create_app` as is (OpenAI routes, /health, /metrics,
  errors, streaming), built inside each replica around that replica's engine;
- `record_autoscaling_stats`: running, waiting, KV usage, TTFT p99 and request rate, which
  `TokenmillAutoscalingPolicy` turns into a replica count with tokenmill.cluster.autoscale
  (the same policy and thresholds as the Kubernetes KEDA trigger);
- `record_routing_stats` + `TokenmillRequestRouter`: the router's filter, imbalance guard and
  score (tokenmill.router.policy) over those stats and the router's own in-flight counts.
  The prefix-hit term is zero here: Serve's router sees an opaque request, not its tokens.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import time
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ray import serve
from ray.serve.request_router import (
    FIFOMixin,
    PendingRequest,
    ReplicaID,
    RequestRouter,
    RunningReplica,
)

from tokenmill.cluster.autoscale import AutoscaleConfig, Autoscaler, ReplicaSnapshot
from tokenmill.config import DEFAULT_MODEL, EngineConfig
from tokenmill.router.policy import Policy, PolicyConfig, ReplicaView

# The policy runs inside Serve's controller: its records go to Serve's logger, so they land in
# the controller's log beside Serve's own scaling lines.
log = logging.getLogger("ray.serve")

# Serve's default (5) would cap a replica's batch at 5 requests; the engine batches far more,
# and what it cannot run yet waits in its own queue, which the policy reads as `waiting`.
DEFAULT_MAX_ONGOING = 64
STATS_PERIOD_S = 1.0  # how often replicas report routing stats (Serve's default is 10 s)
STAT_KEYS = ("running", "waiting", "kv_usage", "ttft_p99_s", "request_rate")


def histogram_quantile(bounds: list[float], counts: list[float], q: float) -> float | None:
    """The q-quantile of observations binned by cumulative upper `bounds` (Prometheus `le`,
    the last +inf) with cumulative `counts`: linear inside the bucket, as PromQL's
    histogram_quantile. None when there is no observation."""
    total = counts[-1] if counts else 0
    if total <= 0:
        return None
    rank = q * total
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in zip(bounds, counts):
        if count >= rank:
            if math.isinf(bound):  # past the last finite bucket: its bound is the best guess
                return lower_bound
            span = count - lower_count
            return lower_bound + (bound - lower_bound) * ((rank - lower_count) / span if span else 1.0)
        lower_bound, lower_count = bound, count
    return lower_bound


@dataclass
class LoadReporter:
    """A replica's load for the autoscaler: gauges from the engine, and TTFT p99 and request rate
    over the window since the last report, from the server's own Prometheus registry (so Serve
    sees exactly what /metrics says)."""

    registry: Any  # prometheus_client CollectorRegistry of the replica's app
    last_time: float | None = None
    last_ttft: list[float] = field(default_factory=list)
    last_finished: float = 0.0

    def report(self, stats, now: float) -> dict[str, float]:
        bounds, counts, finished = self._read()
        window = [c - p for c, p in zip(counts, self.last_ttft)] if self.last_ttft else counts
        elapsed = now - self.last_time if self.last_time is not None else None
        rate = (finished - self.last_finished) / elapsed if elapsed else 0.0
        self.last_time, self.last_ttft, self.last_finished = now, counts, finished
        out = {"running": float(stats.num_running), "waiting": float(stats.num_waiting),
               "kv_usage": float(stats.kv_usage), "request_rate": max(0.0, rate)}
        p99 = histogram_quantile(bounds, window, 0.99)
        if p99 is not None:  # Serve takes numbers only: no key means "no request in the window"
            out["ttft_p99_s"] = p99
        return out

    def _read(self) -> tuple[list[float], list[float], float]:
        bounds, counts, finished = [], [], 0.0
        for metric in self.registry.collect():
            for s in metric.samples:
                if s.name == "vllm:time_to_first_token_seconds_bucket":
                    bounds.append(float(s.labels["le"]))
                    counts.append(s.value)
                elif s.name == "vllm:request_success_total":
                    finished += s.value
        return bounds, counts, finished


def snapshot(stats: Mapping[str, float]) -> ReplicaSnapshot:
    return ReplicaSnapshot(running=int(stats.get("running", 0)), waiting=int(stats.get("waiting", 0)),
                           kv_usage=float(stats.get("kv_usage", 0.0)), ttft_p99_s=stats.get("ttft_p99_s"),
                           request_rate=float(stats.get("request_rate", 0.0)))


@serve.deployment
@serve.ingress()
class TokenmillDeployment:
    """One replica: an AsyncEngine and the tokenmill server app around it."""

    def __init__(self, served_model_name: str, engine: dict):
        from tokenmill.build import build_async_engine
        from tokenmill.server.app import create_app

        self.name = served_model_name
        self.engine = build_async_engine(EngineConfig.from_flat(**engine))
        self.engine.start()
        self.server_app = create_app({served_model_name: self.engine})
        self.reporter = LoadReporter(self.server_app.state.models.metrics.registry)

    def __serve_build_asgi_app__(self):
        return self.server_app

    def record_autoscaling_stats(self) -> dict[str, float]:
        return self.reporter.report(self.engine.stats, time.monotonic())

    def record_routing_stats(self) -> dict[str, float]:
        s = self.engine.stats
        return {"running": s.num_running, "waiting": s.num_waiting, "kv_usage": s.kv_usage}

    def check_health(self) -> None:
        # Serve restarts a replica whose check raises: an engine whose loop died serves nothing.
        if self.engine.dead:
            raise RuntimeError("the engine loop has died")

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()


class TokenmillAutoscalingPolicy:
    """Serve's custom autoscaling policy (a class, so Serve keeps one instance and its delay
    timers across ticks): the replicas' own stats through tokenmill.cluster.autoscale.

    Requests Serve holds in front of the replicas (`total_queued_requests`: handle and proxy
    queues) count as `pending`: demand the replicas cannot see yet."""

    def __init__(self, **config):
        self.scaler = Autoscaler(AutoscaleConfig(**config))

    def __call__(self, ctx) -> tuple[int, dict]:
        metrics = ctx.aggregated_metrics or {}
        per_replica: dict[Any, dict[str, float]] = {}
        for key in STAT_KEYS:
            for replica, value in metrics.get(key, {}).items():
                per_replica.setdefault(replica, {})[key] = value
        queued = ctx.total_queued_requests or 0.0
        now = ctx.current_time if ctx.current_time is not None else time.time()
        # `current` is Serve's target, not its running count: a replica still starting is
        # capacity on the way, and answering "hold" with the running count would tell Serve
        # to stop the replica it is starting (it did: 1 -> 2 -> 1 every few seconds).
        current = ctx.target_num_replicas
        decision = self.scaler.decide(now, current, [snapshot(s) for s in per_replica.values()],
                                      pending=round(queued))
        desired = min(max(decision.desired, ctx.capacity_adjusted_min_replicas), ctx.capacity_adjusted_max_replicas)
        if decision.changed:
            log.info("autoscale %s: %s", ctx.deployment_name, decision.reason)
        return desired, {**ctx.policy_state, "last_reason": decision.reason}


class TokenmillRequestRouter(FIFOMixin, RequestRouter):
    """tokenmill's routing decision inside Serve: the replicas' reported queue and KV usage plus
    this router's exact in-flight counts, through tokenmill.router.policy (filter, fail open,
    imbalance guard, score). Serve asks for ranks: the pick first, then the rest by load, so a
    replica that refuses (at max_ongoing_requests) falls through to the next best."""

    def initialize_state(self, policy: str = "prefix", **config):
        self.policy = Policy(PolicyConfig(policy=policy, **config))
        self.rng = random.Random()
        self.in_flight: dict[ReplicaID, int] = {}

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        now = time.monotonic()
        views = {self._view(r, now): r for r in candidate_replicas}
        decision = self.policy.choose(list(views), now, self.rng)
        if decision is None:
            return []
        by_name = {v.name: r for v, r in views.items()}
        first = by_name[decision.replica]
        rest = sorted((v for v in views if v.name != decision.replica), key=lambda v: v.load)
        return [[first], *[[views[v]] for v in rest]]

    def _view(self, replica: RunningReplica, now: float) -> ReplicaView:
        stats = replica.routing_stats or {}
        # Serve refreshes routing stats every STATS_PERIOD_S; no stats yet counts as stale,
        # which the policy's soft filter (and its fail-open) already handles.
        waiting, running = int(stats.get("waiting", 0)), int(stats.get("running", 0))
        in_flight = self.in_flight.get(replica.replica_id, 0)
        return ReplicaView(
            name=replica.replica_id.unique_id, healthy=True, draining=False,
            scraped_at=now if stats else None, waiting=waiting, running=running,
            kv_usage=float(stats.get("kv_usage", 0.0)), in_flight=in_flight,
            # Serve's stats carry no in-flight count at their sampling: the whole excess over
            # this router's own count is taken as other handles' requests (load = the larger).
            external=max(0, waiting + running - in_flight),
        )

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result) -> None:
        self.in_flight[replica_id] = self.in_flight.get(replica_id, 0) + 1

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        if self.in_flight.get(replica_id, 0) > 0:
            self.in_flight[replica_id] -= 1

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self.in_flight.pop(replica_id, None)


@dataclass
class RayServeSettings:
    """What `build_app` takes (serve.yaml `args:` or `serve run ... key=value`)."""

    served_model_name: str | None = None
    engine: dict = field(default_factory=dict)  # EngineConfig settings by name (model, num_threads, ...)
    num_replicas: int = 1  # ignored when `autoscaling` is given
    autoscaling: dict | None = None  # AutoscaleConfig fields; min/max_replicas also bound Serve
    max_ongoing_requests: int = DEFAULT_MAX_ONGOING
    num_cpus: float = 1.0  # per replica (Ray resource); the engine's torch threads follow it
    num_gpus: float = 0.0
    router: dict | None = None  # PolicyConfig fields for TokenmillRequestRouter; None: Serve's own router
    # Serve lets a stopping replica finish its requests this long (the server's --drain-timeout).
    graceful_shutdown_timeout_s: float = 30.0

    @classmethod
    def from_args(cls, args: Mapping[str, Any]) -> RayServeSettings:
        """Nested (YAML) or flat (`serve run` key=value strings: `model=`, `num_threads=`,
        any other EngineConfig setting goes to `engine`)."""
        names = {f.name for f in dataclasses.fields(cls)}
        engine_names = set(EngineConfig.settings())
        out: dict[str, Any] = {"engine": dict(args.get("engine") or {})}
        for key, value in args.items():
            if key == "engine":
                continue
            if key in names:
                out[key] = value
            elif key in engine_names:
                out["engine"][key] = value
            else:
                raise ValueError(f"unknown setting {key!r}")
        s = cls(**out)
        s.num_replicas, s.max_ongoing_requests = int(s.num_replicas), int(s.max_ongoing_requests)
        s.num_cpus, s.num_gpus = float(s.num_cpus), float(s.num_gpus)
        s.engine = _typed_engine_settings(s.engine)
        s.engine.setdefault("num_threads", max(1, int(s.num_cpus)))
        return s

    @property
    def model_name(self) -> str:
        return self.served_model_name or str(self.engine.get("model", DEFAULT_MODEL))

    def deployment_options(self) -> dict:
        opts: dict[str, Any] = {
            "name": "tokenmill",
            "max_ongoing_requests": self.max_ongoing_requests,
            "ray_actor_options": {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus},
            "health_check_period_s": 5,
            "graceful_shutdown_timeout_s": float(self.graceful_shutdown_timeout_s),
            "request_router_config": {"request_routing_stats_period_s": STATS_PERIOD_S},
        }
        if self.router is not None:
            opts["request_router_config"] |= {"request_router_class": TokenmillRequestRouter,
                                              "request_router_kwargs": dict(self.router)}
        if self.autoscaling is not None:
            policy = AutoscaleConfig(**self.autoscaling)  # validated here, in the driver
            opts["autoscaling_config"] = {
                "min_replicas": policy.min_replicas, "max_replicas": policy.max_replicas,
                "initial_replicas": max(1, policy.min_replicas),
                "metrics_interval_s": STATS_PERIOD_S, "look_back_period_s": 2 * STATS_PERIOD_S,
                # the policy applies its own delays; Serve's would add to them
                "upscale_delay_s": 0, "downscale_delay_s": 0,
                "policy": {"policy_function": TokenmillAutoscalingPolicy,
                           "policy_kwargs": dataclasses.asdict(policy)},
            }
        else:
            opts["num_replicas"] = self.num_replicas
        return opts


def _typed_engine_settings(settings: dict) -> dict:
    """`serve run` passes strings: convert each by its EngineConfig field's type."""
    known = EngineConfig.settings()
    out = {}
    for key, value in settings.items():
        if key not in known:
            raise ValueError(f"unknown engine setting {key!r}")
        if isinstance(value, str):
            hint = typing.get_type_hints(EngineConfig.groups()[known[key][0]])[key]
            base = next((t for t in typing.get_args(hint) if t is not type(None)), hint)
            if base is bool:
                value = value.lower() in ("1", "true", "yes")
            elif base in (int, float):
                value = base(value)
        out[key] = value
    return out


def build_app(args: Mapping[str, Any] | None = None):
    """The Serve application (an import path for `serve run` / `serve deploy`)."""
    s = RayServeSettings.from_args(args or {})
    return TokenmillDeployment.options(**s.deployment_options()).bind(s.model_name, s.engine)
