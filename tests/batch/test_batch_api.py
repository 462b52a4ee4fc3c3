"""The Batch API through the `openai` client against a real server on the tiny model."""

from __future__ import annotations

import json
import time

import openai
import pytest

from tests.server.checks import assert_openai_error
from tests.server.conftest import KEY, MODEL, LiveServer, make_engine, wait_pool_whole
from tokenmill.server.app import create_app


@pytest.fixture(scope="module")
def batch_server(tiny_loaded, tmp_path_factory):
    engine = make_engine(tiny_loaded)
    live = LiveServer(create_app({MODEL: engine}, api_keys=[KEY], data_dir=tmp_path_factory.mktemp("data")))
    yield live, engine
    live.stop()
    engine.shutdown()


def _jsonl(lines) -> bytes:
    return ("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n").encode()


def _chat(custom_id, **body):
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": MODEL, "messages": [{"role": "user", "content": custom_id}], "max_tokens": 4, **body}}


def _wait(client, batch_id, statuses=("completed", "failed", "cancelled", "expired"), timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        batch = client.batches.retrieve(batch_id)
        if batch.status in statuses:
            return batch
        time.sleep(0.1)
    raise AssertionError(f"batch {batch_id} still {batch.status}")


def _start(client, lines, name):
    """Upload `lines` and start a batch on them; returns once it is running."""
    uploaded = client.files.create(file=(name, _jsonl(lines)), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                  completion_window="24h")
    _wait(client, batch.id, statuses=("in_progress",))
    return batch


def test_files_and_batches_round_trip_with_the_openai_client(batch_server):
    live, engine = batch_server
    client = live.client()
    lines = [_chat(f"req-{i}", temperature=0) for i in range(5)] + [
        "{broken json",
        _chat("too-hot", temperature=9),
        {"custom_id": "wrong-url", "method": "POST", "url": "/v1/completions", "body": {"prompt": "x"}},
    ]
    uploaded = client.files.create(file=("in.jsonl", _jsonl(lines)), purpose="batch")
    assert uploaded.purpose == "batch" and uploaded.bytes == len(_jsonl(lines))
    assert client.files.retrieve(uploaded.id).filename == "in.jsonl"
    assert client.files.content(uploaded.id).content == _jsonl(lines)
    assert uploaded.id in [f.id for f in client.files.list().data]

    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                  completion_window="24h", metadata={"job": "test"})
    assert batch.status in ("validating", "in_progress") and batch.metadata == {"job": "test"}
    done = _wait(client, batch.id)
    assert done.status == "completed", done
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (8, 5, 3)
    assert done.completed_at and done.in_progress_at and done.finalizing_at
    assert sorted(e.line for e in done.errors.data) == [6, 7, 8]  # the batch says which lines failed

    output = [json.loads(x) for x in client.files.content(done.output_file_id).text.splitlines()]
    assert sorted(r["custom_id"] for r in output) == [f"req-{i}" for i in range(5)]
    for r in output:
        assert r["response"]["status_code"] == 200 and r["response"]["body"]["object"] == "chat.completion"
    # Greedy: a batch line answers exactly what the same request sent to the API answers.
    direct = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "req-3"}],
                                            max_tokens=4, temperature=0)
    by_id = {r["custom_id"]: r for r in output}
    assert by_id["req-3"]["response"]["body"]["choices"][0]["message"]["content"] == direct.choices[0].message.content
    errors = [json.loads(x) for x in client.files.content(done.error_file_id).text.splitlines()]
    assert {(e["custom_id"], e["error"]["code"]) for e in errors} == {
        (None, "invalid_json"), ("too-hot", "decimal_above_max_value"), ("wrong-url", "invalid_url")}
    assert client.files.retrieve(done.output_file_id).purpose == "batch_output"

    # Listing pages newest first with after/limit.
    second = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                   completion_window="24h")
    page = client.batches.list(limit=1)
    assert [b.id for b in page.data] == [second.id] and page.has_more
    assert [b.id for b in client.batches.list(limit=1, after=second.id).data] == [batch.id]
    _wait(client, second.id)

    deleted = client.files.delete(uploaded.id)
    assert deleted.deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(uploaded.id)
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch-nope")
    with pytest.raises(openai.BadRequestError):
        client.files.create(file=("x.jsonl", b"{}\n"), purpose="fine-tune")
    with pytest.raises(openai.NotFoundError):
        client.batches.create(input_file_id="file-nope", endpoint="/v1/chat/completions", completion_window="24h")
    wait_pool_whole(engine)


def test_cancel_stops_a_running_batch_and_keeps_what_finished(batch_server):
    live, engine = batch_server
    client = live.client()
    batch = _start(client, [_chat(f"long-{i}", max_tokens=200, ignore_eos=True) for i in range(40)], "long.jsonl")
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled")
    done = _wait(client, batch.id)
    assert done.status == "cancelled" and done.cancelled_at
    assert done.request_counts.completed < 40
    if done.output_file_id:
        output = client.files.content(done.output_file_id).text.splitlines()
        assert len(output) == done.request_counts.completed
    wait_pool_whole(engine)


def test_interactive_request_runs_while_a_batch_waits(batch_server):
    """With the batch filling the engine, an interactive request is still served promptly:
    it goes ahead of every batch request waiting (priority), rather than behind them."""
    live, engine = batch_server
    client = live.client()
    batch = _start(client, [_chat(f"bg-{i}", max_tokens=64, ignore_eos=True) for i in range(60)], "bg.jsonl")
    deadline = time.monotonic() + 30
    while engine.stats.num_waiting == 0:  # batch requests queue behind the full engine
        assert time.monotonic() < deadline, "the batch never filled the engine"
        time.sleep(0.01)
    reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "now"}], max_tokens=3)
    assert reply.choices[0].message.content is not None
    # The batch was still going when the interactive request was answered.
    assert client.batches.retrieve(batch.id).status == "in_progress"
    client.batches.cancel(batch.id)
    _wait(client, batch.id)
    wait_pool_whole(engine)


def test_priority_field_is_accepted_and_validated(batch_server):
    live, engine = batch_server
    with live.http() as http:
        ok = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, "priority": -7})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2
        chat = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                         "max_tokens": 2, "priority": 3})
        assert chat.status_code == 200
        for bad in ("high", 1.5, 2**63):
            r = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, "priority": bad})
            assert r.status_code == 400 and r.json()["error"]["param"] == "priority", (bad, r.text)
    wait_pool_whole(engine)


def test_list_routes_refuse_a_query_parameter_given_twice(batch_server):
    """Found by schemathesis: FastAPI keeps the last of repeated values, so ?purpose=a&purpose=b
    listed files as if only b had been asked; the schema says one value."""
    live, _ = batch_server
    http = live.http()
    assert_openai_error(http.get("/v1/files", params=[("purpose", "batch"), ("purpose", "\x04")]), 400, "purpose")
    assert_openai_error(http.get("/v1/batches", params=[("limit", "1"), ("limit", "2")]), 400, "limit")
    assert http.get("/v1/files", params={"purpose": "batch"}).status_code == 200
    assert http.get("/v1/batches", params={"limit": "2"}).status_code == 200


def test_list_pagination_as_openai_with_the_clients_auto_paging(batch_server):
    """after/limit/order on /v1/files, after/limit on /v1/batches: the openai client's own
    auto-pagination (it follows has_more with after=<last id>) walks every page."""
    live, engine = batch_server
    client = live.client()
    uploaded = [client.files.create(file=(f"p{i}.jsonl", _jsonl([_chat(f"p{i}")])), purpose="batch").id
                for i in range(5)]
    everything = client.files.list()  # OpenAI's default limit (10000): one page
    assert not everything.has_more
    newest_first = [f.id for f in everything.data]
    assert newest_first[:5] == uploaded[::-1]  # newest first, even within one second
    assert [f.id for f in client.files.list(limit=2)] == newest_first  # auto-paginates: 2 per page
    assert [f.id for f in client.files.list(limit=2, order="asc")] == newest_first[::-1]
    assert [f.id for f in client.files.list(limit=3, purpose="batch")] == \
        [f.id for f in everything.data if f.purpose == "batch"]
    page = client.files.list(limit=2, after=uploaded[3])
    assert [f.id for f in page.data] == [uploaded[2], uploaded[1]] and page.has_more
    with live.http() as http:
        body = http.get("/v1/files", params={"limit": 2, "order": "asc", "after": uploaded[3]}).json()
        assert [f["id"] for f in body["data"]] == [uploaded[4]] and body["has_more"] is False
        assert body["first_id"] == body["last_id"] == uploaded[4]

    batches = [client.batches.create(input_file_id=f, endpoint="/v1/chat/completions", completion_window="24h").id
               for f in uploaded[:3]]
    all_batches = client.batches.list(limit=100)
    assert [b.id for b in all_batches.data][:3] == batches[::-1]
    assert [b.id for b in client.batches.list(limit=1)] == [b.id for b in all_batches.data]
    for b in batches:
        _wait(client, b)
    wait_pool_whole(engine)


@pytest.mark.parametrize("path, params, param", [
    ("/v1/files", {"limit": 0}, "limit"),
    ("/v1/files", {"limit": 10001}, "limit"),
    ("/v1/files", {"limit": "many"}, "limit"),
    ("/v1/files", {"order": "sideways"}, "order"),
    ("/v1/files", {"after": "file-nope"}, "after"),
    ("/v1/batches", {"limit": 0}, "limit"),
    ("/v1/batches", {"limit": 101}, "limit"),
    ("/v1/batches", {"after": "batch-nope"}, "after"),
    ("/v1/batches", {"order": "asc"}, "order"),  # OpenAI's batch list takes no order
])
def test_list_pagination_bad_values_are_400s(batch_server, path, params, param):
    live, _ = batch_server
    with live.http() as http:
        assert_openai_error(http.get(path, params=params), 400, param)
