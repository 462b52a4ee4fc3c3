"""The official openai client against a live server: completions, chat, streaming, n, stop, logprobs."""

from __future__ import annotations

import openai
import pytest

from tests.server.conftest import MODEL

PROMPT = "The quick brown fox"
MESSAGES = [{"role": "user", "content": "Paged attention keeps"}]


def test_models(server):
    models = server.client().models.list()
    assert [m.id for m in models.data] == [MODEL]


def test_completion_greedy_usage(server):
    c = server.client().completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0)
    assert c.object == "text_completion" and len(c.choices) == 1
    choice = c.choices[0]
    assert choice.finish_reason in ("stop", "length")
    assert c.usage.completion_tokens >= 1 and c.usage.prompt_tokens > 0
    assert c.usage.total_tokens == c.usage.prompt_tokens + c.usage.completion_tokens
    assert c.usage.prompt_tokens_details.cached_tokens >= 0
    again = server.client().completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0)
    assert again.choices[0].text == choice.text


def test_completion_stream_matches_greedy(server):
    client = server.client()
    full = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0,
                                     extra_body={"ignore_eos": True})
    stream = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, stream=True,
                                       stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    chunks = list(stream)
    text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    assert text == full.choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"


def test_completion_batch_and_n(server):
    c = server.client().completions.create(model=MODEL, prompt=[PROMPT, "def add(a, b):"], max_tokens=4, n=2,
                                           temperature=1.0, seed=7)
    assert sorted(ch.index for ch in c.choices) == [0, 1, 2, 3]
    assert c.usage.completion_tokens <= 4 * 4  # counted over all four choices
    token_prompt = server.client().completions.create(model=MODEL, prompt=[5, 6, 7, 8], max_tokens=3, temperature=0)
    assert token_prompt.usage.prompt_tokens == 4


def test_seed_reproducible(server):
    client = server.client()
    a = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=1.0, seed=1234)
    b = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=1.0, seed=1234)
    assert a.choices[0].text == b.choices[0].text


def test_stop_string(server):
    client = server.client()
    full = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    assert len(full) > 4
    stop = full[2:4]
    cut = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0, stop=[stop],
                                    extra_body={"ignore_eos": True}).choices[0]
    assert cut.finish_reason == "stop"
    assert cut.text == full[: full.index(stop)]


def test_completion_logprobs_and_echo(server):
    c = server.client().completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0, logprobs=3,
                                           echo=True, extra_body={"ignore_eos": True})
    choice = c.choices[0]
    assert choice.text.startswith(PROMPT)
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert all(v <= 0 for v in lp.token_logprobs)
    assert all(1 <= len(t) <= 3 for t in lp.top_logprobs)
    assert lp.text_offset[0] == len(PROMPT)
    # greedy: the sampled token is the most likely one
    assert all(abs(max(t.values()) - v) < 1e-4 for t, v in zip(lp.top_logprobs, lp.token_logprobs))


def test_chat(server):
    r = server.client().chat.completions.create(model=MODEL, messages=MESSAGES, max_completion_tokens=6,
                                                temperature=0)
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert isinstance(r.choices[0].message.content, str)
    assert r.usage.completion_tokens <= 6


def test_chat_stream_role_first_and_concat(server):
    client = server.client()
    kw = dict(model=MODEL, messages=MESSAGES, max_tokens=10, temperature=0, extra_body={"ignore_eos": True})
    full = client.chat.completions.create(**kw).choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == full
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 10
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"


def test_chat_n_and_logprobs(server):
    r = server.client().chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4, n=3, seed=3,
                                                logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1, 2]
    for c in r.choices:
        assert len(c.logprobs.content) == 4
        assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in c.logprobs.content)
    assert r.usage.completion_tokens == 12


def test_errors_are_client_exceptions(server):
    client = server.client()
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=PROMPT, temperature=-1)
    assert "temperature" in str(e.value)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=100_000)
    assert "100000" in str(e.value) and "512" in str(e.value)
    with pytest.raises(openai.NotFoundError) as e:  # OpenAI's model_not_found is a 404
        client.chat.completions.create(model="gpt-4", messages=MESSAGES)
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.AuthenticationError):
        server.client(api_key="wrong").models.list()
