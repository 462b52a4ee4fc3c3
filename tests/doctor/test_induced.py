"""Each rule against the real thing: `tokenmill serve`'s app on the default model (in this
process, over real HTTP), driven into one pathology at a time by real clients, watched by the
doctor's own recorder for a few seconds. The doctor must name that pathology first, and a
healthy replica must raise nothing above "info"."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx
import pytest

from tests.model.real import loaded
from tests.server.conftest import LiveServer, make_engine
from tokenmill.doctor.evidence import windows
from tokenmill.doctor.recording import Recording, record
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


def watch(engines: list, load_on: list[int], workers: int, body, seconds: float = 8.0) -> tuple[list, Recording]:
    """Serve each engine, load the chosen ones, record all of them: the findings, ranked, and
    what they were found in."""
    servers = [LiveServer(create_app({MODEL: e})) for e in engines]
    try:
        loads = [Load(servers[i].url, workers, body) for i in load_on]
        # Into the steady state: every client has had an answer. Then a window in which each
        # loaded replica answers at least as many requests as it has clients (a busy box is
        # slower: the window grows rather than judging a handful of steps).
        deadline = time.monotonic() + 120
        while min(load.answered for load in loads) < workers and time.monotonic() < deadline:
            time.sleep(0.2)
        for _ in range(4):
            before = [load.answered for load in loads]
            recording = record([s.url for s in servers], seconds, interval=0.5)
            if all(load.answered - b >= workers for load, b in zip(loads, before)):
                break
            seconds *= 2
        for load in loads:
            load.end()
        assert all(load.answered > 0 and load.failed == 0 for load in loads)
        return diagnose(Evidence(windows(recording))), recording
    finally:
        for s in servers:
            s.stop()
        for e in engines:
            e.shutdown()


def chat_with_shared_system_prompt(i):
    return "/v1/chat/completions", {"model": MODEL, "max_tokens": 8, "temperature": 0, "messages": [
        {"role": "system", "content": "You are a lighthouse museum guide. " + PASSAGE},
        {"role": "user", "content": f"Question {i}: what did the keeper carry?"}]}


def repeat_passage(i):
    return "/v1/completions", {"model": MODEL, "max_tokens": 24, "temperature": 0,
                               "prompt": f"({i}) Repeat exactly: {PASSAGE}\nRepeated: {PASSAGE[:60]}"}


@dataclass(frozen=True)
class Case:
    """A pathology: the replicas' settings, which of them get load, how much and of what, and
    the rule that must come first ("none": nothing above info)."""

    name: str
    replicas: tuple[dict, ...]
    workers: int
    body: Callable
    expected: str
    load_on: tuple[int, ...] = (0,)


CASES = [
    Case("batch cap 2 under concurrency 16", ({"max_num_seqs": 2, "num_kv_blocks": 512},), 16,
         completion("Write a short note about the sea", 16), "batch_cap_too_low"),
    Case("KV pool of 24 blocks under 8 long requests", ({"num_kv_blocks": 24},), 8, completion(PASSAGE, 64),
         "kv_pool_too_small"),
    Case("caching off, shared system prompt", ({"enable_prefix_caching": False, "num_kv_blocks": 512},), 4,
         chat_with_shared_system_prompt, "prefix_cache_off"),
    Case("two replicas, all load on one", ({"num_kv_blocks": 512}, {"num_kv_blocks": 512}), 8,
         completion("Tell me about lighthouses", 16), "uneven_load"),
    Case("ngram speculation kept on at concurrency 16",
         ({"num_kv_blocks": 1024, "speculative_method": "ngram", "speculative_disable_by_batch_size": 64},), 16,
         repeat_passage, "speculation_not_paying"),
    Case("healthy: defaults, concurrency 2", ({"num_kv_blocks": 512},), 2, completion("The capital of France is", 16),
         "none"),
]


def run_case(model, case: Case) -> tuple[list, Recording]:
    return watch([make_engine(model, **r) for r in case.replicas], list(case.load_on), case.workers, case.body)


def top(findings) -> str:
    """The first finding above info, or "none"."""
    return next((f.rule for f in findings if f.severity != "info"), "none")


@pytest.fixture(scope="module")
def model():
    return loaded("auto")


@pytest.mark.parametrize("case", CASES, ids=[c.expected for c in CASES])
def test_the_doctor_names_the_induced_pathology_first(model, case):
    findings, _ = run_case(model, case)
    assert top(findings) == case.expected, findings
    if case.expected == "batch_cap_too_low":
        assert int(findings[0].fix.split()[1]) > 2
    if case.expected == "prefix_cache_off":
        assert findings[0].evidence["share"] >= 0.5  # the system prompt is most of every prompt
