"""/v1/embeddings over real HTTP with the real all-MiniLM-L6-v2 (`minilm`), served beside a
generative model: the official `openai` client in both encodings, every input shape OpenAI
defines, the errors (unknown model, the wrong kind of model, dimensions, limits), and chat and
embedding requests running at the same time."""

from __future__ import annotations

import base64
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import openai
import pytest
import torch

from tests.server.conftest import KEY, MODEL, LiveServer
from tests.server.process import ServeProcess
from tokenmill.build import build_async_embedder
from tokenmill.llm import Encoder
from tokenmill.server.app import create_app

EMBED = "minilm"
TEXTS = ["The cat sits on the mat.", "A feline rests on a rug.", "Quarterly revenue rose by 12 percent."]


@pytest.fixture(scope="module")
def embedder():
    e = build_async_embedder(EMBED)
    e.start()
    yield e
    e.shutdown()


@pytest.fixture(scope="module")
def both(engine, embedder):
    """The tiny LLM and minilm in one server."""
    live = LiveServer(create_app({MODEL: engine, EMBED: embedder}, api_keys=[KEY]))
    yield live
    live.stop()


@pytest.fixture(scope="module")
def offline():
    return Encoder(EMBED)


def test_openai_client_both_encodings(both, offline):
    client = both.client()
    expected = offline.embed(TEXTS)
    # The client asks for base64 by default and decodes it itself.
    default = client.embeddings.create(model=EMBED, input=TEXTS)
    floats = client.embeddings.create(model=EMBED, input=TEXTS, encoding_format="float")
    for resp in (default, floats):
        assert [d.index for d in resp.data] == [0, 1, 2] and resp.model == EMBED
        got = torch.tensor([d.embedding for d in resp.data])
        assert got.shape == (3, 384)
        assert (got - expected).abs().max().item() <= 1e-6
    tokens = sum(len(ids) for ids in offline._embedder.encode_texts(TEXTS))
    assert default.usage.prompt_tokens == default.usage.total_tokens == tokens
    # the meaning is there: the paraphrase is closer than the unrelated sentence
    sims = got @ got.T
    assert sims[0, 1] > sims[0, 2] + 0.2


def test_base64_is_little_endian_float32(both, offline):
    with both.http() as http:
        r = http.post("/v1/embeddings", json={"model": EMBED, "input": TEXTS[0], "encoding_format": "base64"})
    assert r.status_code == 200, r.text
    body = r.json()
    vec = np.frombuffer(base64.b64decode(body["data"][0]["embedding"]), dtype="<f4")
    assert body["object"] == "list" and body["data"][0]["object"] == "embedding"
    assert np.abs(vec - offline.embed(TEXTS[0])[0].numpy()).max() <= 1e-6


def test_every_input_shape(both, offline):
    ids = [offline.tokenizer.backend.encode(t, add_special_tokens=False).ids for t in TEXTS]
    client = both.client()
    expected = offline.embed(TEXTS)
    # token ids count as the text they are: with the model's [CLS] and [SEP] around each
    n = [len(x) + 2 for x in ids]
    cases = [(TEXTS[0], expected[:1], n[0]), (TEXTS, expected, sum(n)), (ids[1], expected[1:2], n[1]),
             (ids, expected, sum(n))]
    for inp, want, tokens in cases:
        resp = client.embeddings.create(model=EMBED, input=inp, encoding_format="float")
        got = torch.tensor([d.embedding for d in resp.data])
        assert (got - want).abs().max().item() <= 1e-6, inp
        assert resp.usage.prompt_tokens == tokens


def test_metrics_per_model(both):
    with both.http() as http:
        before = _sample(http, "tokenmill:embedding_requests_total")
        r = http.post("/v1/embeddings", json={"model": EMBED, "input": ["one", "two"]})
        assert r.status_code == 200
        assert _sample(http, "tokenmill:embedding_requests_total") == before + 1
        assert _sample(http, "tokenmill:embedding_prompt_tokens_total") >= r.json()["usage"]["prompt_tokens"]


def _sample(http, name: str) -> float:
    prefix = f'{name}{{model_name="{EMBED}"}} '
    line = next((x for x in http.get("/metrics").text.splitlines() if x.startswith(prefix)), None)
    return float(line.removeprefix(prefix)) if line else 0.0


def test_dimensions(both):
    client = both.client()
    assert len(client.embeddings.create(model=EMBED, input="x", dimensions=384).data[0].embedding) == 384
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model=EMBED, input="x", dimensions=128)
    err = e.value.body
    assert err["param"] == "dimensions" and err["code"] == "unsupported_parameter" and "384" in err["message"]


def test_models_and_routing_errors(both):
    client = both.client()
    kinds = {m.id: m.kind for m in client.models.list().data}
    assert kinds == {MODEL: "generate", EMBED: "embedding"}
    with pytest.raises(openai.NotFoundError) as e:
        client.embeddings.create(model="nope", input="x")
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=EMBED, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert e.value.body["code"] == "model_kind_mismatch" and "embedding model" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model=MODEL, input="x")
    assert e.value.body["code"] == "model_kind_mismatch" and "/v1/embeddings" in e.value.body["message"]


@pytest.mark.parametrize("body, param, code", [
    ({"input": ["fine", "word " * 300]}, "input[1]", "context_length_exceeded"),
    ({"input": "word " * 300}, "input", "context_length_exceeded"),
    ({"input": ""}, "input", "string_below_min_length"),
    ({"input": []}, "input", None),
    ({"input": ["x"] * 2049}, "input", None),
    ({"input": [[1, 2], [10**7]]}, "input[1]", "invalid_value"),
    ({"input": "x", "encoding_format": "int8"}, "encoding_format", "invalid_value"),
    ({"input": "x", "dimensions": 0}, "dimensions", None),
    ({}, "input", "missing_required_parameter"),
])
def test_bad_requests_are_openai_400s(both, body, param, code):
    with both.http() as http:
        r = http.post("/v1/embeddings", json={"model": EMBED, **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    with both.http() as http:  # and the model still answers
        assert http.post("/v1/embeddings", json={"model": EMBED, "input": "ok"}).status_code == 200


def test_chat_and_embeddings_at_the_same_time(both, offline):
    client = both.client()
    expected = offline.embed(TEXTS)

    def chat(i):
        r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": f"hi {i}"}],
                                           max_tokens=8, temperature=0)
        return r.choices[0].finish_reason

    def embed(i):
        r = client.embeddings.create(model=EMBED, input=TEXTS[i % 3:] + TEXTS[:i % 3])
        return torch.tensor([d.embedding for d in r.data]), i

    with ThreadPoolExecutor(16) as pool:
        chats = [pool.submit(chat, i) for i in range(8)]
        embeds = [pool.submit(embed, i) for i in range(16)]
        assert all(f.result(timeout=120) in ("stop", "length") for f in chats)
        for f in embeds:
            got, i = f.result(timeout=120)
            want = torch.cat([expected[i % 3:], expected[:i % 3]])
            assert (got - want).abs().max().item() <= 1e-6


@pytest.mark.slow
def test_serve_smollm2_and_minilm_from_the_command_line():
    """`tokenmill serve --model smollm2 --model minilm=<dir>`: the real LLM and the real encoder."""
    from tokenmill.model.loader import encoder_model_path

    proc = ServeProcess("--model", "smollm2", "--model", f"embed={encoder_model_path()}", "--num-threads", "2")
    try:
        client = openai.OpenAI(base_url=proc.url + "/v1", api_key="none", max_retries=0, timeout=120)
        kinds = {m.id: m.kind for m in client.models.list().data}
        assert kinds == {"smollm2": "generate", "embed": "embedding"}
        with ThreadPoolExecutor(4) as pool:
            chat = pool.submit(client.chat.completions.create, model="smollm2", max_tokens=8, temperature=0,
                               messages=[{"role": "user", "content": "What is the capital of France?"}])
            emb = [pool.submit(client.embeddings.create, model="embed", input=TEXTS) for _ in range(3)]
            assert chat.result().choices[0].message.content
            assert all(len(f.result().data) == 3 for f in emb)
        assert proc.terminate() == 0
    finally:
        proc.kill()


@pytest.mark.parametrize("path, method, body", [
    ("/v1/embeddings", "POST", {"model": EMBED, "input": TEXTS, "encoding_format": "float"}),
    ("/v1/embeddings", "POST", {"model": EMBED, "input": [[7592, 2088]], "encoding_format": "base64"}),
    ("/v1/embeddings", "POST", {"model": EMBED, "input": "x", "dimensions": 7}),
    ("/v1/models", "GET", None),
    ("/v2/repository/index", "GET", None),
])
def test_answers_conform_to_the_schema(both, path, method, body):
    """A real embedding model's answers (the fuzz test's server has none) against the schema."""
    import httpx
    import schemathesis
    from schemathesis.checks import positive_data_acceptance

    served = httpx.get(both.url + "/openapi.json", headers={"Authorization": f"Bearer {KEY}"}).json()
    schema = schemathesis.openapi.from_dict(served)
    schema.config.update(base_url=both.url)
    kw = {"body": body, "media_type": "application/json"} if body is not None else {}
    case = schema[path][method].Case(**kw)
    r = case.call_and_validate(headers={"Authorization": f"Bearer {KEY}"}, timeout=30,
                               excluded_checks=[positive_data_acceptance])
    assert r.status_code == (400 if body and "dimensions" in body else 200), r.text
