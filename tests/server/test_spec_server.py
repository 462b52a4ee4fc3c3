"""A speculating server (prompt lookup) through the real openai client: the same greedy text
as a plain server, streamed in pieces of several tokens, and vLLM's spec-decode metrics."""

import pytest

from tests.server.conftest import MODEL, LiveServer, make_engine, wait_pool_whole
from tests.server.checks import metric
from tokenmill.server.app import create_app

PROMPT = "The quick brown fox jumps over the lazy dog. The quick brown fox jumps over the lazy dog. The quick"


@pytest.fixture(scope="module")
def spec_engine(tiny_loaded):
    engine = make_engine(tiny_loaded, speculative_method="ngram", num_speculative_tokens=4)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def spec_server(spec_engine):
    live = LiveServer(create_app({MODEL: spec_engine}))
    yield live
    live.stop()


def test_streamed_text_equals_plain_server_and_metrics_count_drafts(spec_server, spec_engine, server):
    args = dict(model=MODEL, prompt=PROMPT, max_tokens=48, temperature=0, extra_body={"ignore_eos": True})
    plain = server.client().completions.create(**args).choices[0].text
    before = spec_server.http(api_key=None).get("/metrics").text
    pieces = [c.choices[0].text for c in spec_server.client().completions.create(stream=True, **args)]
    assert "".join(pieces) == plain
    after = spec_server.http(api_key=None).get("/metrics").text
    drafted = metric(after, "vllm:spec_decode_num_draft_tokens_total") - metric(
        before, "vllm:spec_decode_num_draft_tokens_total")
    accepted = metric(after, "vllm:spec_decode_num_accepted_tokens_total") - metric(
        before, "vllm:spec_decode_num_accepted_tokens_total")
    assert drafted > 0 and 0 < accepted <= drafted
    assert metric(after, "vllm:spec_decode_num_accepted_tokens_per_pos_total", position="0") > 0
    assert metric(after, "vllm:spec_decode_num_accepted_tokens_per_pos_total") == metric(
        after, "vllm:spec_decode_num_accepted_tokens_total")
    wait_pool_whole(spec_engine)


def test_plain_server_has_no_spec_metrics(server):
    assert "spec_decode" not in server.http().get("/metrics").text
