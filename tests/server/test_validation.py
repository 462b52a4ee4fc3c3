"""OpenAI-strict validation over real HTTP: per-role message rules, content parts, every
numeric range, the limits, and the OpenAPI schema that states them. Each bad body is a 400 in
OpenAI's shape whose `param` names the offending parameter."""

from __future__ import annotations

import threading
import time

import jsonschema
import pytest

from tests.server.checks import assert_openai_error
from tests.server.conftest import MODEL
from tokenmill.server import serving

PROMPT = "The quick brown fox"
USER = {"role": "user", "content": "hi"}
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}


def chat(server, messages, **extra):
    return server.http().post("/v1/chat/completions", json={"model": MODEL, "messages": messages, "max_tokens": 2,
                                                            **extra})


def complete(server, **extra):
    return server.http().post("/v1/completions", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 2, **extra})


# -- messages ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "messages, param, code",
    [
        ([{"role": "user"}], "messages[0].content", "missing_required_parameter"),
        ([{"role": "system"}, USER], "messages[0].content", "missing_required_parameter"),
        ([{"role": "developer"}, USER], "messages[0].content", "missing_required_parameter"),
        ([{"role": "user", "content": None}], "messages[0].content", "invalid_type"),
        ([{"role": "user", "content": {"text": "hi"}}], "messages[0].content", "invalid_type"),
        ([USER, {"role": "tool", "content": "18C"}], "messages[1].tool_call_id", "missing_required_parameter"),
        ([USER, {"role": "assistant"}], "messages[1].content", "invalid_value"),
        ([USER, {"role": "assistant", "content": None, "tool_calls": []}], "messages[1].content", "invalid_value"),
        ([USER, {"role": "assistant", "tool_calls": [{"id": "c", "type": "function"}]}],
         "messages[1].tool_calls[0].function", "missing_required_parameter"),
        ([{"role": "wizard", "content": "hi"}], "messages[0].role", "invalid_value"),
        ([{"role": "function", "content": "hi"}], "messages[0].role", "invalid_value"),
        ([{"content": "hi"}], "messages[0].role", "missing_required_parameter"),
        ([{"role": "user", "content": [{"type": "text"}]}], "messages[0].content[0].text", "missing_required_parameter"),
        ([{"role": "user", "content": [{"type": "video", "video": {}}]}], "messages[0].content[0].type",
         "invalid_value"),
        ([{"role": "system", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}, USER],
         "messages[0].content[0].type", "invalid_value"),  # a system message takes text parts only
        ([{"role": "user", "content": "hi", "name": ""}], "messages[0].name", "string_below_min_length"),
        ([{"role": "user", "content": "hi", "name": "n" * 65}], "messages[0].name", "string_above_max_length"),
        ([], "messages", "array_below_min_length"),
    ],
)
def test_message_rules_400(server, messages, param, code):
    err = assert_openai_error(chat(server, messages), 400, param)
    assert err["code"] == code and err["type"] == "invalid_request_error", err
    assert param in err["message"], err


def test_unknown_role_named_in_message(roomy_server):
    server = roomy_server
    err = assert_openai_error(chat(server, [{"role": "wizard", "content": "hi"}]), 400, "messages[0].role")
    assert "'wizard'" in err["message"] and "'tool'" in err["message"] and "'developer'" in err["message"]
    huge = "r" * 100_000  # quoted back only in part
    err = assert_openai_error(chat(server, [{"role": huge, "content": "hi"}]), 400, "messages[0].role")
    assert len(err["message"]) < 400


@pytest.mark.parametrize("part, word", [
    ({"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}, "image"),
    ({"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}, "audio"),
    ({"type": "file", "file": {"file_id": "file-1"}}, "file"),
])
def test_media_parts_refused_clearly(server, part, word):
    messages = [{"role": "user", "content": [{"type": "text", "text": "look:"}, part]}]
    err = assert_openai_error(chat(server, messages), 400, "messages[0].content[1]")
    assert f"does not take {word} input" in err["message"] and err["code"] == "unsupported_content", err


@pytest.mark.parametrize("messages", [
    [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": [{"type": "text", "text": "hi"}]}],
    [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]}, {"role": "user", "content": "hi",
                                                                              "name": "alice_1"}],
    [USER, {"role": "assistant", "tool_calls": [CALL]}, {"role": "tool", "tool_call_id": "call_1", "content": "18C"}],
    [USER, {"role": "assistant", "content": None, "tool_calls": [CALL]},
     {"role": "tool", "tool_call_id": "call_1", "content": [{"type": "text", "text": "18C"}]}],
    [USER, {"role": "assistant", "content": [{"type": "refusal", "refusal": "no"}]}, USER],
    [USER, {"role": "assistant", "content": ""}, USER],
])
def test_valid_messages_served(server, messages):
    r = chat(server, messages)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["role"] == "assistant"


def test_tool_calls_reach_the_prompt(server, engine):
    """An assistant message that is only tool_calls still tells the model what it called."""
    from tokenmill.server.protocol import ChatCompletionRequest
    from tokenmill.server.serving import Serving

    req = ChatCompletionRequest.model_validate({"messages": [USER, {"role": "assistant", "tool_calls": [CALL]},
                                                             {"role": "tool", "tool_call_id": "call_1", "content": "18C"}]})
    messages = Serving.chat_messages(None, req)
    assert "get_weather" in messages[1]["content"] and messages[2]["tool_call_id"] == "call_1"


# -- numeric ranges and lists ------------------------------------------------------------


@pytest.mark.parametrize(
    "extra, param, code",
    [
        ({"temperature": 2.01}, "temperature", "decimal_above_max_value"),
        ({"temperature": -0.1}, "temperature", "decimal_below_min_value"),
        ({"top_p": 0}, "top_p", None),
        ({"top_p": 1.01}, "top_p", "decimal_above_max_value"),
        ({"presence_penalty": 2.5}, "presence_penalty", "decimal_above_max_value"),
        ({"frequency_penalty": -2.5}, "frequency_penalty", "decimal_below_min_value"),
        ({"n": 0}, "n", "integer_below_min_value"),
        ({"n": 129}, "n", "integer_above_max_value"),
        ({"best_of": 0}, "best_of", "integer_below_min_value"),
        ({"best_of": 21}, "best_of", "integer_above_max_value"),
        ({"best_of": 1, "n": 2}, "best_of", "invalid_value"),
        ({"best_of": 3, "n": 2}, "best_of", "unsupported_parameter"),
        ({"logprobs": 21}, "logprobs", "integer_above_max_value"),
        ({"logprobs": -1}, "logprobs", "integer_below_min_value"),
        ({"max_tokens": 0}, "max_tokens", "integer_below_min_value"),
        ({"seed": 2**63}, "seed", "integer_above_max_value"),
        ({"seed": 1.5}, "seed", None),
        ({"min_p": 1.5}, "min_p", None),
        ({"top_k": -2}, "top_k", None),
        ({"repetition_penalty": 0}, "repetition_penalty", None),
        ({"min_tokens": -1}, "min_tokens", None),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "array_above_max_length"),
        ({"stop": "s" * 257}, "stop", "string_above_max_length"),
        ({"stop": ["ok", "s" * 257]}, "stop[1]", "string_above_max_length"),
        ({"stop": ""}, "stop", "string_below_min_length"),
        ({"stop_token_ids": [10**6]}, "stop_token_ids", "invalid_value"),
        ({"stop_token_ids": [-1]}, "stop_token_ids[0]", None),
        ({"stop_token_ids": list(range(65))}, "stop_token_ids", "array_above_max_length"),
        ({"logit_bias": {"5": 101}}, "logit_bias.5", "decimal_above_max_value"),
        ({"logit_bias": {"five": 1}}, "logit_bias", None),
        ({"logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias", None),
        ({"logit_bias": {"99999999": 1}}, "logit_bias", "invalid_value"),
        ({"logit_bias": {"5": 1}}, "logit_bias", "unsupported_parameter"),
        ({"stream_options": {"include_usage": True}}, "stream_options", "invalid_value"),
        ({"prompt": [5, 10**6]}, "prompt", "invalid_value"),
        ({"prompt": [[5], []]}, "prompt[1]", None),
        # JSON booleans are not numbers (pydantic's lax mode took true as 1 and false as 0)
        ({"prompt": [[False]]}, "prompt[0][0]", "invalid_type"),
        ({"prompt": [True, 5]}, "prompt[0]", "invalid_type"),
        ({"max_tokens": True}, "max_tokens", "invalid_type"),
        ({"n": True}, "n", "invalid_type"),
        ({"seed": False}, "seed", "invalid_type"),
        ({"temperature": True}, "temperature", "invalid_type"),
        ({"logit_bias": {"5": True}}, "logit_bias.5", "invalid_type"),
        ({"guided_choice": []}, "guided_choice", None),
        ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice", None),
    ],
)
def test_completion_ranges_400(server, extra, param, code):
    err = assert_openai_error(complete(server, **extra), 400, param)
    if code is not None:
        assert err["code"] == code, err


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"top_logprobs": 21, "logprobs": True}, "top_logprobs"),
        ({"top_logprobs": 2}, "top_logprobs"),  # needs logprobs=true
        ({"max_completion_tokens": 0}, "max_completion_tokens"),
        ({"temperature": 3}, "temperature"),
        ({"tool_choice": "required"}, "tool_choice"),  # without tools
        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools[0].function.name"),
        ({"response_format": {"type": "json_schema"}}, "response_format"),
        ({"response_format": {"type": "xml"}}, "response_format.type"),
    ],
)
def test_chat_ranges_400(server, extra, param):
    assert_openai_error(chat(server, [USER], **extra), 400, param)


def test_boundaries_accepted(server):
    """The bounds themselves are valid, as OpenAI's are."""
    for extra in ({"temperature": 2, "top_p": 1, "presence_penalty": -2, "frequency_penalty": 2},
                  {"temperature": 0, "n": 2, "best_of": 2, "logprobs": 20, "seed": 2**63 - 1},
                  {"stop": ["a", "b", "c", "s" * 256], "logit_bias": {}, "stop_token_ids": [0]}):
        r = complete(server, **extra)
        assert r.status_code == 200, (extra, r.text)
    r = chat(server, [USER], logprobs=True, top_logprobs=20, stream=True, stream_options={"include_usage": True})
    assert r.status_code == 200, r.text


# -- limits -------------------------------------------------------------------------------


def test_prompt_longer_than_context_names_both_lengths(server):
    long = "fox " * 700
    for r in (complete(server, prompt=long), chat(server, [{"role": "user", "content": long}])):
        err = assert_openai_error(r, 400)
        assert err["code"] == "context_length_exceeded" and "512" in err["message"], err
        prompt_tokens = int(err["message"].split("(")[1].split(" ")[0])
        assert prompt_tokens > 512 and str(prompt_tokens) in err["message"]


def test_constraint_size_limits(roomy_server):
    server = roomy_server
    err = assert_openai_error(complete(server, guided_regex="a" * (64 * 1024 + 1)), 400, "guided_regex")
    assert err["code"] == "string_above_max_length"
    schema = {"type": "object", "properties": {f"p{i:05d}": {"type": "integer"} for i in range(4000)}}
    err = assert_openai_error(complete(server, guided_json=schema), 400, "guided_json")
    assert "limit" in err["message"]
    err = assert_openai_error(complete(server, guided_choice=["x" * 40] * 1025), 400, "guided_choice")


@pytest.mark.parametrize("extra", [
    {"guided_regex": "(a*)*b"}, {"guided_regex": "(a{1,1000}){1,1000}"}, {"guided_regex": "("},
    {"guided_regex": "(" * 2000 + "a" + ")" * 2000}, {"guided_grammar": "start: start start | \"a\""},
    {"guided_json": {"$ref": "#"}}, {"guided_json": {"type": "array", "minItems": 10**9}},
    {"guided_json": {"anyOf": [{"const": f"v{i}"} for i in range(2000)]}},
])
def test_pathological_constraints_answered_quickly(server, extra):
    """Refused with a 400 naming the field, or served; within seconds either way."""
    start = time.monotonic()
    r = complete(server, **extra)
    assert time.monotonic() - start < 15
    if r.status_code != 200:
        assert_openai_error(r, 400, next(iter(extra)))


def test_slow_compile_fails_that_request_only(server, engine, monkeypatch):
    """A constraint still compiling after the timeout is a 400 for its request; meanwhile the
    engine loop serves everyone else."""
    grammars = engine.engine.grammars
    real = grammars._compile
    release = threading.Event()

    def slow(spec):
        release.wait(20)
        return real(spec)

    monkeypatch.setattr(serving, "COMPILE_TIMEOUT_S", 1.0)
    monkeypatch.setattr(grammars, "_compile", slow)
    answers = {}
    regex = f"slow{time.monotonic_ns()}"  # not in the compile cache
    t = threading.Thread(target=lambda: answers.setdefault("slow", complete(server, guided_regex=regex)))
    t.start()
    time.sleep(0.2)
    start = time.monotonic()
    plain = complete(server, max_tokens=8, ignore_eos=True)
    assert plain.status_code == 200 and time.monotonic() - start < 5
    t.join(10)
    release.set()
    err = assert_openai_error(answers["slow"], 400, "guided_regex")
    assert err["code"] == "constraint_too_complex" and "1 s" in err["message"], err


# -- the schema ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def openapi(server):
    r = server.http().get("/openapi.json")
    assert r.status_code == 200
    return r.json()


def test_openapi_describes_bodies_answers_and_errors(openapi):
    paths = openapi["paths"]
    for path, model in (("/v1/completions", "CompletionRequest"), ("/v1/chat/completions", "ChatCompletionRequest")):
        op = paths[path]["post"]
        body = op["requestBody"]
        assert body["required"] and body["content"]["application/json"]["schema"]["$ref"].endswith(model)
        assert set(op["responses"]) == {"200", "400", "401", "404", "413", "429", "500", "503"}
        assert set(op["responses"]["200"]["content"]) == {"application/json", "text/event-stream"}
        assert op["responses"]["400"]["content"]["application/json"]["schema"]["$ref"].endswith("ErrorResponse")
        assert op["security"] == [{"apiKey": []}]
    assert "422" not in str(openapi) and "HTTPValidationError" not in openapi["components"]["schemas"]
    assert paths["/health"]["get"]["security"] == []
    request = openapi["components"]["schemas"]["CompletionRequest"]["properties"]
    assert request["temperature"]["anyOf"][0] == {"type": "number", "maximum": 2.0, "minimum": 0.0}
    assert request["n"]["maximum"] == 128 and request["logprobs"]["anyOf"][0]["maximum"] == 20
    messages = openapi["components"]["schemas"]["ChatCompletionRequest"]["properties"]["messages"]
    assert set(messages["items"]["discriminator"]["mapping"]) == {"system", "developer", "user", "assistant", "tool"}
    assert "tool_call_id" in openapi["components"]["schemas"]["ToolMessage"]["required"]


def _conforms(openapi, name: str, instance) -> None:
    jsonschema.validate(instance, {"$ref": f"#/components/schemas/{name}", "components": openapi["components"]})


def test_answers_conform_to_the_schema(server, openapi):
    _conforms(openapi, "CompletionResponse", complete(server, logprobs=2).json())
    _conforms(openapi, "ChatCompletionResponse", chat(server, [USER], logprobs=True, top_logprobs=2).json())
    for r in (chat(server, [{"role": "user"}]), server.http().get("/v1/nope"),
              server.http(api_key=None).post("/v1/completions", json={})):
        _conforms(openapi, "ErrorResponse", r.json())
    _conforms(openapi, "ModelList", server.http().get("/v1/models").json())
    with pytest.raises(jsonschema.ValidationError):  # the check can fail
        _conforms(openapi, "ErrorResponse", {"error": {"message": "x"}})
