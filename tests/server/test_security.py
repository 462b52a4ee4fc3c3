"""Security basics: API keys from a file or the environment (a flag shows in ps), compared in
constant time; no prompt or completion text in the logs unless --log-requests; CORS off unless
origins are given; an oversized body is a 413 in OpenAI's error shape."""

from __future__ import annotations

import hmac
import logging

import httpx
import pytest

from tests.server.checks import assert_openai_error
from tests.server.conftest import KEY, MODEL, LiveServer
from tokenmill import cli
from tokenmill.server import guard, run
from tokenmill.server.app import create_app

SECRET = "zebra-secret-4711"


@pytest.fixture
def served_args(monkeypatch):
    """What `tokenmill serve ...` hands the server, without starting one."""
    seen = {}

    def fake_serve(loaders, **kwargs):
        seen.update(kwargs)
        return 0

    monkeypatch.setattr(run, "serve", fake_serve)
    return seen


def test_api_keys_from_environment_and_file(served_args, monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("TOKENMILL_API_KEY", "sk-env-1, sk-env-2")
    key_file = tmp_path / "keys"
    key_file.write_text("sk-file\n")
    with caplog.at_level(logging.INFO, logger="tokenmill"):
        assert cli.main(["serve", "--api-key-file", str(key_file)]) == 0
    assert served_args["api_keys"] == ["sk-env-1", "sk-env-2", "sk-file"]
    assert not any("ps" in r.getMessage() for r in caplog.records)  # nothing to warn about
    assert not any("sk-env" in r.getMessage() or "sk-file" in r.getMessage() for r in caplog.records)


def test_api_key_flag_warns_it_shows_in_ps(served_args, monkeypatch, caplog):
    monkeypatch.delenv("TOKENMILL_API_KEY", raising=False)
    with caplog.at_level(logging.INFO, logger="tokenmill"):
        assert cli.main(["serve", "--api-key", "sk-flag"]) == 0
    assert served_args["api_keys"] == ["sk-flag"]
    assert any("visible to every user in ps" in r.getMessage() for r in caplog.records)


def test_server_flags_reach_the_app(served_args, monkeypatch):
    monkeypatch.delenv("TOKENMILL_API_KEY", raising=False)
    assert cli.main(["serve"]) == 0
    assert served_args["api_keys"] == [] and served_args["allowed_origins"] == []
    assert served_args["log_requests"] is False
    assert cli.main(["serve", "--allowed-origins", "https://a.example,https://b.example",
                     "--allowed-origins", "https://c.example", "--log-requests"]) == 0
    assert served_args["allowed_origins"] == ["https://a.example", "https://b.example", "https://c.example"]
    assert served_args["log_requests"] is True


def test_keys_compared_in_constant_time(server, monkeypatch):
    """Every configured key is compared with hmac.compare_digest, also after one matched:
    neither the time nor the number of comparisons says which key (or how much of one) fits."""
    calls = []
    real = hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(guard.hmac, "compare_digest", spy)
    for key, status in ((KEY, 200), ("sk-wrong", 401), (KEY[:-1], 401), ("sk-other", 200)):
        calls.clear()
        assert server.http(api_key=key).get("/v1/models").status_code == status
        assert len(calls) == 2 and all(a == key.encode() for a, _ in calls), calls


@pytest.mark.parametrize("log_requests", [False, True])
def test_request_text_logged_only_when_asked(engine, caplog, log_requests):
    live = LiveServer(create_app({MODEL: engine}, log_requests=log_requests))
    try:
        with caplog.at_level(logging.DEBUG):
            http = httpx.Client(base_url=live.url, timeout=60)
            plain = http.post("/v1/completions", json={"model": MODEL, "prompt": SECRET, "max_tokens": 8,
                                                      "ignore_eos": True, "temperature": 0})
            stream = http.post("/v1/chat/completions", json={
                "model": MODEL, "messages": [{"role": "user", "content": SECRET}], "max_tokens": 8, "stream": True})
            bad = http.post("/v1/chat/completions", json={
                "model": MODEL, "messages": [{"role": SECRET, "content": SECRET}], "max_tokens": 4})
    finally:
        live.stop()
    assert plain.status_code == 200 and stream.status_code == 200 and bad.status_code == 400
    completion = plain.json()["choices"][0]["text"]
    assert len(completion.strip()) >= 4  # something recognisable to look for
    logged = "\n".join(r.getMessage() for r in caplog.records)
    if log_requests:
        assert SECRET in logged and completion in logged
        assert sum("response" in r.getMessage() for r in caplog.records if r.name == "tokenmill.requests") == 3
    else:
        assert SECRET not in logged and completion not in logged


def test_cors_off_unless_asked(engine):
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}
    closed = LiveServer(create_app({MODEL: engine}, api_keys=[KEY]))
    opened = LiveServer(create_app({MODEL: engine}, api_keys=[KEY], allowed_origins=["https://app.example"]))
    try:
        r = httpx.options(closed.url + "/v1/completions", headers=preflight)
        assert "access-control-allow-origin" not in r.headers
        r = httpx.get(closed.url + "/health", headers={"Origin": "https://app.example"})
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers

        r = httpx.options(opened.url + "/v1/completions", headers=preflight)
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example"
        r = httpx.options(opened.url + "/v1/completions", headers={**preflight, "Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in r.headers
        # CORS lets the browser ask; the key is still required.
        r = httpx.get(opened.url + "/v1/models", headers={"Origin": "https://app.example"})
        assert_openai_error(r, 401)
        r = httpx.get(opened.url + "/v1/models", headers={"Origin": "https://app.example",
                                                           "Authorization": f"Bearer {KEY}"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example"
    finally:
        closed.stop()
        opened.stop()


def test_default_body_limit_is_413_in_openai_shape(engine):
    live = LiveServer(create_app({MODEL: engine}))  # the default limit: 4 MiB
    try:
        body = b'{"model": "tiny", "prompt": "' + b"x" * (5 * 1024 * 1024) + b'"}'
        for path in ("/v1/completions", "/v1/chat/completions", "/v1/anything"):
            r = httpx.post(live.url + path, content=body, headers={"Content-Type": "application/json"}, timeout=60)
            err = assert_openai_error(r, 413)
            assert err["code"] == "body_too_large" and err["type"] == "invalid_request_error"
    finally:
        live.stop()
