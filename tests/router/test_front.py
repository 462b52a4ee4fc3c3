"""The router's HTTP front (aiohttp.web) as a client meets it, in the real `tokenmill router`
process: API keys, OpenAI-shaped errors for everything it refuses, the body size limit, and a
stream relayed whole, with its usage counted."""

from __future__ import annotations

import httpx
import pytest

from tests.router.fake_replica import FakeReplica
from tests.router.polling import until
from tests.server.checks import metric
from tests.server.process import ServeProcess

KEY = "sk-front"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def router():
    with FakeReplica("ok") as replica:
        proc = ServeProcess("--replica", replica.url, "--api-key", KEY, "--max-body-bytes", "4096",
                            command="router", startup_timeout=60)
        try:
            with httpx.Client(base_url=proc.url, timeout=30) as client:
                yield client, replica
        finally:
            proc.kill()


def _openai_error(r: httpx.Response, status: int, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"] and error["type"]
    assert error["code"] == code
    return error


@pytest.mark.parametrize("auth", [{}, {"Authorization": "Bearer sk-wrong"}, {"Authorization": f"Basic {KEY}"},
                                  {"Authorization": f"Bearer {KEY}x"}])
def test_every_path_but_health_needs_the_key(router, auth):
    client, _ = router
    assert client.get("/health").status_code == 200
    for method, path in (("POST", "/v1/completions"), ("GET", "/v1/models"), ("GET", "/metrics"),
                         ("GET", "/admin/rollout"), ("GET", "/no/such/path")):
        _openai_error(client.request(method, path, headers=auth, json={}), 401)


def test_refusals_are_openai_errors(router):
    client, replica = router
    seen = replica.completions
    assert _openai_error(client.get("/v1/nope", headers=AUTH), 404)["type"] == "not_found_error"
    _openai_error(client.get("/v1/completions", headers=AUTH), 405)
    _openai_error(client.post("/v1/completions", headers=AUTH, content=b"{not json"), 400)
    _openai_error(client.post("/v1/chat/completions", headers=AUTH, json=["a", "list"]), 400)
    _openai_error(client.post("/v1/completions", headers=AUTH, json={"prompt": "x" * 5000}), 413, "body_too_large")
    _openai_error(client.post("/admin/rollout", headers=AUTH, content=b"[1"), 400)
    _openai_error(client.post("/admin/rollout", headers=AUTH, json={"percent": 50}), 400)  # no canary
    _openai_error(client.post("/admin/replicas/drain", headers=AUTH, json={"url": "http://nowhere:1"}), 404)
    assert replica.completions == seen  # none of them reached the replica


def test_a_stream_is_relayed_whole_and_its_usage_counted(router):
    client, _ = router
    before = metric(client.get("/metrics", headers=AUTH).text, "tokenmill_router_actual_cached_tokens_total")
    for _ in range(3):  # the same keep-alive connection to the replica serves one stream after another
        with client.stream("POST", "/v1/completions", headers=AUTH,
                           json={"model": "m", "prompt": "Hi", "stream": True}) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            body = r.read()
        assert body.count(b'"text": "ok "') == 4 and body.endswith(b"data: [DONE]\n\n")
    text = client.get("/metrics", headers=AUTH).text
    assert metric(text, "tokenmill_router_requests_total", outcome="ok") >= 3
    assert metric(text, "tokenmill_router_prompt_tokens_total") >= 3 * 5  # the usage event was found
    assert metric(text, "tokenmill_router_actual_cached_tokens_total") == before  # the fake caches nothing


def test_a_client_leaving_after_the_last_event_was_served(router):
    """The client has [DONE] and hangs up while the router still reads the replica's body end:
    that request was served (ok), not cancelled by the client."""
    client, replica = router
    counts = {o: metric(client.get("/metrics", headers=AUTH).text, "tokenmill_router_requests_total", outcome=o)
              for o in ("ok", "cancelled")}
    replica.mode = "late_end"
    try:
        # Its own connection, closed when the block ends: the hang-up the router sees.
        with httpx.stream("POST", client.base_url.join("/v1/completions"), headers=AUTH, timeout=30,
                          json={"model": "m", "prompt": "Hi", "stream": True}) as r:
            assert r.read().endswith(b"data: [DONE]\n\n")
        until(lambda: metric(client.get("/metrics", headers=AUTH).text, "tokenmill_router_requests_total",
                             outcome="ok") == counts["ok"] + 1, 10)
        text = client.get("/metrics", headers=AUTH).text
        assert metric(text, "tokenmill_router_requests_total", outcome="cancelled") == counts["cancelled"]
    finally:
        replica.mode = "ok"
