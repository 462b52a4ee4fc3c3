"""Hypothesis-generated request bodies: whatever comes in, no 5xx, and the server stays whole."""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.server.conftest import MODEL, wait_pool_whole

ODD_TEXT = st.text(alphabet=st.characters(codec="utf-8"), max_size=40) | st.sampled_from(
    ["", "\x00", "\ud7ff", "🙂" * 30, "</s>", "<s>", "{{ 7*7 }}", "{% for x in y %}"])
NUMBERS = st.integers(min_value=-(2**70), max_value=2**70) | st.floats(allow_nan=False, allow_infinity=False) | \
    st.sampled_from([0, 1, -1, 2, 0.5, 128, 129, 2**63, 511, 10**30])
SCALARS = st.none() | st.booleans() | NUMBERS | ODD_TEXT
JSON = st.recursive(SCALARS, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(ODD_TEXT, kids, max_size=4),
                    max_leaves=12)

SAMPLING_FIELDS = ["model", "n", "temperature", "top_p", "top_k", "min_p", "stop", "seed", "presence_penalty",
                   "frequency_penalty", "repetition_penalty", "min_tokens", "ignore_eos", "stream",
                   "stream_options", "stop_token_ids", "max_tokens", "logprobs", "skip_special_tokens"]

# Small values stay likely so requests run (rather than only being refused); the fields are
# free to take any JSON value too.
SMALL = st.integers(min_value=-2, max_value=8) | st.floats(min_value=-1, max_value=2, allow_nan=False)


def body(extra_fields: list[str], required: dict):
    fields = st.dictionaries(st.sampled_from(SAMPLING_FIELDS + extra_fields), SMALL | JSON, max_size=6)
    return st.fixed_dictionaries(required).flatmap(lambda req: fields.map(lambda f: {**req, **f}))


MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool", "bot"]) | ODD_TEXT,
                                 "content": ODD_TEXT | JSON})
COMPLETION = body(["echo", "suffix", "prompt"], {"prompt": ODD_TEXT | st.lists(NUMBERS, max_size=5) | JSON})
CHAT = body(["messages", "top_logprobs", "max_completion_tokens", "logprobs"],
            {"messages": st.lists(MESSAGE, max_size=3) | JSON})

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _check(server, engine, path: str, payload) -> None:
    raw = json.dumps(payload).encode()
    with server.http() as http:
        r = http.post(path, content=raw, headers={"Content-Type": "application/json"})
        assert r.status_code < 500, (r.status_code, r.text[:500], payload)
        if r.status_code != 200:
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}


@SETTINGS
@given(COMPLETION)
def test_fuzz_completions(server, engine, payload):
    _check(server, engine, "/v1/completions", payload)


@SETTINGS
@given(CHAT)
def test_fuzz_chat(server, engine, payload):
    _check(server, engine, "/v1/chat/completions", payload)


@SETTINGS
@given(st.binary(max_size=200))
def test_fuzz_raw_bytes(server, engine, raw):
    with server.http() as http:
        r = http.post("/v1/completions", content=raw, headers={"Content-Type": "application/json"})
        assert r.status_code == 400, (r.status_code, r.text[:300])


def test_served_normally_after_fuzz(server, engine):
    with server.http() as http:
        r = http.post("/v1/completions", json={"model": MODEL, "prompt": "The quick", "max_tokens": 3})
        assert r.status_code == 200
    wait_pool_whole(engine)

