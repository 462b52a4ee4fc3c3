"""The OpenAI batch line format: one request per input line, one result per output line.

Input:  {"custom_id": str, "method": "POST", "url": "/v1/chat/completions", "body": {...}}
Output: {"id", "custom_id", "response": {"status_code", "request_id", "body"} | null, "error": {...} | null}
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

MAX_CUSTOM_ID_CHARS = 512  # OpenAI's limit


@dataclass(frozen=True)
class BatchLine:
    line: int  # 1-based, for error messages
    custom_id: str
    url: str
    body: dict


@dataclass(frozen=True)
class LineError:
    """A line that cannot run: reported in the error file, never silently dropped."""

    line: int
    custom_id: str | None  # None when the line has none (or is not JSON at all)
    code: str
    message: str
    param: str | None = None


def parse_line(text: str, line: int, urls: tuple[str, ...]) -> BatchLine | LineError:
    """One input line, checked for shape; `urls`: the endpoints that may be asked for."""
    try:
        obj = json.loads(text)
    except ValueError as e:
        return LineError(line, None, "invalid_json", f"line {line}: not valid JSON ({e.msg})")
    if not isinstance(obj, dict):
        return LineError(line, None, "invalid_request", f"line {line}: expected a JSON object")
    custom_id = obj.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id or len(custom_id) > MAX_CUSTOM_ID_CHARS:
        return LineError(line, None, "missing_required_parameter",
                         f"line {line}: custom_id must be a non-empty string of at most {MAX_CUSTOM_ID_CHARS} "
                         "characters", "custom_id")
    if obj.get("method") != "POST":
        return LineError(line, custom_id, "invalid_value", f"line {line}: method must be POST", "method")
    url = obj.get("url")
    if url not in urls:
        return LineError(line, custom_id, "invalid_url",
                         f"line {line}: url must be one of {list(urls)}, got {str(url)[:80]!r}", "url")
    body = obj.get("body")
    if not isinstance(body, dict):
        return LineError(line, custom_id, "invalid_value", f"line {line}: body must be a JSON object", "body")
    return BatchLine(line, custom_id, url, body)


def parse_lines(lines: list[str], urls: tuple[str, ...]) -> tuple[list[BatchLine], list[LineError]]:
    """Every non-blank line parsed; a repeated custom_id is an error on its later lines (each
    id names one result, or resuming could not tell which was done)."""
    good: list[BatchLine] = []
    bad: list[LineError] = []
    seen: set[str] = set()
    for n, text in enumerate(lines, 1):
        if not text.strip():
            continue
        parsed = parse_line(text, n, urls)
        if isinstance(parsed, BatchLine) and parsed.custom_id in seen:
            parsed = LineError(n, parsed.custom_id, "duplicate_custom_id",
                               f"line {n}: custom_id {parsed.custom_id[:80]!r} is used by an earlier line", "custom_id")
        if isinstance(parsed, LineError):
            bad.append(parsed)
        else:
            seen.add(parsed.custom_id)
            good.append(parsed)
    return good, bad


def _id() -> str:
    return f"batch_req_{uuid.uuid4().hex}"


def response_line(custom_id: str, status_code: int, body: dict) -> dict:
    request_id = body.get("id") if isinstance(body.get("id"), str) else f"req_{uuid.uuid4().hex}"
    return {"id": _id(), "custom_id": custom_id,
            "response": {"status_code": status_code, "request_id": request_id, "body": body}, "error": None}


def error_line(error: LineError) -> dict:
    return {"id": _id(), "custom_id": error.custom_id, "response": None,
            "error": {"code": error.code, "message": error.message, "line": error.line, "param": error.param}}


def is_success(result: dict) -> bool:
    response = result.get("response")
    return bool(response) and 200 <= response.get("status_code", 0) < 300
