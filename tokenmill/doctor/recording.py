"""A recording: timed scrapes of replicas' /metrics plus their limits (/v1/tokenmill/info),
taken live or loaded from a file saved earlier (`--save`), so a diagnosis can be rerun and
a pathology kept as a test case.

Samples are kept as Prometheus gives them: (metric name, sorted label pairs) -> value, with
counters under their exposed `_total` names and histograms as `_bucket`/`_sum`/`_count`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

Key = tuple[str, tuple[tuple[str, str], ...]]


def parse_exposition(text: str) -> dict[Key, float]:
    samples: dict[Key, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = float(s.value)
    return samples


@dataclass
class Scrape:
    at: float  # seconds, on the recorder's clock
    samples: dict[Key, float]


@dataclass
class ReplicaRecording:
    url: str
    scrapes: list[Scrape] = field(default_factory=list)
    limits: dict[str, dict] = field(default_factory=dict)  # model -> the server's limits
    errors: int = 0  # scrapes that failed (a replica down for part of the window)


@dataclass
class Recording:
    replicas: list[ReplicaRecording]

    @property
    def seconds(self) -> float:
        spans = [r.scrapes[-1].at - r.scrapes[0].at for r in self.replicas if len(r.scrapes) > 1]
        return max(spans, default=0.0)

    def to_json(self) -> str:
        return json.dumps({"replicas": [
            {"url": r.url, "limits": r.limits, "errors": r.errors,
             "scrapes": [{"at": s.at, "samples": [[n, list(map(list, labels)), v] for (n, labels), v in s.samples.items()]}
                         for s in r.scrapes]}
            for r in self.replicas]})

    @classmethod
    def from_json(cls, text: str) -> "Recording":
        doc = json.loads(text)
        return cls([ReplicaRecording(
            r["url"], [Scrape(s["at"], {(n, tuple(tuple(p) for p in labels)): v for n, labels, v in s["samples"]})
                       for s in r["scrapes"]], r.get("limits", {}), r.get("errors", 0))
            for r in doc["replicas"]])


def limits_of(url: str, headers: dict | None = None) -> dict[str, dict]:
    """Per model, the replica's limits from its info route; none when it cannot be read (not a
    tokenmill server, an old one, unreachable): then the rules that need a limit stay quiet."""
    import httpx

    try:
        info = httpx.get(url + "/v1/tokenmill/info", headers=headers or {}, timeout=5).json()
        return {m["id"]: m.get("limits", {}) for m in info.get("models", [])}
    except (httpx.HTTPError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def replicas_of_router(url: str, api_key: str | None = None) -> list[str]:
    """The replicas a `tokenmill router` routes to (its /admin/replicas), to watch each."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    r = httpx.get(url.rstrip("/") + "/admin/replicas", headers=headers, timeout=10)
    r.raise_for_status()
    return [replica["url"] for replica in r.json()]


def record(urls: list[str], seconds: float, interval: float = 1.0, api_key: str | None = None,
           clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> Recording:
    """Scrape every replica each `interval` for `seconds` (at least two scrapes each)."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    replicas = [ReplicaRecording(u.rstrip("/")) for u in urls]
    with httpx.Client(timeout=max(interval, 5.0), headers=headers) as http:
        for r in replicas:
            r.limits = limits_of(r.url, headers)
        start = clock()
        while True:
            for r in replicas:
                try:
                    text = http.get(r.url + "/metrics").text
                    r.scrapes.append(Scrape(clock() - start, parse_exposition(text)))
                except (httpx.HTTPError, ValueError):
                    r.errors += 1
            if clock() - start >= seconds and all(len(r.scrapes) >= 2 for r in replicas):
                return Recording(replicas)
            if clock() - start >= seconds + 10 * interval:
                return Recording(replicas)  # a replica never answered: diagnose what there is
            sleep(interval)
