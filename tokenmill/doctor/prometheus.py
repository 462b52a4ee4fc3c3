"""A Prometheus server as the doctor's source: the same samples the recorder scrapes, read back
from its query API over a past window (`query_range`), one replica per scraped `instance`.

What it asks for: every tokenmill/vLLM series whose name the rules read, over [end - seconds,
end] at `step`. Counters and histogram buckets come back raw (their growth over the window is
what evidence.py computes), so no PromQL `rate()` is needed and the arithmetic is the same as
for a live recording. Limits are not in Prometheus: give `--url` of one replica to read them, or
the rules that need them stay quiet.
"""

from __future__ import annotations

import time

from tokenmill.doctor.evidence import COUNTERS, HISTOGRAMS
from tokenmill.doctor.recording import Recording, ReplicaRecording, Scrape, limits_of

GAUGES = ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc")


def series_selector(match: str = "") -> str:
    """`match`: extra label matchers, e.g. `job="tokenmill"`."""
    names = list(GAUGES) + [c + "_total" for c in COUNTERS] + [h + "_bucket" for h in HISTOGRAMS.values()]
    extra = f",{match}" if match else ""
    return '{__name__=~"' + "|".join(names) + '"' + extra + "}"


def read_prometheus(base_url: str, seconds: float, step: float = 1.0, end: float | None = None, match: str = "",
                    timeout: float = 30.0) -> Recording:
    """The window [end - seconds, end] (end: now) as a Recording, one replica per instance."""
    import httpx

    end = time.time() if end is None else end
    r = httpx.get(base_url.rstrip("/") + "/api/v1/query_range", timeout=timeout, params={
        "query": series_selector(match), "start": end - seconds, "end": end, "step": step})
    r.raise_for_status()
    body = r.json()
    if body.get("status") != "success":
        raise ValueError(f"Prometheus answered {body.get('status')}: {body.get('error')}")
    by_instance: dict[str, dict[float, dict]] = {}
    for series in body["data"]["result"]:
        labels = dict(series["metric"])
        name = labels.pop("__name__")
        instance = labels.pop("instance", "?")
        labels.pop("job", None)
        key = (name, tuple(sorted(labels.items())))
        times = by_instance.setdefault(instance, {})
        for t, value in series["values"]:
            times.setdefault(float(t), {})[key] = float(value)
    replicas = []
    for instance, times in sorted(by_instance.items()):
        start = min(times)
        replica = ReplicaRecording(f"http://{instance}", [Scrape(t - start, s) for t, s in sorted(times.items())])
        replica.limits = limits_of(replica.url)
        replicas.append(replica)
    return Recording(replicas)

