"""One streaming request to an OpenAI-compatible server, timed the way `vllm bench serve` times it.

TTFT is measured to the first SSE chunk that carries text (a chat server's opening role-only
chunk is not a token); every later text chunk adds one ITL gap. Output tokens come from the
final usage chunk, which we ask for with stream_options.include_usage. Anything that is not a
clean stream ending in `data: [DONE]` (HTTP errors, error events, dropped connections,
timeouts) becomes a failed record with the reason; nothing here raises.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import httpx

from tokenmill.bench.datasets import SampleRequest
from tokenmill.bench.records import RequestRecord

BACKENDS = ("completions", "chat")
ENDPOINTS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}


@dataclass(frozen=True)
class RequestSettings:
    base_url: str
    model: str
    backend: str = "completions"
    ignore_eos: bool = False
    temperature: float = 0.0
    api_key: str | None = None
    extra_body: dict | None = None

    @property
    def url(self) -> str:
        return self.base_url.rstrip("/") + ENDPOINTS[self.backend]

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def payload(self, sample: SampleRequest) -> dict:
        body: dict = {
            "model": self.model,
            "max_tokens": sample.expected_output_len,
            "temperature": self.temperature,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if self.backend == "chat":
            body["messages"] = sample.chat_messages
        else:
            body["prompt"] = sample.prompt
        if self.ignore_eos:
            body["ignore_eos"] = True  # vLLM/llama.cpp/tokenmill extension: exact output lengths
        body.update(self.extra_body or {})
        return body


def _chunk_text(choice: dict, backend: str) -> str:
    if backend == "chat":
        delta = choice.get("delta") or {}
        return (delta.get("content") or "") + (delta.get("reasoning_content") or "")
    return choice.get("text") or ""


async def send_request(client: httpx.AsyncClient, settings: RequestSettings, sample: SampleRequest) -> RequestRecord:
    rec = RequestRecord(prompt_len=sample.prompt_len, expected_output_len=sample.expected_output_len)
    text_parts: list[str] = []
    last = None
    done = False
    st = rec.start_time = time.perf_counter()
    try:
        async with client.stream("POST", settings.url, json=settings.payload(sample), headers=settings.headers) as resp:
            if resp.status_code != 200:
                body = (await resp.aread()).decode("utf-8", "replace")
                rec.error = f"HTTP {resp.status_code}: {body[:300]}"
                return rec
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue  # blank separators, comments (": ping"), event names
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                now = time.perf_counter()
                event = json.loads(data)
                if "error" in event:
                    err = event["error"]
                    rec.error = f"error event: {err.get('message', err) if isinstance(err, dict) else err}"
                    return rec
                for choice in event.get("choices") or ():
                    text = _chunk_text(choice, settings.backend)
                    if not text:
                        continue
                    if last is None:
                        rec.ttft = now - st
                    else:
                        rec.itl.append(now - last)
                    last = now
                    text_parts.append(text)
                usage = event.get("usage")
                if usage and usage.get("completion_tokens") is not None:
                    rec.output_tokens = int(usage["completion_tokens"])
    except (httpx.HTTPError, json.JSONDecodeError, OSError) as e:
        rec.error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        return rec
    rec.latency = time.perf_counter() - st
    rec.generated_text = "".join(text_parts)
    if not done:
        rec.error = "stream ended without [DONE]"
        return rec
    rec.success = True
    if last is None:  # a clean stream without text (e.g. an immediate end-of-sequence)
        rec.ttft = rec.latency
    return rec
