"""A real `tokenmill serve` killed with SIGKILL mid-batch, restarted on the same --data-dir:
the batch resumes and its output answers every custom_id exactly once."""

from __future__ import annotations

import collections
import json
import signal
import time

import httpx
import openai
import pytest

from tests.server.process import ServeProcess, write_tiny_checkpoint

# Enough lines that on a fast, idle machine the kill still lands mid-batch: the poll sees 3 done,
# and 16 were written by the time the signal landed in one run here (40 could all be).
NUM_LINES = 160


def _wait(client, batch_id, until, timeout=180):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        batch = client.batches.retrieve(batch_id)
        if until(batch):
            return batch
        time.sleep(0.05)
    raise AssertionError(f"batch {batch_id}: {batch}")


@pytest.mark.slow
def test_sigkill_mid_batch_then_restart_answers_each_custom_id_once(tmp_path):
    model = write_tiny_checkpoint(tmp_path / "tiny")
    data = tmp_path / "data"
    # Four sequences at a time: the batch runs in waves, so the kill lands between its first
    # results and its last.
    args = ("--model", str(model), "--served-model-name", "tiny", "--data-dir", str(data), "--max-num-seqs", "4")
    lines = [json.dumps({"custom_id": f"row-{i}", "method": "POST", "url": "/v1/completions",
                         "body": {"prompt": f"row {i}", "max_tokens": 16, "ignore_eos": True}})
             for i in range(NUM_LINES)]
    server = ServeProcess(*args)
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
        uploaded = client.files.create(file=("rows.jsonl", ("\n".join(lines) + "\n").encode()), purpose="batch")
        batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/completions", completion_window="24h")
        _wait(client, batch.id, lambda b: b.request_counts.completed >= 3)
        server.proc.send_signal(signal.SIGKILL)
        assert server.proc.wait(10) == -signal.SIGKILL
    finally:
        server.kill()
    partial = sum(1 for p in (data / "files").iterdir() for line in p.read_text().splitlines() if "row-" in line
                  and '"response"' in line)
    assert 3 <= partial < NUM_LINES, partial  # killed mid-batch

    restarted = ServeProcess(*args)
    try:
        client = openai.OpenAI(base_url=restarted.url + "/v1", api_key="none", max_retries=0)
        done = _wait(client, batch.id, lambda b: b.status in ("completed", "failed", "cancelled", "expired"))
        assert done.status == "completed", done
        assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == \
            (NUM_LINES, NUM_LINES, 0)
        assert done.error_file_id is None
        output = [json.loads(x) for x in client.files.content(done.output_file_id).text.splitlines()]
        counts = collections.Counter(r["custom_id"] for r in output)
        assert counts == collections.Counter(f"row-{i}" for i in range(NUM_LINES))  # each exactly once
        assert all(r["response"]["status_code"] == 200 and r["response"]["body"]["usage"]["completion_tokens"] == 16
                   for r in output)
        assert httpx.get(restarted.url + "/health").status_code == 200
        assert restarted.terminate(30) == 0
    finally:
        restarted.kill()
