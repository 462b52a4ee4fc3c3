"""The router in front of real `tokenmill serve` replicas of the default model: streams pass
through chunk by chunk, the prefix prediction matches the replicas' own cached_tokens,
draining and a changing replica file are obeyed, and a replica killed with SIGKILL under
load fails no request that had not started streaming, is evicted, and rejoins when back."""

from __future__ import annotations

import concurrent.futures as cf
import json
import time

import httpx
import pytest

from tests.router.polling import until
from tests.server.checks import metric
from tests.server.process import ServeProcess

pytestmark = pytest.mark.slow

# One thread each and a small KV pool: they start faster and leave the CPU to each other.
REPLICA_ARGS = ("--num-threads", "1", "--kv-cache-memory", "64MiB")
SYSTEM = ("You are a helpful assistant. Answer clearly and concisely, and say so when you are not sure. "
          "Never invent facts; when a question is ambiguous, ask which meaning the user intended.")


def _router(*args: str) -> ServeProcess:
    return ServeProcess(*args, "--health-interval", "0.3", command="router", startup_timeout=60)


@pytest.fixture(scope="module")
def fleet():
    replicas = [ServeProcess(*REPLICA_ARGS, wait=False) for _ in range(2)]
    router = None
    try:
        for r in replicas:
            r.wait_healthy(300)
        router = _router(*[a for r in replicas for a in ("--replica", r.url)])
        until(lambda: all(r["tokenizer"] for r in _replicas(router)), 30)
        yield router, replicas
    finally:
        for p in [router, *replicas]:
            if p is not None:
                p.kill()


def _replicas(router: ServeProcess) -> list[dict]:
    return httpx.get(router.url + "/admin/replicas", timeout=5).json()


def _metric(router: ServeProcess, name: str, **labels) -> float:
    return metric(httpx.get(router.url + "/metrics", timeout=5).text, name, **labels)


def _chat(user: str, **kw) -> dict:
    return {"model": "smollm2", "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}],
            "temperature": 0, **kw}


def test_streams_pass_through_chunk_by_chunk(fleet):
    router, replicas = fleet
    # 64 tokens: at ~8 ms a token a replica's events can share a read, so 24 gave only 10 reads
    body = _chat("Name three colors.", max_tokens=64, ignore_eos=True)
    direct = httpx.post(replicas[0].url + "/v1/chat/completions", json=body, timeout=120).json()
    arrivals, raw = [], b""
    with httpx.stream("POST", router.url + "/v1/chat/completions", json=body | {"stream": True}, timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for chunk in r.iter_raw():
            arrivals.append(time.monotonic())
            raw += chunk
    events = [json.loads(line[6:]) for line in raw.decode().splitlines() if line.startswith("data: {")]
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])
    assert text == direct["choices"][0]["message"]["content"]  # greedy: the same text, unchanged
    assert raw.rstrip().endswith(b"data: [DONE]")
    # Not buffered: the tokens came in many reads spread over the generation.
    assert len(arrivals) >= 12 and arrivals[-1] - arrivals[0] > 0.1


def test_a_client_leaving_mid_stream_aborts_the_replica_request(fleet):
    router, replicas = fleet
    body = {"model": "smollm2", "prompt": "Tell me a long story.", "max_tokens": 400, "ignore_eos": True,
            "stream": True}
    cancelled = _metric(router, "tokenmill_router_requests_total", outcome="cancelled")
    with httpx.stream("POST", router.url + "/v1/completions", json=body, timeout=60) as r:
        chunks = r.iter_raw()
        next(chunks), next(chunks)  # it is streaming; now leave
    until(lambda: _metric(router, "tokenmill_router_requests_total", outcome="cancelled") == cancelled + 1, 10)
    # The replica stopped generating (its request was aborted), not ran on to 400 tokens.
    until(lambda: sum(metric(httpx.get(u.url + "/metrics").text, "vllm:num_requests_running")
                       for u in replicas) == 0, 10)
    assert _metric(router, "tokenmill_router_requests_total", outcome="error") == 0


def test_predicted_cached_tokens_match_the_replicas(fleet):
    router, _ = fleet
    before = _metric(router, "tokenmill_router_actual_cached_tokens_total")
    for q in ("What is the capital of France?", "What is the capital of Spain?", "What is 2 + 2?"):
        r = httpx.post(router.url + "/v1/chat/completions", json=_chat(q, max_tokens=4), timeout=120)
        assert r.status_code == 200
    predicted = _metric(router, "tokenmill_router_predicted_cached_tokens_total")
    actual = _metric(router, "tokenmill_router_actual_cached_tokens_total")
    # The system prompt's blocks: the 2nd and 3rd requests follow them to the replica holding them.
    assert actual - before >= 2 * 48
    assert predicted == actual  # the engine's own hashes: exact while nothing is evicted
    # Prefill work queued is counted while requests are open, and all of it settled after.
    assert all(r["pending_blocks"] == 0 and r["in_flight"] == 0 for r in _replicas(router))


def test_draining_replica_gets_nothing_new(fleet):
    router, replicas = fleet
    drained = replicas[0].url
    assert httpx.post(router.url + "/admin/replicas/drain", json={"url": drained}).json()["draining"]
    try:
        before = _metric(router, "tokenmill_router_requests_total", replica=drained)
        for i in range(6):
            body = {"model": "smollm2", "prompt": f"Count to {i}:", "max_tokens": 2}
            assert httpx.post(router.url + "/v1/completions", json=body, timeout=60).status_code == 200
        assert _metric(router, "tokenmill_router_requests_total", replica=drained) == before
    finally:
        httpx.post(router.url + "/admin/replicas/drain", json={"url": drained, "draining": False})


def test_replica_file_changes_at_run_time(fleet, tmp_path):
    _, replicas = fleet
    path = tmp_path / "replicas.txt"
    path.write_text(f"# the fleet\n{replicas[0].url}\n")
    router = _router("--replica-file", str(path))
    try:
        assert [r["url"] for r in _replicas(router)] == [replicas[0].url]
        time.sleep(0.05)  # a new mtime
        path.write_text(f"{replicas[1].url} version=v2\n")
        until(lambda: [(r["url"], r["version"]) for r in _replicas(router)] == [(replicas[1].url, "v2")], 5)
        body = {"model": "smollm2", "prompt": "Hi", "max_tokens": 2}
        until(lambda: httpx.post(router.url + "/v1/completions", json=body, timeout=60).status_code == 200, 10)
    finally:
        router.kill()


def _stream(router_url: str, i: int) -> tuple[str, str]:
    """('done' | 'error-event', text) for one streamed completion; any other end raises."""
    body = {"model": "smollm2", "prompt": f"Story {i}: once upon a time", "max_tokens": 48, "ignore_eos": True,
            "temperature": 0, "stream": True}
    text, saw_error, saw_data = "", False, False
    with httpx.stream("POST", router_url + "/v1/completions", json=body, timeout=90) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line == "data: [DONE]":
                return ("error-event" if saw_error else "done"), text
            if line.startswith("data: "):
                event = json.loads(line[6:])
                if "error" in event:
                    assert saw_data  # an error event only ever follows streamed data
                    saw_error = True
                else:
                    saw_data = True
                    text += "".join(c["text"] for c in event["choices"])
    raise AssertionError("the stream ended without [DONE]")


def _complete(router_url: str, i: int) -> int:
    body = {"model": "smollm2", "prompt": f"Question {i}: why is the sky blue?", "max_tokens": 24, "temperature": 0,
            "ignore_eos": True}
    r = httpx.post(router_url + "/v1/completions", json=body, timeout=90)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 24
    return r.status_code


def test_kill_9_fails_nothing_unstarted_evicts_and_rejoins(fleet):
    router, replicas = fleet
    victim = replicas[1]
    with cf.ThreadPoolExecutor(16) as pool:
        streams = [pool.submit(_stream, router.url, i) for i in range(4)]
        plain = [pool.submit(_complete, router.url, i) for i in range(8)]
        until(lambda: next(r for r in _replicas(router) if r["url"] == victim.url)["in_flight"] >= 2, 30, 0.02)
        victim.proc.kill()  # SIGKILL: no drain, connections cut
        killed_at = time.monotonic()
        replacement = ServeProcess(*REPLICA_ARGS, port=victim.port, wait=False)
        replicas[1] = replacement  # the fixture kills it at the end
        until(lambda: not next(r for r in _replicas(router) if r["url"] == victim.url)["healthy"], 5, 0.05)
        evicted_after = time.monotonic() - killed_at
        later = [pool.submit(_complete, router.url, 100 + i) for i in range(6)]
        ends = [f.result(timeout=120) for f in streams]
        assert all(f.result(timeout=120) == 200 for f in plain + later)  # nothing unstarted failed
    assert evicted_after < 3
    gone = next(r for r in _replicas(router) if r["url"] == victim.url)
    assert gone["index_blocks"] == 0  # its predicted cache went with it
    assert all(kind in ("done", "error-event") and text for kind, text in ends)

    replacement.wait_healthy(300)
    until(lambda: next(r for r in _replicas(router) if r["url"] == victim.url)["healthy"], 5, 0.05)
    before = _metric(router, "tokenmill_router_requests_total", replica=victim.url, outcome="ok")
    for i in range(12):  # short prompts: no prefix to follow, so ties spread them at random
        assert httpx.post(router.url + "/v1/completions", json={"model": "smollm2", "prompt": f"Hi {i}",
                                                                "max_tokens": 2}, timeout=60).status_code == 200
    assert _metric(router, "tokenmill_router_requests_total", replica=victim.url, outcome="ok") > before


def test_canary_split_keeps_sessions_and_obeys_the_admin_api_behind_a_key(fleet):
    _, replicas = fleet
    router = _router("--replica", f"{replicas[0].url}@v1", "--replica", f"{replicas[1].url}@v2",
                     "--stable-version", "v1", "--canary-version", "v2", "--canary-percent", "50",
                     "--api-key", "sk-router")
    auth = {"Authorization": "Bearer sk-router"}
    try:
        assert httpx.get(router.url + "/health").status_code == 200  # open: load balancers probe it
        body = {"model": "smollm2", "prompt": "Hi", "max_tokens": 1}
        assert httpx.post(router.url + "/v1/completions", json=body).status_code == 401
        seen = {}
        for session in [f"s{i}" for i in range(10)] * 2:
            r = httpx.post(router.url + "/v1/completions", json=body, headers=auth | {"x-session-id": session},
                           timeout=60)
            assert r.status_code == 200
            assert seen.setdefault(session, r.headers["x-tokenmill-version"]) == r.headers["x-tokenmill-version"]
        assert set(seen.values()) == {"v1", "v2"}  # these 10 keys hash to both sides (deterministic)
        state = httpx.post(router.url + "/admin/rollout", json={"action": "rollback"}, headers=auth).json()
        assert state["percent"] == 0 and state["events"][-1]["action"] == "set"
        for session in seen:
            r = httpx.post(router.url + "/v1/completions", json=body, headers=auth | {"x-session-id": session},
                           timeout=60)
            assert r.headers["x-tokenmill-version"] == "v1"
        assert _metric_auth(router, "tokenmill_router_rollout_events_total", action="set") == 1
    finally:
        router.kill()


def _metric_auth(router: ServeProcess, name: str, **labels) -> float:
    text = httpx.get(router.url + "/metrics", headers={"Authorization": "Bearer sk-router"}, timeout=5).text
    return metric(text, name, **labels)


def _fleet_hits(replicas: list[ServeProcess]) -> tuple[float, float]:
    texts = [httpx.get(r.url + "/metrics", timeout=5).text for r in replicas]
    return (sum(metric(t, "vllm:prefix_cache_hits_total") for t in texts),
            sum(metric(t, "vllm:prefix_cache_queries_total") for t in texts))


def _conversations_hit_rate(router: ServeProcess, replicas: list[ServeProcess]) -> float:
    """3 conversations x 3 turns, each turn sent with its history, turn by turn across them
    (an odd count, so round-robin cannot land a conversation on one replica by accident)."""
    for r in replicas:
        assert httpx.post(r.url + "/reset_prefix_cache", timeout=30).json()["reset"]
    h0, q0 = _fleet_hits(replicas)
    history = {c: [{"role": "system", "content": f"Conversation {c}. " + SYSTEM}] for c in range(3)}
    for turn in range(3):
        for c, messages in history.items():
            messages.append({"role": "user", "content": f"Tell me fact number {turn} about the number {c}."})
            body = {"model": "smollm2", "messages": messages, "max_tokens": 2, "temperature": 0}
            assert httpx.post(router.url + "/v1/chat/completions", json=body, timeout=60).status_code == 200
            messages.append({"role": "assistant", "content": f"Fact {turn}: {c} is a number, as numbers go."})
    h1, q1 = _fleet_hits(replicas)
    return (h1 - h0) / (q1 - q0)


def test_prefix_policy_hits_more_than_round_robin(fleet):
    _, replicas = fleet
    rates = {}
    for policy in ("round-robin", "prefix"):
        router = _router("--policy", policy, *[a for r in replicas for a in ("--replica", r.url)])
        try:
            until(lambda: all(r["tokenizer"] for r in _replicas(router)), 30)
            rates[policy] = _conversations_hit_rate(router, replicas)
        finally:
            router.kill()
    assert rates["prefix"] > rates["round-robin"] + 0.1, rates
