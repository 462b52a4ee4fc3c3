"""Signals to a real `tokenmill serve` process under load: SIGTERM drains (in-flight streams
finish within --drain-timeout, new requests and /health get 503, exit status 0); SIGKILL then a
restart on the same port comes back healthy."""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import pytest

from tests.server.checks import assert_openai_error, metric
from tests.server.process import ServeProcess, write_tiny_checkpoint

# Long enough that the streams outlast the checks made while draining, on a fast box too (a
# 2-core EPYC ran 120 tokens in under 0.2 s); the tiny model holds 512 positions.
MAX_TOKENS = 400
DRAIN_TIMEOUT = 60  # generous: a loaded 2-core CI box runs the tiny model at ~50 tokens/s
GAUGES = ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-llama"))


def _stream(url: str, i: int, started: threading.Semaphore, results: dict) -> None:
    body = {"model": "tiny", "prompt": f"request {i}", "max_tokens": MAX_TOKENS, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    events = []
    try:
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    if not events:
                        started.release()
                    events.append(line[6:])
        results[i] = events
    except httpx.TransportError as e:
        started.release()
        results[i] = e


def _start_streams(url: str, n: int) -> tuple[list[threading.Thread], dict]:
    started = threading.Semaphore(0)
    results: dict = {}
    threads = [threading.Thread(target=_stream, args=(url, i, started, results)) for i in range(n)]
    for t in threads:
        t.start()
    for _ in range(n):
        assert started.acquire(timeout=60), "a stream never started"
    return threads, results


def test_sigterm_under_load_drains_and_exits_0(tiny_dir):
    server = ServeProcess("--model", str(tiny_dir), "--served-model-name", "tiny", "--drain-timeout", str(DRAIN_TIMEOUT))
    try:
        threads, results = _start_streams(server.url, 8)
        t0 = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        health = httpx.get(server.url + "/health")
        while health.status_code == 200 and time.monotonic() - t0 < 5:  # until the signal is handled
            time.sleep(0.01)
            health = httpx.get(server.url + "/health")
        assert assert_openai_error(health, 503)["code"] == "draining"
        refused = httpx.post(server.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2})
        assert assert_openai_error(refused, 503)["code"] == "draining"
        for t in threads:
            t.join(DRAIN_TIMEOUT)
        assert server.proc.wait(DRAIN_TIMEOUT) == 0
        assert time.monotonic() - t0 < DRAIN_TIMEOUT
        for i, events in results.items():
            assert isinstance(events, list), (i, events)
            assert events[-1] == "[DONE]"
            usage = json.loads(events[-2])["usage"]
            assert usage["completion_tokens"] == MAX_TOKENS, (i, usage)  # finished, not cut off
            finals = [json.loads(e)["choices"][0]["finish_reason"] for e in events[:-2] if json.loads(e)["choices"]]
            assert finals[-1] == "length"
    finally:
        server.kill()


def test_sigkill_then_restart_comes_back_healthy(tiny_dir):
    args = ("--model", str(tiny_dir), "--served-model-name", "tiny")
    server = ServeProcess(*args)
    port = server.port
    try:
        threads, results = _start_streams(server.url, 4)
        server.proc.send_signal(signal.SIGKILL)
        assert server.proc.wait(10) == -signal.SIGKILL
        for t in threads:
            t.join(30)
            assert not t.is_alive()  # the clients see the connection end, none hangs
    finally:
        server.kill()
    restarted = ServeProcess(*args, port=port)  # the same address, as an orchestrator restarts it
    try:
        assert httpx.get(restarted.url + "/health").json() == {"status": "ok"}
        r = httpx.post(restarted.url + "/v1/completions", json={"prompt": "hello", "max_tokens": 4}, timeout=30)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
        text = httpx.get(restarted.url + "/metrics").text
        assert [metric(text, g) for g in GAUGES] == [0, 0, 0]
        assert restarted.terminate(30) == 0
    finally:
        restarted.kill()
