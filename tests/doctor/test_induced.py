"""Each rule against the real thing: `tokenmill serve`'s app on the default model (in this
process, over real HTTP), driven into one pathology at a time by real clients, watched by the
doctor's own recorder for a few seconds. The doctor must name that pathology first, and a
healthy replica must raise nothing above "info"."""

from __future__ import annotations

import itertools
import threading
import time

import httpx
import pytest

from tests.model.real import loaded
from tests.server.conftest import LiveServer, make_engine
from tokenmill.doctor.evidence import windows
from tokenmill.doctor.recording import record
from tokenmill.doctor.rules import Evidence, diagnose
from tokenmill.server.app import create_app

pytestmark = pytest.mark.slow

MODEL = "smollm2"
PASSAGE = ("The old lighthouse keeper climbed the spiral stairs every evening at dusk, carrying a brass lantern "
           "and a thermos of black coffee. From the gallery he watched the fishing boats return, counted them one "
           "by one, and wrote their names in a leather logbook that had belonged to his grandfather.")


class Load:
    """`workers` clients, each sending its next request as soon as the last one is answered."""

    def __init__(self, url: str, workers: int, body):
        self.stop = threading.Event()
        self.answered = 0
        self.failed = 0
        self._counter = itertools.count()
        self._threads = [threading.Thread(target=self._work, args=(url, body), daemon=True) for _ in range(workers)]
        for t in self._threads:
            t.start()

    def _work(self, url: str, body) -> None:
        with httpx.Client(base_url=url, timeout=120) as http:
            while not self.stop.is_set():
                path, payload = body(next(self._counter))
                r = http.post(path, json=payload)
                if r.status_code == 200:
                    self.answered += 1
                else:
                    self.failed += 1

    def end(self) -> None:
        self.stop.set()
        for t in self._threads:
            t.join(180)


def completion(prompt: str, max_tokens: int):
    return lambda i: ("/v1/completions", {"model": MODEL, "prompt": f"{prompt} ({i})", "max_tokens": max_tokens,
                                          "ignore_eos": True, "temperature": 0})


def watch(engines: list, load_on: list[int], workers: int, body, seconds: float = 8.0):
    """Serve each engine, load the chosen ones, record all of them; the findings, ranked."""
    servers = [LiveServer(create_app({MODEL: e})) for e in engines]
    try:
        loads = [Load(servers[i].url, workers, body) for i in load_on]
        time.sleep(3.0)  # past the start, into the steady state
        recording = record([s.url for s in servers], seconds, interval=0.5)
        for load in loads:
            load.end()
        assert all(load.answered > 0 and load.failed == 0 for load in loads)
        return diagnose(Evidence(windows(recording)))
    finally:
        for s in servers:
            s.stop()
        for e in engines:
            e.shutdown()


@pytest.fixture(scope="module")
def model():
    return loaded("auto")


def top(findings) -> str:
    return findings[0].rule if findings else "none"


def test_batch_cap_too_low(model):
    findings = watch([make_engine(model, max_num_seqs=2, num_kv_blocks=512)], [0], 16,
                     completion("Write a short note about the sea", 16))
    assert top(findings) == "batch_cap_too_low", findings
    assert findings[0].fix.startswith("--max-num-seqs ") and int(findings[0].fix.split()[1]) > 2


def test_kv_pool_too_small(model):
    findings = watch([make_engine(model, num_kv_blocks=24)], [0], 8, completion(PASSAGE, 64))
    assert top(findings) == "kv_pool_too_small", findings
    assert findings[0].evidence["preemptions"] > 0 or findings[0].evidence["share_starved"] >= 0.5


def test_prefix_cache_off_with_a_shared_system_prompt(model):
    def chat(i):
        return "/v1/chat/completions", {"model": MODEL, "max_tokens": 8, "temperature": 0, "messages": [
            {"role": "system", "content": "You are a lighthouse museum guide. " + PASSAGE},
            {"role": "user", "content": f"Question {i}: what did the keeper carry?"}]}

    findings = watch([make_engine(model, enable_prefix_caching=False, num_kv_blocks=512)], [0], 4, chat)
    assert top(findings) == "prefix_cache_off", findings
    assert findings[0].evidence["share"] >= 0.5  # the system prompt is most of every prompt


def test_uneven_load_across_two_replicas(model):
    engines = [make_engine(model, num_kv_blocks=512), make_engine(model, num_kv_blocks=512)]
    findings = watch(engines, [0], 8, completion("Tell me about lighthouses", 16))
    assert top(findings) == "uneven_load", findings


def test_speculation_at_high_concurrency(model):
    def repeat(i):
        return "/v1/completions", {"model": MODEL, "max_tokens": 48, "temperature": 0,
                                   "prompt": f"({i}) Repeat exactly: {PASSAGE}\nRepeated: {PASSAGE[:60]}"}

    engine = make_engine(model, num_kv_blocks=1024, speculative_method="ngram", speculative_disable_by_batch_size=64)
    findings = watch([engine], [0], 16, repeat)
    assert top(findings) == "speculation_not_paying", findings


def test_healthy_replica_raises_nothing_above_info(model):
    findings = watch([make_engine(model, num_kv_blocks=512)], [0], 2, completion("The capital of France is", 16))
    assert all(f.severity == "info" for f in findings), findings
