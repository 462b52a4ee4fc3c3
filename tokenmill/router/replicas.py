"""The replica set: who is there, which version each serves, its health and load.

Replicas come from `--replica URL` flags or a file re-read when it changes (one per line:
`URL [version=NAME] [draining]`, `#` comments), so an operator, a Kubernetes EndpointSlice
watcher or Ray can change the fleet at run time. Health is active (GET /health and /metrics
every interval) and passive (a failed proxy attempt marks the replica down at once; the next
good probe brings it back). A replica that leaves takes its prefix index with it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from tokenmill.router.policy import ReplicaView
from tokenmill.router.prefix_index import PrefixIndex
from tokenmill.router.settings import DEFAULT_VERSION

log = logging.getLogger("tokenmill.router")

# Blocks remembered per replica when its KV capacity is unknown: 16k blocks = 256k tokens
# at the default block size, a few MB of hashes.
DEFAULT_INDEX_BLOCKS = 16384


@dataclass(frozen=True)
class ReplicaSpec:
    url: str
    version: str = DEFAULT_VERSION
    draining: bool = False


def parse_replica_line(line: str) -> ReplicaSpec | None:
    """`http://host:port [version=v2] [draining]`; None for blanks and comments."""
    words = line.split("#", 1)[0].split()
    if not words:
        return None
    version, draining = DEFAULT_VERSION, False
    for w in words[1:]:
        if w.startswith("version="):
            version = w.removeprefix("version=")
        elif w == "draining":
            draining = True
        else:
            raise ValueError(f"unknown replica option {w!r} in {line!r}")
    return ReplicaSpec(words[0].rstrip("/"), version, draining)


def parse_replica_flag(text: str) -> ReplicaSpec:
    """--replica URL or --replica URL@VERSION."""
    url, _, version = text.partition("@") if "@" in text.split("//", 1)[-1] else (text, "", "")
    return ReplicaSpec(url.rstrip("/"), version or DEFAULT_VERSION)


@dataclass
class Replica:
    url: str
    version: str = DEFAULT_VERSION
    draining: bool = False  # from the file or the admin API: finish streams, take nothing new
    healthy: bool = False  # until the first good probe (fail-open still tries it if nobody is up)
    server_draining: bool = False  # the replica itself said so (SIGTERM drain: /health 503 "draining")
    scraped_at: float | None = None
    waiting: int = 0
    running: int = 0
    kv_usage: float = 0.0
    in_flight: int = 0
    in_flight_at_scrape: int = 0  # in_flight when waiting/running were read: their excess is others' load
    pending_blocks: int = 0  # predicted uncached blocks of in-flight requests still in prefill
    consecutive_failures: int = 0
    model: str | None = None  # the model it serves (its first, if several)
    block_size: int | None = None
    fingerprint: str | None = None  # of the tokenizer + block size it serves (server/info.py)
    index: PrefixIndex = field(default_factory=lambda: PrefixIndex(DEFAULT_INDEX_BLOCKS))

    def view(self, hit_blocks: int = 0) -> ReplicaView:
        return ReplicaView(self.url, self.healthy, self.draining or self.server_draining, self.scraped_at,
                           self.waiting, self.running, self.kv_usage, self.in_flight, hit_blocks,
                           max(0, self.running + self.waiting - self.in_flight_at_scrape), self.pending_blocks)

    def mark_failed(self, why: str) -> None:
        """Passive: a proxied attempt failed to connect or broke. Down at once; the health loop
        brings it back, and its cache is probably gone (a restart), so the index goes too."""
        if self.healthy:
            log.warning("replica %s marked down: %s", self.url, why)
        self.healthy = False
        self.consecutive_failures += 1
        self.index.clear()


_METRIC = re.compile(r"^(vllm:num_requests_waiting|vllm:num_requests_running|vllm:kv_cache_usage_perc)\{[^}]*\}\s+(\S+)",
                     re.MULTILINE)


def parse_load(metrics_text: str) -> tuple[int, int, float]:
    """(waiting, running, kv usage) from a replica's /metrics, summed over its models (KV: max)."""
    waiting = running = 0
    kv = 0.0
    for name, value in _METRIC.findall(metrics_text):
        v = float(value)
        if name.endswith("waiting"):
            waiting += int(v)
        elif name.endswith("running"):
            running += int(v)
        else:
            kv = max(kv, v)
    return waiting, running, kv


@dataclass
class ReplicaSet:
    replicas: dict[str, Replica] = field(default_factory=dict)

    def __iter__(self):
        return iter(list(self.replicas.values()))

    def __len__(self) -> int:
        return len(self.replicas)

    def get(self, url: str) -> Replica | None:
        return self.replicas.get(url)

    def sync(self, specs: list[ReplicaSpec]) -> None:
        """Make the set these specs: new ones join (unhealthy until probed), gone ones leave
        with their index (streams on them finish: they hold the object), the rest update."""
        wanted = {s.url: s for s in specs}
        for url in list(self.replicas):
            if url not in wanted:
                log.info("replica %s left", url)
                self.replicas.pop(url).index.clear()
        for url, spec in wanted.items():
            r = self.replicas.get(url)
            if r is None:
                log.info("replica %s joined (version %s)", url, spec.version)
                self.replicas[url] = Replica(url, spec.version, spec.draining)
            else:
                r.version, r.draining = spec.version, spec.draining


@dataclass
class ReplicaFile:
    """A replica list file, re-read when its modification time changes."""

    path: Path
    _mtime: float | None = None

    def read_if_changed(self) -> list[ReplicaSpec] | None:
        try:
            mtime = self.path.stat().st_mtime
        except FileNotFoundError:
            return None
        if mtime == self._mtime:
            return None
        self._mtime = mtime
        specs = [parse_replica_line(line) for line in self.path.read_text(encoding="utf-8").splitlines()]
        return [s for s in specs if s is not None]


async def probe(client: aiohttp.ClientSession, r: Replica, now: float, timeout: float) -> None:
    """One active check: /health, then /metrics (load), then /v1/tokenmill/info once."""
    limit = aiohttp.ClientTimeout(total=timeout)
    try:
        async with client.get(r.url + "/health", timeout=limit) as health:
            if health.status != 200:
                r.server_draining = _error_code(await health.read()) == "draining"
                if r.healthy:
                    log.warning("replica %s unhealthy: /health %d", r.url, health.status)
                r.healthy = False
                return
        async with client.get(r.url + "/metrics", timeout=limit) as metrics:
            metrics.raise_for_status()
            text = await metrics.text()
            # Read right after the replica answered: what this router had open when it counted.
            r.in_flight_at_scrape = r.in_flight
            r.waiting, r.running, r.kv_usage = parse_load(text)
        r.scraped_at = now
        if r.fingerprint is None:
            await _read_info(client, r, limit)
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as e:
        if r.healthy:
            log.warning("replica %s unhealthy: %s", r.url, type(e).__name__)
        r.healthy = False
        r.consecutive_failures += 1
        return
    if not r.healthy:
        log.info("replica %s healthy", r.url)
    r.healthy, r.server_draining, r.consecutive_failures = True, False, 0


async def _read_info(client: aiohttp.ClientSession, r: Replica, limit: aiohttp.ClientTimeout) -> None:
    async with client.get(r.url + "/v1/tokenmill/info", timeout=limit) as info:
        if info.status == 404:  # not a tokenmill replica (or an old one): no prediction there
            r.fingerprint = ""
            return
        info.raise_for_status()
        models = json.loads(await info.read())["models"]
    if models:
        m = models[0]
        r.block_size, r.fingerprint = m["block_size"], m["fingerprint"]
        r.model = m["id"]


def _error_code(body: bytes) -> str | None:
    try:
        return json.loads(body)["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return None
