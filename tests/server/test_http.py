"""Raw HTTP checks: auth, OpenAI-shaped errors, limits, metrics, disconnects, backpressure, drain."""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import pytest

from tests.server.checks import assert_openai_error, metric
from tests.server.conftest import KEY, MODEL, LiveServer, make_engine, wait_pool_whole
from tokenmill.server.app import begin_drain, create_app

PROMPT = "The quick brown fox"


def test_auth(server):
    assert server.http(api_key=None).get("/health").status_code == 200  # open to probes
    for path in ("/v1/models", "/metrics", "/v1/nope"):
        assert_openai_error(server.http(api_key=None).get(path), 401)
        assert_openai_error(server.http(api_key="sk-wrong").get(path), 401)
    r = httpx.get(server.url + "/v1/models", headers={"Authorization": KEY})  # no "Bearer "
    assert_openai_error(r, 401)
    assert server.http(api_key="sk-other").get("/v1/models").status_code == 200  # any listed key
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 2}
    assert_openai_error(server.http(api_key=None).post("/v1/completions", json=body), 401)


@pytest.mark.parametrize(
    "body, param",
    [
        ({"prompt": PROMPT, "temperature": -1}, "temperature"),
        ({"prompt": PROMPT, "top_p": 0}, "top_p"),
        ({"prompt": PROMPT, "top_p": 1.5}, "top_p"),
        ({"prompt": PROMPT, "n": 0}, "n"),
        ({"prompt": PROMPT, "max_tokens": 0}, "max_tokens"),
        ({"prompt": PROMPT, "max_tokens": 600}, "max_tokens"),
        ({"prompt": PROMPT, "logprobs": 21}, "logprobs"),
        ({"prompt": PROMPT, "temperature": "hot"}, "temperature"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"prompt": [[]]}, "prompt[0]"),
        ({"prompt": [1, -5]}, None),
        ({"prompt": [10**30]}, None),
        ({"prompt": PROMPT, "seed": 2**70}, "seed"),
        ({"prompt": PROMPT, "stop": [""]}, "stop[0]"),
        ({}, "prompt"),
    ],
)
def test_completion_bad_params_400(server, body, param):
    r = server.http().post("/v1/completions", json={"model": MODEL, **body} if "model" not in body else body)
    assert_openai_error(r, 400, param)


@pytest.mark.parametrize(
    "body, param",
    [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 10**9}, "max_completion_tokens"),
        ({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 30, "logprobs": True}, "top_logprobs"),
        ({"messages": "hello"}, "messages"),
        ({"messages": [{"role": "user", "content": {"deep": [1]}}]}, None),
    ],
)
def test_chat_bad_params_400(server, body, param):
    assert_openai_error(server.http().post("/v1/chat/completions", json={"model": MODEL, **body}), 400, param)


def test_unknown_model_404_model_not_found(server):
    """As OpenAI answers: 404, code model_not_found (the openai client raises NotFoundError)."""
    for path, body in [("/v1/completions", {"prompt": PROMPT}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})]:
        err = assert_openai_error(server.http().post(path, json={"model": "gpt-4", **body}), 404, "model")
        assert err["code"] == "model_not_found" and err["type"] == "invalid_request_error"
        assert "gpt-4" in err["message"] and MODEL in err["message"]
    r = server.http().post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2})  # no model: the only one
    assert r.status_code == 200 and r.json()["model"] == MODEL


def test_context_error_names_numbers(server):
    r = server.http().post("/v1/completions", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 600})
    message = assert_openai_error(r, 400)["message"]
    assert "512" in message and "600" in message


@pytest.mark.parametrize(
    "raw",
    [b"{not json", b"", b"[1, 2]", b'"x"', b"\xff\xfe\x00", b'{"prompt": "a\x00b", "max_tokens": NaN}',
     b'{"prompt": "x", "temperature": Infinity}', b"[" * 5000 + b"]" * 5000],
)
def test_malformed_bodies_400(server, raw):
    r = server.http().post("/v1/completions", content=raw, headers={"Content-Type": "application/json"})
    assert_openai_error(r, 400)


def test_odd_but_valid_inputs_are_served(server):
    http = server.http()
    for prompt in ["a\x00b", "\ud7ff🙂" * 3, " ", "日本語"]:
        r = http.post("/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 2})
        assert r.status_code == 200, r.text
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 2, "top_k": 10**30,
                                           "seed": -(2**63), "n": 2})
    assert r.status_code == 200, r.text


def test_unknown_route_404_and_method_405(server):
    assert_openai_error(server.http().get("/v1/nothing"), 404)
    assert_openai_error(server.http().get("/v1/completions"), 405)


def test_body_too_large_413(server):
    big = {"model": MODEL, "prompt": "x" * (70 * 1024)}
    assert_openai_error(server.http().post("/v1/completions", json=big), 413)

    def chunked():  # no Content-Length: the limit still holds
        for _ in range(80):
            yield b"x" * 1024

    r = server.http().post("/v1/completions", content=chunked(), headers={"Content-Type": "application/json"})
    assert_openai_error(r, 413)
    ok = server.http().post("/v1/completions", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 2})
    assert ok.status_code == 200


def test_metrics_names_and_counts(server):
    http = server.http()
    before = http.get("/metrics").text
    for name in [
        "vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
        "vllm:gpu_cache_usage_perc", "vllm:num_preemptions_total", "vllm:prompt_tokens_total",
        "vllm:generation_tokens_total", "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total",
    ]:
        assert name in before, name
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 5, "ignore_eos": True})
    assert r.status_code == 200
    after = http.get("/metrics").text
    assert metric(after, "vllm:generation_tokens_total") - metric(before, "vllm:generation_tokens_total") == 5
    assert metric(after, "vllm:prompt_tokens_total") > metric(before, "vllm:prompt_tokens_total")
    assert (metric(after, "vllm:request_success_total", finished_reason="length")
            == metric(before, "vllm:request_success_total", finished_reason="length") + 1)
    for h in ["vllm:time_to_first_token_seconds", "vllm:time_per_output_token_seconds",
              "vllm:e2e_request_latency_seconds", "vllm:request_queue_time_seconds"]:
        assert metric(after, h + "_count") == metric(before, h + "_count") + 1, h
    assert f'model_name="{MODEL}"' in after


def test_streaming_disconnect_aborts(server, engine):
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 400, "ignore_eos": True, "stream": True}
    before = engine.stats.generation_tokens_total
    with server.http() as http:
        with http.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            got = 0
            for line in lines:
                if line.startswith("data: "):
                    got += 1
                if got >= 3:
                    break
            assert engine.has_unfinished  # still generating when we leave
    # leaving the block closed the connection mid-stream
    wait_pool_whole(engine, timeout=5)
    assert engine.stats.generation_tokens_total - before < 400  # stopped early, not run to the end


def test_non_streaming_disconnect_aborts(server, engine):
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 450, "ignore_eos": True}
    before = engine.stats.generation_tokens_total
    # The read timeout must fall well inside the generation: 450 tiny-model tokens take ~0.25 s
    # with the CPU attention kernel, so the client gives up after 50 ms (connecting may take longer).
    with pytest.raises(httpx.ReadTimeout):
        server.http().post("/v1/completions", json=body, timeout=httpx.Timeout(5.0, read=0.05))
    wait_pool_whole(engine, timeout=5)
    assert engine.stats.generation_tokens_total - before < 450  # stopped early, not run to the end


def test_reset_prefix_cache(server):
    r = server.http().post("/reset_prefix_cache")
    assert r.status_code == 200 and "reset" in r.json()


@pytest.fixture
def busy(tiny_loaded):
    """A server whose engine runs one request at a time and queues at most one more."""
    engine = make_engine(tiny_loaded, max_num_seqs=1, max_waiting_requests=1)
    live = LiveServer(create_app({MODEL: engine}))
    yield engine, live
    live.stop()
    wait_pool_whole(engine)
    engine.shutdown()


def test_queue_full_429_with_retry_after(busy):
    engine, live = busy
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 200, "ignore_eos": True}
    results: list[httpx.Response] = []

    def call():
        results.append(httpx.post(live.url + "/v1/completions", json=body, timeout=60))

    threads = [threading.Thread(target=call) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    codes = sorted(r.status_code for r in results)
    assert 200 in codes and 429 in codes, codes
    limited = next(r for r in results if r.status_code == 429)
    assert int(limited.headers["Retry-After"]) >= 1
    assert_openai_error(limited, 429)
    assert set(codes) <= {200, 429}


def _post_in_background(live, engine, body):
    """POST a completion from a thread; return once the engine is working on it."""
    done: list[httpx.Response] = []
    t = threading.Thread(target=lambda: done.append(httpx.post(live.url + "/v1/completions", json=body, timeout=60)))
    t.start()
    deadline = time.monotonic() + 5
    while not engine.has_unfinished and time.monotonic() < deadline:
        time.sleep(0.005)
    return done, t


def test_drain_health_503_and_in_flight_finishes(busy):
    engine, live = busy
    app = live.app
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 120, "ignore_eos": True}
    done, t = _post_in_background(live, engine, body)
    begin_drain(app)
    assert_openai_error(httpx.get(live.url + "/health"), 503)
    assert_openai_error(httpx.post(live.url + "/v1/completions", json=body), 503)
    assert httpx.get(live.url + "/metrics").status_code == 200  # still observable while draining
    t.join()
    assert done[0].status_code == 200
    assert done[0].json()["usage"]["completion_tokens"] == 120


def test_health_503_while_loading():
    live = LiveServer(create_app({MODEL: None}))
    try:
        assert_openai_error(httpx.get(live.url + "/health"), 503)
        body = {"model": MODEL, "prompt": PROMPT}
        assert_openai_error(httpx.post(live.url + "/v1/completions", json=body), 503)
    finally:
        live.stop()


def test_sse_wire_format(server):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True,
            "ignore_eos": True}
    r = server.http().post("/v1/chat/completions", json=body)
    assert r.headers["content-type"].startswith("text/event-stream")
    events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    first = json.loads(events[0])
    assert first["object"] == "chat.completion.chunk"
    assert first["choices"][0]["delta"]["role"] == "assistant"


def test_prefix_cache_reported_in_usage(server):
    http = server.http()
    http.post("/reset_prefix_cache")
    prompt = "Paged attention keeps the KV cache in fixed-size blocks. " * 4  # several full blocks
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 2}
    first = http.post("/v1/completions", json=body).json()["usage"]
    second = http.post("/v1/completions", json=body).json()["usage"]
    assert first["prompt_tokens_details"]["cached_tokens"] == 0
    assert second["prompt_tokens_details"]["cached_tokens"] >= 16


def test_drain_deadline_aborts_and_answers(tiny_loaded):
    """Past the drain deadline the server ends what still runs (finish_reason "abort"), the
    clients still get a whole response, and the server exits."""
    from tokenmill.server.run import DrainingServer

    engine = make_engine(tiny_loaded, max_num_seqs=1)
    app = create_app({MODEL: engine})
    live = LiveServer(app, make_server=lambda config: DrainingServer(config, drain_timeout=0.1))
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 450, "n": 8, "ignore_eos": True}
    done, t = _post_in_background(live, engine, body)
    live.server.handle_exit(signal.SIGTERM, None)
    t.join(30)
    live.thread.join(30)
    assert not live.thread.is_alive()
    assert done[0].status_code == 200
    reasons = {c["finish_reason"] for c in done[0].json()["choices"]}
    assert "abort" in reasons
    wait_pool_whole(engine)
    engine.shutdown()


def test_default_max_tokens_fits_a_small_pool(tiny_loaded):
    """Without max_tokens the completion may use the rest of the context, capped by what
    the KV pool can hold (8 blocks x 16 = 128 tokens here, under the 512-token context)."""
    engine = make_engine(tiny_loaded, num_kv_blocks=8)
    live = LiveServer(create_app({MODEL: engine}))
    try:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "ignore_eos": True}
        r = httpx.post(live.url + "/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        usage = r.json()["usage"]
        assert usage["prompt_tokens"] + usage["completion_tokens"] == 128
    finally:
        live.stop()
        wait_pool_whole(engine)
        engine.shutdown()
