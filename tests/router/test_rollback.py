"""A worse canary behind the real `tokenmill router` process is rolled back to 0% by the
automatic plan, by itself, and the admin API and the metrics say so.

The replicas are fakes (tests/router/fake_replica.py) so that "worse" is certain and fast:
a canary that answers every request with a 500, then (a second rollout on the same router)
one whose first byte comes 0.5 s late. What is under test is the router: its proxy, its
outcome bookkeeping, its rollout gate on the health tick, its admin API and metrics, as one
process."""

from __future__ import annotations

import concurrent.futures as cf

import httpx

from tests.router.fake_replica import FakeReplica
from tests.router.polling import until
from tests.server.checks import metric
from tests.server.process import ServeProcess

MIN_SAMPLES = 10


def _request(client: httpx.Client, session: str, stream: bool) -> tuple[int, str, bytes]:
    body = {"model": "m", "prompt": "Hi", "max_tokens": 4, "stream": stream}
    r = client.post("/v1/completions", json=body, headers={"x-session-id": session})
    return r.status_code, r.headers.get("x-tokenmill-version", ""), r.content


def _rollout_until_rolled_back(client: httpx.Client, canary: str, stream: bool) -> list[tuple[int, str, bytes]]:
    # The admin API starts the automatic plan at 50% (a 10% first step would need ~5x the
    # requests for the canary's minimum sample).
    state = client.post("/admin/rollout", json={"canary": canary, "auto": True, "percent": 50}).json()
    assert (state["canary"], state["percent"], state["auto"], state["state"]) == (canary, 50, True, "canary")
    answers, n = [], 0
    with cf.ThreadPoolExecutor(8) as pool:
        while client.get("/admin/rollout").json()["state"] != "rolled-back":
            assert n < 400, "no rollback after 400 requests"
            answers += pool.map(lambda i: _request(client, f"{canary}-s{i}", stream), range(n, n + 8))
            n += 8
    return answers


def _check_rolled_back(client: httpx.Client, canary: str, why: str, rollbacks: int) -> None:
    state = client.get("/admin/rollout").json()
    assert (state["percent"], state["auto"], state["canary"], state["stable"]) == (0, False, canary, "v1")
    last = state["events"][-1]
    assert last["action"] == "rollback" and last["percent"] == 0 and why in last["reason"]
    text = client.get("/metrics").text
    assert metric(text, "tokenmill_router_rollout_events_total", action="rollback") == rollbacks
    assert metric(text, "tokenmill_router_canary_percent", canary=canary, state="rolled-back") == 0
    assert f'tokenmill_router_canary_percent{{canary="{canary}",stable="v1",state="rolled-back"}}' in text


def _check_no_new_canary_traffic(client: httpx.Client, replica: FakeReplica) -> None:
    seen = replica.completions
    for i in range(20):
        status, version, _ = _request(client, f"after-{i}", False)
        assert (status, version) == (200, "v1")
    assert replica.completions == seen
    assert client.get("/admin/rollout").json()["state"] == "rolled-back"  # and it stays so


def test_a_worse_canary_rolls_back_to_zero_by_itself():
    with FakeReplica("ok") as stable, FakeReplica("errors") as failing, FakeReplica("slow", delay=0.5) as slow:
        router = ServeProcess("--replica", f"{stable.url}@v1", "--replica", f"{failing.url}@v2",
                              "--replica", f"{slow.url}@v3", "--stable-version", "v1",
                              "--rollout-min-samples", str(MIN_SAMPLES), "--rollout-min-step-s", "60",
                              "--health-interval", "0.1", command="router", startup_timeout=60)
        try:
            with httpx.Client(base_url=router.url, timeout=30, limits=httpx.Limits(max_connections=16)) as client:
                until(lambda: all(r["healthy"] for r in client.get("/admin/replicas").json()), 10)

                # v2 answers every request with a 500.
                answers = _rollout_until_rolled_back(client, "v2", stream=False)
                # Clients never saw its faults: each 500 was retried on stable before any byte.
                assert [(s, v) for s, v, _ in answers] == [(200, "v1")] * len(answers)
                assert failing.completions >= MIN_SAMPLES
                _check_rolled_back(client, "v2", "error rate", rollbacks=1)
                text = client.get("/metrics").text
                assert metric(text, "tokenmill_router_requests_total", version="v2", outcome="error") >= MIN_SAMPLES
                assert metric(text, "tokenmill_router_retries_total") >= MIN_SAMPLES
                _check_no_new_canary_traffic(client, failing)

                # v3 streams correctly, but its first byte is 0.5 s late: p99 TTFT far over 1.5x stable's.
                answers = _rollout_until_rolled_back(client, "v3", stream=True)
                assert {v for _, v, _ in answers} == {"v1", "v3"}
                assert all(s == 200 and body.rstrip().endswith(b"data: [DONE]") for s, _, body in answers)
                _check_rolled_back(client, "v3", "p99_ttft", rollbacks=2)
                assert metric(client.get("/metrics").text, "tokenmill_router_requests_total", version="v3",
                              outcome="ok") >= MIN_SAMPLES
                _check_no_new_canary_traffic(client, slow)
        finally:
            router.kill()
