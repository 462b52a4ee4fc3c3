"""/v1/tokenmill/info says what the KV pool holds and in what: the dtype "auto" resolved to
(bfloat16 on a CPU) and its tokens; an int8 server says int8 and answers completions."""

from __future__ import annotations

from tests.server.conftest import MODEL, LiveServer, make_engine
from tokenmill.server.app import create_app


def info_limits(live: LiveServer) -> dict:
    with live.http() as http:
        r = http.get("/v1/tokenmill/info")
    assert r.status_code == 200
    (model,) = r.json()["models"]
    return model["limits"]


def test_default_server_reports_a_bfloat16_pool(server, engine):
    limits = info_limits(server)
    assert limits["kv_cache_dtype"] == "bfloat16"
    assert limits["kv_cache_tokens"] == engine.engine.kv.num_blocks * engine.block_size == limits["num_kv_blocks"] * 16
    assert str(engine.engine.runner.kv_caches.dtype) == "torch.bfloat16"


def test_int8_server_reports_int8_and_completes(tiny_loaded):
    engine = make_engine(tiny_loaded, kv_cache_dtype="int8")
    live = LiveServer(create_app({MODEL: engine}, api_keys=["sk-int8"]))
    try:
        with live.http("sk-int8") as http:
            r = http.get("/v1/tokenmill/info")
            assert r.json()["models"][0]["limits"]["kv_cache_dtype"] == "int8"
        out = live.client("sk-int8").completions.create(model=MODEL, prompt="hello there", max_tokens=5, temperature=0)
        assert out.usage.completion_tokens == 5 or out.choices[0].finish_reason == "stop"
    finally:
        live.stop()
        engine.shutdown()
