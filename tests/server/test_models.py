"""Several models in one app: routed by the `model` field, listed, health-checked and
measured each under its own name."""

from __future__ import annotations

import dataclasses

import httpx
import pytest

from tests.server.conftest import CHAT_TEMPLATE, LiveServer, make_engine, wait_pool_whole
from tests.server.checks import assert_openai_error, metric
from tokenmill.server.app import attach_engine, create_app

PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def two_engines(tiny_models):
    """Two different tiny models (a Llama and a Qwen2), so answers tell them apart."""
    engines = {}
    for name, arch in (("tiny-llama", "llama"), ("tiny-qwen", "qwen2")):
        loaded = tiny_models(arch)[1]
        loaded = dataclasses.replace(loaded, tokenizer=dataclasses.replace(loaded.tokenizer,
                                                                           chat_template=CHAT_TEMPLATE))
        engines[name] = make_engine(loaded)
    yield engines
    for engine in engines.values():
        wait_pool_whole(engine)
        engine.shutdown()


@pytest.fixture(scope="module")
def two_models(two_engines):
    live = LiveServer(create_app(two_engines))
    yield live
    live.stop()


def _greedy(http: httpx.Client, model: str) -> dict:
    body = {"model": model, "prompt": PROMPT, "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    r = http.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def test_each_model_answers_under_its_own_name(two_models, two_engines):
    http = two_models.http(api_key=None)
    assert [m["id"] for m in http.get("/v1/models").json()["data"]] == ["tiny-llama", "tiny-qwen"]
    assert http.get("/health").status_code == 200
    before = http.get("/metrics").text
    answers = {}
    for name, engine in two_engines.items():
        tokens = engine.stats.generation_tokens_total
        answer = _greedy(http, name)
        assert answer["model"] == name
        assert engine.stats.generation_tokens_total - tokens == 6  # this model's engine ran it
        answers[name] = answer["choices"][0]["text"]
    assert answers["tiny-llama"] != answers["tiny-qwen"]
    chat = http.post("/v1/chat/completions", json={"model": "tiny-qwen", "max_tokens": 2,
                                                   "messages": [{"role": "user", "content": "hi"}]})
    assert chat.status_code == 200 and chat.json()["model"] == "tiny-qwen"

    after = http.get("/metrics").text
    for name in two_engines:
        assert metric(after, "vllm:generation_tokens_total", model_name=name) >= 6
        assert (metric(after, "vllm:e2e_request_latency_seconds_count", model_name=name)
                > metric(before, "vllm:e2e_request_latency_seconds_count", model_name=name))
    # one family per metric, one sample per model (a repeated TYPE line is invalid exposition)
    assert after.count("# TYPE vllm:generation_tokens_total counter") == 1


def test_routing_errors(two_models):
    http = two_models.http(api_key=None)
    err = assert_openai_error(http.post("/v1/completions", json={"model": "nope", "prompt": PROMPT}), 404, "model")
    assert err["code"] == "model_not_found"
    # With several models a request must say which one.
    assert_openai_error(http.post("/v1/completions", json={"prompt": PROMPT}), 400, "model")


def test_one_model_loading(tiny_loaded):
    """A model still loading answers 503 and keeps /health at 503; the other one serves."""
    engine = make_engine(tiny_loaded)
    app = create_app({"ready": engine, "later": None})
    live = LiveServer(app)
    try:
        http = live.http(api_key=None)
        assert_openai_error(http.get("/health"), 503)
        assert_openai_error(http.post("/v1/completions", json={"model": "later", "prompt": PROMPT}), 503)
        assert _greedy(http, "ready")["model"] == "ready"
        cards = {m["id"]: m["max_model_len"] for m in http.get("/v1/models").json()["data"]}
        assert cards == {"ready": 512, "later": None}
        assert http.post("/reset_prefix_cache").status_code == 200  # the loaded one's cache
        attach_engine(app, "later", engine)  # the same engine under a second name is enough here
        assert http.get("/health").status_code == 200
        assert _greedy(http, "later")["model"] == "later"
    finally:
        live.stop()
        wait_pool_whole(engine)
        engine.shutdown()
