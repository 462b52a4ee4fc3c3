"""Hostile requests a schema cannot describe, and the one rule every answer must keep.

Shared by tests/server/test_fuzz.py (a short run in the suite) and benchmarks/fuzz_server.py
(a long one against `tokenmill serve`). A request is drawn as (path, raw body, content type)
so that bodies which are not JSON at all (truncated, wrong content type) can be sent too.
Generation stays cheap: a body that would run does so with max_tokens <= 4.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from hypothesis import strategies as st

COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"


@dataclass(frozen=True)
class FuzzRequest:
    path: str
    body: bytes
    content_type: str | None

    def __repr__(self) -> str:  # hypothesis prints failing examples: keep them readable
        return f"FuzzRequest({self.path}, {self.content_type}, {self.body[:300]!r}... {len(self.body)} bytes)"


# -- values ------------------------------------------------------------------------------

ODD_TEXT = st.text(alphabet=st.characters(codec="utf-8"), max_size=40) | st.text(max_size=20) | st.sampled_from([
    "", "\x00", "\ud800", "\udfff", "\ud7ff", "\ufeff", "\u202e", "🙂" * 30, "é" * 3, "</s>", "<s>",
    "<|im_start|>", "<|im_end|>", "{{ 7*7 }}", "{% for x in y %}", "\\", '"', "\r\n" * 10, "\t",
])
# 1 kB - 200 kB strings of a repeated piece: large prompts, stops, names, roles.
HUGE_TEXT = st.builds(lambda piece, k: piece * k, st.sampled_from(["a", "🙂", "\x00", " ", "<s>", "ab\n", "\ud800"]),
                      st.integers(1_000, 200_000))
NUMBERS = st.integers(min_value=-(2**70), max_value=2**70) | st.floats(allow_nan=False, allow_infinity=False) | \
    st.sampled_from([0, 1, -1, 2, 0.5, 2.0000001, -2.5, 20, 21, 100, 101, 128, 129, 2**31, 2**63, 2**64, 10**30])
SCALARS = st.none() | st.booleans() | NUMBERS | ODD_TEXT
JSON = st.recursive(SCALARS, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(ODD_TEXT, kids, max_size=4),
                    max_leaves=12)
HUGE_INTS = st.sampled_from([129, 1000, 10**6, 2**31, 2**63 - 1, 2**63, 10**30, -1])
HUGE_LISTS = st.builds(lambda item, k: [item] * k, st.sampled_from(["x", "stop", "🙂", "a" * 300, 7]),
                       st.sampled_from([5, 64, 1000, 20_000]))
LOGIT_BIAS = st.builds(lambda k, bias: {str(i): bias for i in range(k)}, st.sampled_from([1, 300, 301, 10_000]),
                       st.sampled_from([1, -100, 100.5, 1e9])) | st.dictionaries(ODD_TEXT, JSON, max_size=3)
# Regexes whose naive matching or compilation explodes; the grammar compiler must refuse or
# bound them, failing that request only.
REGEXES = st.sampled_from([
    "(a*)*b", "(a|aa)*c", "(?:x+x+)+y", "a{1000}{1000}", "(a{1,1000}){1,1000}", "[\\s\\S]{0,100000}",
    "\\p{L}{1,65535}", "(" * 2000 + "a" + ")" * 2000, "(", "[", "a{2,1}", "\\", "(?<n>a)\\k<n>", "a" * 60_000,
    "|".join(f"w{i}" for i in range(5000)), "(.*){50}x", "[^\\x00-\\x{10FFFF}]",
])
GRAMMARS = st.sampled_from([
    "start: start start | \"a\"", "start: a\na: a", "start: ", "start: /(a*)*b/", "root ::= root root | \"x\"",
    "start: " + " | ".join(f'"k{i}"' for i in range(5000)), "%import common.WORD\nstart: WORD+", "???",
])


def _nested(depth: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"a": schema}, "required": ["a"]}
    return schema


SCHEMAS = st.sampled_from([
    {"$ref": "#"}, {"type": "object", "properties": {"a": {"$ref": "#"}}, "required": ["a"]},
    {"type": "string", "pattern": "(a*)*b"}, {"type": "array", "minItems": 10**9},
    {"type": "string", "minLength": 100_000}, {"type": "integer", "minimum": 1e308, "maximum": -1e308},
    {"anyOf": [{"const": f"v{i}"} for i in range(2000)]}, {"enum": list(range(10_000))},
    {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(3000)}},
    {"type": "object", "required": [f"p{i}" for i in range(500)], "additionalProperties": False},
    {"type": "nonsense"}, {"allOf": [{"type": "string"}, {"type": "integer"}]}, _nested(60), _nested(400),
    {"type": "string", "format": "date-time", "pattern": "\\d{1000}"},
]) | JSON

# -- bodies ------------------------------------------------------------------------------

MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "developer", "assistant", "tool", "function", "bot"]) | ODD_TEXT},
    optional={"content": ODD_TEXT | HUGE_TEXT | JSON | st.lists(st.fixed_dictionaries(
        {"type": st.sampled_from(["text", "image_url", "input_audio", "file", "refusal", "video"])},
        optional={"text": ODD_TEXT, "image_url": st.just({"url": "data:image/png;base64,AAAA"}),
                  "input_audio": st.just({"data": "AAAA", "format": "wav"}), "file": st.just({"file_id": "f"})}),
        max_size=3),
        "name": ODD_TEXT | HUGE_TEXT, "tool_call_id": ODD_TEXT | JSON,
        "tool_calls": st.just([{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]) | JSON})

# field -> values a schema cannot (or would never) produce for it
MUTATIONS = {
    "n": HUGE_INTS | SCALARS, "best_of": HUGE_INTS | SCALARS, "logprobs": HUGE_INTS | SCALARS,
    "top_logprobs": HUGE_INTS | SCALARS, "max_tokens": HUGE_INTS | SCALARS, "max_completion_tokens": HUGE_INTS,
    "temperature": NUMBERS | ODD_TEXT, "top_p": NUMBERS, "top_k": HUGE_INTS | NUMBERS, "min_p": NUMBERS,
    "presence_penalty": NUMBERS, "frequency_penalty": NUMBERS, "repetition_penalty": NUMBERS,
    "seed": NUMBERS, "min_tokens": HUGE_INTS, "stop": HUGE_LISTS | HUGE_TEXT | ODD_TEXT | JSON,
    "stop_token_ids": HUGE_LISTS | st.lists(NUMBERS, max_size=4), "logit_bias": LOGIT_BIAS,
    "guided_regex": REGEXES | JSON, "guided_grammar": GRAMMARS | JSON, "guided_json": SCHEMAS,
    "guided_choice": HUGE_LISTS | st.lists(ODD_TEXT, max_size=3) | JSON,
    "response_format": st.builds(lambda s: {"type": "json_schema", "json_schema": {"name": "x", "schema": s}},
                                 SCHEMAS) | st.just({"type": "json_object"}) | JSON,
    "stream": st.booleans() | JSON, "stream_options": st.just({"include_usage": True}) | JSON,
    "model": ODD_TEXT | HUGE_TEXT, "user": HUGE_TEXT | JSON, "echo": st.booleans(), "suffix": ODD_TEXT,
    "ignore_eos": st.booleans() | JSON, "skip_special_tokens": st.booleans() | JSON, "priority": HUGE_INTS | NUMBERS,
    "tools": st.just([{"type": "function", "function": {"name": "f", "parameters": {"$ref": "#"}}}]) | JSON,
    "tool_choice": st.sampled_from(["required", "auto", "none", "any"]) | JSON,
}
PROMPTS = ODD_TEXT | HUGE_TEXT | st.lists(NUMBERS, max_size=5) | st.lists(ODD_TEXT, max_size=3) | JSON


def _base(path: str, model: str) -> st.SearchStrategy[dict]:
    """A body that would be answered, max_tokens kept small."""
    small = {"model": st.just(model), "max_tokens": st.integers(1, 4)}
    if path == COMPLETIONS:
        return st.fixed_dictionaries({**small, "prompt": st.just("The quick brown fox")})
    return st.fixed_dictionaries({**small, "messages": st.just([{"role": "user", "content": "Hi"}])})


def _mutated(path: str, model: str) -> st.SearchStrategy[dict]:
    field = "prompt" if path == COMPLETIONS else "messages"
    first = PROMPTS if path == COMPLETIONS else (st.lists(MESSAGE, max_size=3) | JSON)
    keys = st.lists(st.sampled_from(sorted(MUTATIONS)), min_size=0, max_size=3, unique=True)

    @st.composite
    def draw(draw_) -> dict:
        body = draw_(_base(path, model))
        if draw_(st.booleans()):
            body[field] = draw_(first)
        for key in draw_(keys):
            body[key] = draw_(MUTATIONS[key])
        return cheap(body)  # a huge valid n or max_tokens is only load; an invalid one stays

    return draw()


def _deep(depth: int, opener: str, closer: str) -> str:
    return opener * depth + closer * depth


@st.composite
def fuzz_requests(draw, model: str) -> FuzzRequest:
    """One hostile request: a mutated body as JSON, or raw bytes that are not quite JSON."""
    path = draw(st.sampled_from([COMPLETIONS, CHAT]))
    body = draw(_mutated(path, model))
    text = json.dumps(body)  # ensure_ascii: lone surrogates travel as \ud800 escapes, as a client may send
    kind = draw(st.sampled_from(["json"] * 6 + ["truncated", "deep", "content_type", "bytes", "empty"]))
    if kind == "truncated":
        text = text[: draw(st.integers(0, max(0, len(text) - 1)))]
    elif kind == "deep":
        depth = draw(st.sampled_from([10, 100, 1000, 5000, 50_000]))
        nest = draw(st.sampled_from([("[", "]"), ('{"a":', "}")]))
        value = _deep(depth, *nest) if nest[0] == "[" else nest[0] * depth + "1" + nest[1] * depth
        key = draw(st.sampled_from(["prompt", "messages", "guided_json", "stop", "logit_bias", "extra"]))
        text = text[:-1] + f', "{key}": {value}}}'
    elif kind == "bytes":
        return FuzzRequest(path, draw(st.binary(max_size=300)), "application/json")
    elif kind == "empty":
        return FuzzRequest(path, b"", draw(st.sampled_from(["application/json", None])))
    content_type = "application/json"
    if kind == "content_type":
        content_type = draw(st.sampled_from([None, "text/plain", "application/x-www-form-urlencoded",
                                             "multipart/form-data; boundary=x", "application/json; charset=latin-1",
                                             "application/xml", "*/*"]))
    return FuzzRequest(path, text.encode("utf-8", "surrogatepass"), content_type)


def cheap(body):
    """Keep a schema-generated body cheap to run: a large max_tokens or n that the schema allows
    becomes small, a missing max_tokens (the rest of the context) 4; values the schema forbids
    are left alone, so a body that breaks the schema still does."""
    if isinstance(body, dict):
        if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
            body["max_tokens"] = 4
        # (field, small value, the schema's maximum: above it a value must stay as it is)
        for key, cap, top in (("max_tokens", 4, None), ("max_completion_tokens", 4, None), ("n", 2, 128),
                              ("min_tokens", 2, None)):
            value = body.get(key)
            # 128.0 is an integer to the API (pydantic takes an integral float), so to this too.
            integral = type(value) is int or (type(value) is float and value.is_integer())
            if integral and cap < value and (top is None or value <= top):
                body[key] = cap
    return body


# -- the rule ----------------------------------------------------------------------------

ERROR_KEYS = {"message", "type", "param", "code"}


def problem(status: int, content_type: str, text: str) -> str | None:
    """What is wrong with an answer, or None: no 5xx, and every error in OpenAI's shape (a
    streamed answer carries no error event either)."""
    if status >= 500:
        return f"{status} server error"
    if status >= 400:
        try:
            error = json.loads(text)["error"]
        except (ValueError, KeyError, TypeError):
            return f"{status} body not OpenAI-shaped: {text[:200]!r}"
        if not isinstance(error, dict) or set(error) != ERROR_KEYS:
            return f"{status} error keys {sorted(error) if isinstance(error, dict) else error!r}"
        if not isinstance(error["message"], str) or not error["message"] or not isinstance(error["type"], str):
            return f"{status} error message/type not strings"
        if error["param"] is not None and not isinstance(error["param"], str):
            return f"{status} error param not a string"
        return None
    if content_type.startswith("text/event-stream"):
        for line in text.splitlines():
            if line.startswith("data: {") and '"error"' in line[:20]:
                return f"error event in a stream: {line[:200]}"
    return None
