"""`tokenmill serve` as a subprocess: key file, openai client, SIGTERM drain, default model."""

from __future__ import annotations

import signal
import threading
import time

import httpx
import openai
import pytest

from tests.server.process import ServeProcess, write_tiny_checkpoint


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-llama"))


def test_serve_tiny_dir_with_key_file_then_sigterm_exits_0(tiny_dir, tmp_path):
    key_file = tmp_path / "keys"
    key_file.write_text("# keys\nsk-from-file\n\n")
    server = ServeProcess("--model", str(tiny_dir), "--served-model-name", "tiny", "--api-key-file", str(key_file),
                          "--max-num-seqs", "8")
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="sk-from-file", max_retries=0)
        r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        assert r.choices[0].message.role == "assistant"
        assert httpx.get(server.url + "/v1/models").status_code == 401
        assert server.terminate(timeout=30) == 0
    finally:
        server.kill()


@pytest.mark.slow
def test_default_model_paris_and_drain():
    """The real default model answers, and SIGTERM lets an in-flight request finish."""
    server = ServeProcess("--api-key", "sk-1", "--drain-timeout", "60")
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="sk-1", max_retries=0, timeout=120)
        r = client.chat.completions.create(
            model="smollm2", messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=30, temperature=0,
        )
        assert "Paris" in r.choices[0].message.content

        results: list = []
        stream_started = threading.Event()

        def in_flight():
            # 400 tokens: long enough to be in flight through the checks below at ~8 ms a token
            stream = client.completions.create(model="smollm2", prompt="Once upon a time", max_tokens=400,
                                               temperature=0, stream=True, extra_body={"ignore_eos": True})
            text, reasons = "", []
            for chunk in stream:
                stream_started.set()
                for c in chunk.choices:
                    text += c.text
                    reasons.append(c.finish_reason)
            results.append((text, reasons))

        t = threading.Thread(target=in_flight)
        t.start()
        assert stream_started.wait(60)
        server.proc.send_signal(signal.SIGTERM)
        headers = {"Authorization": "Bearer sk-1"}
        deadline = time.monotonic() + 10  # the signal handler runs on the server's own time
        while httpx.get(server.url + "/health").status_code != 503 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert httpx.get(server.url + "/health").status_code == 503
        refused = httpx.post(server.url + "/v1/completions", headers=headers, json={"prompt": "x", "max_tokens": 2})
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "draining"
        t.join(60)
        text, reasons = results[0]
        assert reasons[-1] == "length" and text  # finished normally, not cut off
        assert server.proc.wait(60) == 0
    finally:
        server.kill()
