"""Faults injected into a live server (tiny model, in process): clients that hang up mid-prefill
and mid-decode, one request's sampling failing mid-stream, the engine loop dying. Each ends
with the pool whole, the gauges /metrics serves at zero, and a normal request answered (after
the engine died: once a fresh engine is attached, as a restarted process would have)."""

from __future__ import annotations

import json
import random
import socket
import threading
import time

import httpx
import pytest

from tests.server.checks import assert_openai_error, metric
from tests.server.conftest import MODEL, LiveServer, make_engine, wait_pool_whole
from tests.tiny import VOCAB
from tokenmill.model.sampler import Sampler
from tokenmill.server.app import attach_engine, create_app

POISON_SEED = 4242
GAUGES = ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc")


def poison_sampling(monkeypatch, after_tokens: int) -> None:
    """The sampler raises for the request seeded POISON_SEED once it has `after_tokens` tokens."""
    real = Sampler.__call__

    def sample(self, logits, requests, bitmask=None):
        if any(s.sample.params.seed == POISON_SEED and s.sample.num_output_tokens >= after_tokens for s in requests):
            raise RuntimeError("injected sampling fault")
        return real(self, logits, requests, bitmask)

    monkeypatch.setattr(Sampler, "__call__", sample)


def assert_recovered(live: LiveServer, engine) -> None:
    wait_pool_whole(engine)
    text = httpx.get(live.url + "/metrics").text
    assert [metric(text, g) for g in GAUGES] == [0, 0, 0], text
    r = httpx.post(live.url + "/v1/completions", json={"model": MODEL, "prompt": "hello", "max_tokens": 4}, timeout=30)
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("length", "stop"), r.text
    wait_pool_whole(engine)


@pytest.fixture
def live_engine(tiny_loaded, request):
    config = getattr(request, "param", {})
    engine = make_engine(tiny_loaded, **config)
    live = LiveServer(create_app({MODEL: engine}))
    yield live, engine
    live.stop()
    engine.shutdown()


def raw_post(url: str, path: str, body: dict) -> socket.socket:
    """Send a POST and return the open socket: the test decides when the client hangs up."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    data = json.dumps(body).encode()
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


def sse_events(live: LiveServer, body: dict) -> list:
    """The data events of one streamed completion, JSON-decoded ("[DONE]" kept as is)."""
    r = httpx.post(live.url + "/v1/completions", json={"model": MODEL, "stream": True, **body}, timeout=60)
    assert r.status_code == 200, r.text
    return [line[6:] if line == "data: [DONE]" else json.loads(line[6:])
            for line in r.text.splitlines() if line.startswith("data: ")]


@pytest.mark.parametrize("live_engine", [{"max_num_batched_tokens": 8}], indirect=True)
def test_disconnect_mid_prefill(live_engine):
    live, engine = live_engine
    prompt = [random.Random(1).randrange(2, VOCAB) for _ in range(480)]  # 60 steps of prefill
    before = engine.stats.generation_tokens_total
    sock = raw_post(live.url, "/v1/completions", {"model": MODEL, "prompt": prompt, "max_tokens": 8, "stream": True})
    deadline = time.monotonic() + 20
    while True:  # wait until the prompt is partly computed
        running = list(engine.engine.scheduler.running)
        if running and 0 < running[0].num_computed_tokens < len(prompt) // 2:
            break
        assert time.monotonic() < deadline, "prefill never seen in progress"
        time.sleep(0.001)
    sock.close()
    assert_recovered(live, engine)
    assert engine.stats.generation_tokens_total - before == 4  # only the check request's
    assert engine.stats.prompt_tokens_total < 480  # the cut prompt never counted as processed


def test_disconnect_mid_decode(live_engine):
    live, engine = live_engine
    before = engine.stats.generation_tokens_total
    body = {"model": MODEL, "prompt": "Once upon", "max_tokens": 450, "ignore_eos": True, "stream": True}
    socks = [raw_post(live.url, "/v1/completions", body) for _ in range(4)]
    for sock in socks:
        got = b""
        while got.count(b"data: ") < 3:  # a few tokens streamed
            got += sock.recv(65536)
    assert engine.has_unfinished
    for sock in socks:
        sock.close()
    assert_recovered(live, engine)
    assert engine.stats.generation_tokens_total - before < 4 * 450


@pytest.mark.parametrize("live_engine", [{"num_kv_blocks": 8, "max_num_batched_tokens": 64}], indirect=True)
def test_disconnect_while_preempting(live_engine):
    """A pool of 128 tokens for four 110-token requests: they preempt each other; two clients
    hang up once preemptions happen, the other two get whole answers."""
    live, engine = live_engine
    body = {"model": MODEL, "max_tokens": 90, "ignore_eos": True, "stream": True}
    socks = [raw_post(live.url, "/v1/completions", {**body, "prompt": [10 + i] * 20}) for i in range(4)]
    deadline = time.monotonic() + 20
    while engine.stats.num_preemptions < 2:
        assert time.monotonic() < deadline, "no preemption"
        time.sleep(0.001)
    for sock in socks[:2]:
        sock.close()
    texts = []
    for sock in socks[2:]:
        sock.settimeout(30)
        data = b""
        while b"data: [DONE]" not in data:
            chunk = sock.recv(65536)
            assert chunk, data[-300:]
            data += chunk
        sock.close()
        texts.append(data.decode())
    for text in texts:
        assert '"finish_reason":"length"' in text, text[-500:]
    assert_recovered(live, engine)


def test_sampling_fault_is_an_error_event_in_its_stream_only(live_engine, monkeypatch):
    live, engine = live_engine
    poison_sampling(monkeypatch, after_tokens=3)
    results: dict[str, list] = {}
    bodies = {f"good{i}": {"prompt": f"story {i}", "max_tokens": 60, "ignore_eos": True} for i in range(3)}
    bodies["bad"] = {"prompt": "poisoned", "max_tokens": 60, "ignore_eos": True, "seed": POISON_SEED}
    threads = [threading.Thread(target=lambda k=k, b=b: results.__setitem__(k, sse_events(live, b)))
               for k, b in bodies.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    bad = results.pop("bad")
    assert bad[-1] == "[DONE]"
    error = bad[-2]["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "internal_server_error"
    assert "injected" not in error["message"]
    assert any("choices" in e and e["choices"][0]["text"] for e in bad[:-2])  # it had streamed tokens
    for events in results.values():
        assert events[-1] == "[DONE]"
        assert events[-2]["choices"][0]["finish_reason"] == "length"
        assert not any("error" in e for e in events[:-1])
    assert not engine.dead
    assert_recovered(live, engine)


def test_sampling_fault_before_first_token_is_a_500(live_engine, monkeypatch):
    """Failing before the first token: the response has not started, so it is a plain 500."""
    live, engine = live_engine

    def sample(self, logits, requests, bitmask=None):
        raise RuntimeError("injected sampling fault")

    monkeypatch.setattr(Sampler, "__call__", sample)
    r = httpx.post(live.url + "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 5}, timeout=30)
    err = assert_openai_error(r, 500)
    assert err["code"] == "request_failed" and "injected" not in err["message"]
    assert not engine.dead  # one request alone failing is that request's fault
    monkeypatch.undo()
    assert httpx.get(live.url + "/health").status_code == 200
    assert_recovered(live, engine)


def test_engine_death_ends_streams_and_health_503(live_engine, tiny_loaded):
    live, engine = live_engine
    body = {"model": MODEL, "prompt": "Once upon", "max_tokens": 450, "ignore_eos": True, "stream": True}
    socks = [raw_post(live.url, "/v1/completions", body) for _ in range(3)]
    for sock in socks:
        got = b""
        while got.count(b"data: ") < 2:
            got += sock.recv(65536)

    def die():
        raise RuntimeError("injected engine fault")

    engine.engine.step = die
    for sock in socks:  # each stream ends with an error event, then [DONE]; none hangs
        sock.settimeout(10)
        data = b""
        while b"data: [DONE]" not in data:
            chunk = sock.recv(65536)
            assert chunk, "stream closed without an error event"
            data += chunk
        sock.close()
        error_line = [line for line in data.decode().split("\n") if line.startswith('data: {"error"')]
        assert error_line, data[-300:]
        assert json.loads(error_line[0][6:])["error"]["type"] == "internal_server_error"
    assert engine.dead
    health = httpx.get(live.url + "/health")
    assert assert_openai_error(health, 503)["code"] == "engine_dead"
    for path, payload in (("/v1/completions", {"prompt": "x"}),
                          ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]})):
        r = httpx.post(live.url + path, json={"model": MODEL, "max_tokens": 2, **payload})
        assert assert_openai_error(r, 503)["code"] == "engine_dead"
    wait_pool_whole(engine)  # the dying loop gave every block back, and the gauges say so
    text = httpx.get(live.url + "/metrics").text
    assert [metric(text, g) for g in GAUGES] == [0, 0, 0]
    # What an orchestrator's restart brings: a fresh engine answers.
    fresh = make_engine(tiny_loaded)
    try:
        attach_engine(live.app, MODEL, fresh)
        assert httpx.get(live.url + "/health").status_code == 200
        assert_recovered(live, fresh)
    finally:
        fresh.shutdown()


def test_sampling_fault_mid_generation_non_streaming_is_a_500(live_engine, monkeypatch):
    live, engine = live_engine
    poison_sampling(monkeypatch, after_tokens=3)
    r = httpx.post(live.url + "/v1/completions", timeout=30, json={
        "model": MODEL, "prompt": "x", "max_tokens": 20, "ignore_eos": True, "seed": POISON_SEED})
    err = assert_openai_error(r, 500)
    assert err["code"] == "request_failed" and err["type"] == "internal_server_error"
    assert_recovered(live, engine)
