"""/v1/embeddings lines, in the server's Batch API and in `tokenmill run-batch`, with the real
all-MiniLM-L6-v2 (`minilm`) beside the tiny LLM: a line's embedding is the one the same direct
/v1/embeddings request returns, and a bad line is reported per line, as the route reports it."""

from __future__ import annotations

import asyncio
import base64
import json
import time

import numpy as np
import pytest

from tests.server.conftest import KEY, MODEL, LiveServer, make_engine
from tokenmill.build import build_async_embedder
from tokenmill.server.app import create_app
from tokenmill.server.run_batch import run_batch_file

EMBED = "minilm"
TEXTS = ["The cat sits on the mat.", "A feline rests on a rug.", "Quarterly revenue rose by 12 percent."]


@pytest.fixture(scope="module")
def engines(tiny_loaded):
    engine, embedder = make_engine(tiny_loaded), build_async_embedder(EMBED)
    embedder.start()
    yield engine, embedder
    embedder.shutdown()
    engine.shutdown()


@pytest.fixture(scope="module")
def live(engines, tmp_path_factory):
    engine, embedder = engines
    server = LiveServer(create_app({MODEL: engine, EMBED: embedder}, api_keys=[KEY],
                                   data_dir=tmp_path_factory.mktemp("data")))
    yield server
    server.stop()


def _embed(custom_id, **body):
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/embeddings", "body": {"model": EMBED, **body}}


def _vector(item) -> np.ndarray:
    value = item["embedding"]
    if isinstance(value, str):
        return np.frombuffer(base64.b64decode(value), dtype="<f4")
    return np.asarray(value, dtype=np.float32)


def _wait(client, batch_id, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        batch = client.batches.retrieve(batch_id)
        if batch.status in ("completed", "failed", "cancelled", "expired"):
            return batch
        time.sleep(0.1)
    raise AssertionError(f"batch {batch_id} still {batch.status}")


# Lines the route refuses, and how it says so: (line, code, param).
BAD = [
    (_embed("empty", input=""), "string_below_min_length", "input"),
    (_embed("short", input="x", dimensions=8), "unsupported_parameter", "dimensions"),
    (_embed("llm", input="x") | {"body": {"model": MODEL, "input": "x"}}, "model_kind_mismatch", "model"),
    (_embed("int8", input="x", encoding_format="int8"), "invalid_value", "encoding_format"),
]


def test_embedding_batch_equals_direct_requests_and_reports_bad_lines(live):
    client = live.client()
    good = [_embed("one", input=TEXTS[0]), _embed("many", input=TEXTS),
            _embed("b64", input=TEXTS[1], encoding_format="base64")]
    # Too long for the model: the route's own 400 at run time, answered as that line's response.
    long = _embed("long", input="word " * 300)
    lines = good + [line for line, _, _ in BAD] + [long]
    content = ("\n".join(json.dumps(x) for x in lines) + "\n").encode()
    uploaded = client.files.create(file=("emb.jsonl", content), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="24h")
    done = _wait(client, batch.id)
    assert done.status == "completed", done
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == \
        (len(lines), len(good), len(BAD) + 1)

    output = {r["custom_id"]: r for r in map(json.loads, client.files.content(done.output_file_id).text.splitlines())}
    assert sorted(output) == ["b64", "many", "one"]
    with live.http() as http:
        for line in good:
            direct = http.post("/v1/embeddings", json=line["body"])
            assert direct.status_code == 200, direct.text
            body = output[line["custom_id"]]["response"]["body"]
            assert output[line["custom_id"]]["response"]["status_code"] == 200
            assert body["model"] == EMBED and body["usage"] == direct.json()["usage"]
            assert [d["index"] for d in body["data"]] == [d["index"] for d in direct.json()["data"]]
            for mine, theirs in zip(body["data"], direct.json()["data"]):
                assert type(mine["embedding"]) is type(theirs["embedding"])  # the asked encoding
                assert np.abs(_vector(mine) - _vector(theirs)).max() <= 1e-6
    assert len(output["many"]["response"]["body"]["data"]) == 3 and _vector(output["one"]["response"]["body"]["data"][0]).shape == (384,)

    errors = [json.loads(x) for x in client.files.content(done.error_file_id).text.splitlines()]
    by_id = {e["custom_id"]: e for e in errors}
    for line, code, param in BAD:
        error = by_id[line["custom_id"]]["error"]
        assert error["param"] == param and error["line"] == lines.index(line) + 1, error
        assert error["code"] == code, error
    too_long = by_id["long"]["response"]
    assert too_long["status_code"] == 400
    assert too_long["body"]["error"]["code"] == "context_length_exceeded" and by_id["long"]["error"] is None
    # The batch object names the lines refused up front.
    assert sorted(e.line for e in done.errors.data) == sorted(lines.index(line) + 1 for line, _, _ in BAD)


def test_an_embeddings_batch_refuses_other_urls(live):
    client = live.client()
    chat = {"custom_id": "chat", "method": "POST", "url": "/v1/chat/completions",
            "body": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}}
    content = (json.dumps(_embed("e", input="x")) + "\n" + json.dumps(chat) + "\n").encode()
    uploaded = client.files.create(file=("mixed.jsonl", content), purpose="batch")
    done = _wait(client, client.batches.create(input_file_id=uploaded.id, endpoint="/v1/embeddings",
                                               completion_window="24h").id)
    assert (done.request_counts.completed, done.request_counts.failed) == (1, 1)
    assert [(e.line, e.code) for e in done.errors.data] == [(2, "invalid_url")]


def test_run_batch_mixes_embedding_and_chat_lines(engines, tmp_path):
    engine, embedder = engines
    chat = {"custom_id": "chat", "method": "POST", "url": "/v1/chat/completions",
            "body": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}}
    # No model named: each line goes to the only model of its kind, as on the server.
    unnamed = {"custom_id": "unnamed", "method": "POST", "url": "/v1/embeddings", "body": {"input": TEXTS[2]}}
    lines = [_embed("e0", input=TEXTS[0]), chat, unnamed, _embed("bad", input="x", dimensions=3)]
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    completed, failed = asyncio.run(run_batch_file({MODEL: engine, EMBED: embedder}, inp, out, concurrency=4,
                                                   progress=False))
    assert (completed, failed) == (3, 1)
    results = {r["custom_id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert results["chat"]["response"]["body"]["object"] == "chat.completion"
    assert results["bad"]["error"]["param"] == "dimensions"
    expected = asyncio.run(embedder.embed([TEXTS[0], TEXTS[2]])).embeddings.float().numpy()
    for custom_id, row in (("e0", 0), ("unnamed", 1)):
        body = results[custom_id]["response"]["body"]
        assert body["model"] == EMBED
        assert np.abs(_vector(body["data"][0]) - expected[row]).max() <= 1e-6
