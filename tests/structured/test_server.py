"""response_format / guided_* / tools over HTTP with the openai client (tiny random model:
the grammar alone must make its output valid)."""

from __future__ import annotations

import json
import re

import jsonschema
import openai
import pytest

from tests.server.conftest import MODEL, engine, pool_whole_after, server, tiny_loaded  # noqa: F401

SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"enum": ["Paris", "Rome"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 9},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "minItems": 1, "maxItems": 2},
    },
    "required": ["city", "days", "tags"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": SCHEMA}},
    {"type": "function", "function": {"name": "noop", "parameters": {"type": "object", "properties": {},
                                                                      "additionalProperties": False}}},
]
MESSAGES = [{"role": "user", "content": "Plan a trip"}]


def test_response_format_json_schema(server):
    client = server.client()
    for seed in range(3):
        c = client.chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=60, temperature=1.0, seed=seed,
            response_format={"type": "json_schema", "json_schema": {"name": "trip", "schema": SCHEMA, "strict": True}})
        assert c.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(c.choices[0].message.content), SCHEMA)
    c = client.completions.create(model=MODEL, prompt="x", max_tokens=60, temperature=1.0, seed=1,
                                  extra_body={"guided_json": SCHEMA})
    jsonschema.validate(json.loads(c.choices[0].text), SCHEMA)


def test_guided_regex_and_choice(server):
    client = server.client()
    c = client.completions.create(model=MODEL, prompt="x", max_tokens=20, temperature=1.0, seed=2,
                                  extra_body={"guided_regex": r"[a-c]{3}-\d{2}"})
    assert re.fullmatch(r"[a-c]{3}-\d{2}", c.choices[0].text)
    c = client.completions.create(model=MODEL, prompt="x", max_tokens=20, temperature=1.0, seed=2, n=3,
                                  extra_body={"guided_choice": ["yes", "no"]})
    assert all(ch.text in ("yes", "no") for ch in c.choices)


@pytest.mark.parametrize("body, words", [
    ({"guided_regex": "a(b"}, ["guided_regex", "regex", "unclosed group"]),
    ({"guided_json": {"type": "nope"}}, ["guided_json", "nope"]),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, ["schema"]),
    ({"guided_regex": "a", "guided_choice": ["a"]}, ["only one"]),
])
def test_invalid_constraint_400(server, body, words):
    r = server.http().post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 4, **body})
    assert r.status_code == 400, r.text
    message = r.json()["error"]["message"]
    assert all(w in message for w in words), message


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_tool_call_and_stream(server, tool_choice):
    client = server.client()
    kw = dict(model=MODEL, messages=MESSAGES, tools=TOOLS, tool_choice=tool_choice, max_tokens=80,
              temperature=1.0, seed=4)
    c = client.chat.completions.create(**kw)
    choice = c.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    if isinstance(tool_choice, dict):
        assert call.function.name == "get_weather"
    tool = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}[call.function.name]
    jsonschema.validate(json.loads(call.function.arguments), tool)

    chunks = list(client.chat.completions.create(**kw, stream=True))
    name, args, finish = None, "", None
    for ch in chunks:
        for d in ch.choices:
            for tc in d.delta.tool_calls or []:
                name = tc.function.name or name
                args += tc.function.arguments or ""
            finish = d.finish_reason or finish
    assert (name, args) == (call.function.name, call.function.arguments)  # same seed, same call
    assert finish == "tool_calls"


def test_tool_choice_errors(server):
    r = server.http().post("/v1/chat/completions", json={
        "model": MODEL, "messages": MESSAGES, "tools": TOOLS,
        "tool_choice": {"type": "function", "function": {"name": "missing"}}})
    assert r.status_code == 400 and "missing" in r.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError):
        server.client().chat.completions.create(model=MODEL, messages=MESSAGES, tool_choice="required")
