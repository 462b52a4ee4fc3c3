"""`tokenmill run-batch` on the tiny model: results per custom_id, bad lines reported, resume."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import pytest

from tests.server.conftest import MODEL, make_engine
from tests.server.process import REPO, write_tiny_checkpoint
from tokenmill.server.run_batch import run_batch_file


def _line(custom_id, url="/v1/chat/completions", **body):
    if url.endswith("chat/completions"):
        body.setdefault("messages", [{"role": "user", "content": f"hello {custom_id}"}])
    else:
        body.setdefault("prompt", f"once upon {custom_id}")
    body.setdefault("max_tokens", 5)
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body})


def _read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _run(engine, inp, out):
    return asyncio.run(run_batch_file({MODEL: engine}, inp, out, concurrency=4, progress=False))


def test_run_batch_answers_each_line_reports_bad_ones_and_resumes(tiny_loaded, tmp_path):
    good = [_line(f"chat-{i}", temperature=0) for i in range(6)] + [
        _line("cmpl-0", "/v1/completions", temperature=0), _line("named", model=MODEL)]
    bad = [
        "{not json",
        json.dumps({"method": "POST", "url": "/v1/completions", "body": {"prompt": "x"}}),  # no custom_id
        _line("hot", temperature=5),  # out of range: the route's own 400
        _line("chat-0"),  # a duplicate custom_id
        _line("where", url="/v1/images/generations"),
        _line("streamy", stream=True),
        _line("other-model", model="gpt-4"),
    ]
    inp = tmp_path / "in.jsonl"
    inp.write_text("\n".join(good[:3] + bad + good[3:]) + "\n")
    out = tmp_path / "out.jsonl"
    engine = make_engine(tiny_loaded)
    try:
        completed, failed = _run(engine, inp, out)
        results = _read(out)
        assert (completed, failed) == (len(good), len(bad))
        by_id = {r["custom_id"]: r for r in results if r["custom_id"] is not None}
        for i in range(6):
            r = by_id[f"chat-{i}"]
            assert r["response"]["status_code"] == 200 and r["error"] is None
            body = r["response"]["body"]
            assert body["object"] == "chat.completion" and body["usage"]["completion_tokens"] >= 1
            assert r["response"]["request_id"] == body["id"] and r["id"].startswith("batch_req_")
        assert by_id["cmpl-0"]["response"]["body"]["object"] == "text_completion"
        assert by_id["named"]["response"]["status_code"] == 200
        errors = [r for r in results if r["error"] is not None]
        assert len(errors) == len(bad)
        codes = {(r["custom_id"], r["error"]["code"]) for r in errors}
        assert (None, "invalid_json") in codes and (None, "missing_required_parameter") in codes
        assert ("chat-0", "duplicate_custom_id") in codes and ("where", "invalid_url") in codes
        assert ("other-model", "model_not_found") in codes
        hot = next(r for r in errors if r["custom_id"] == "hot")["error"]
        assert hot["param"] == "temperature" and hot["line"] == 6
        assert next(r for r in errors if r["custom_id"] == "streamy")["error"]["param"] == "stream"

        # Resume: keep three results and a torn fourth line, as a crash mid-write leaves them.
        kept = out.read_text().splitlines()[:3]
        out.write_text("\n".join(kept) + "\n" + '{"id": "batch_req_torn", "custom_')
        completed2, failed2 = _run(engine, inp, out)
        after = out.read_text().splitlines()
        assert after[:3] == kept  # kept lines untouched, only the rest appended
        answered = [json.loads(line) for line in after]
        ids = [r["custom_id"] for r in answered if r["error"] is None]
        lines = [r["error"]["line"] for r in answered if r["error"] is not None]
        assert sorted(ids) == sorted(json.loads(g)["custom_id"] for g in good)
        assert sorted(lines) == [4, 5, 6, 7, 8, 9, 10]
        assert (completed2, failed2) == (completed, failed)
        # A third run has nothing left to do.
        _run(engine, inp, out)
        assert out.read_text().splitlines() == after
    finally:
        engine.shutdown()


@pytest.mark.slow
def test_run_batch_command_line(tmp_path):
    """The command itself, in a subprocess, with an LLM and an embedding model as serve takes
    them: exit 0, one result per line (resuming is tested above)."""
    model = write_tiny_checkpoint(tmp_path / "tiny")
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    embed = json.dumps({"custom_id": "e", "method": "POST", "url": "/v1/embeddings",
                        "body": {"model": "minilm", "input": "hello"}})
    inp.write_text("\n".join([_line("a"), _line("b", "/v1/completions"), "oops", embed]) + "\n")
    cmd = [sys.executable, "-m", "tokenmill", "run-batch", "-i", str(inp), "-o", str(out), "--model", str(model),
           "--model", "minilm"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    assert "3 completed, 1 failed" in done.stderr
    results = _read(out)
    assert len(results) == 4
    assert {r["custom_id"] for r in results if r["error"] is None} == {"a", "b", "e"}
    vector = next(r for r in results if r["custom_id"] == "e")["response"]["body"]["data"][0]["embedding"]
    assert len(vector) == 384
