"""The engine's KV pool per --kv-cache-dtype: the same memory budget holds twice the float32
tokens at 16 bits and about 3.8x at int8 (a 4-byte scale per 64 values), the pool tensor is
allocated in that dtype within the budget, and every dtype generates."""

from __future__ import annotations

import pytest
import torch

from tokenmill.build import build_engine
from tokenmill.config import EngineConfig
from tokenmill.llm import LLM
from tokenmill.sampling import SamplingParams

BUDGET = 4 * 2**20


@pytest.fixture(scope="module")
def loaded(tiny_models):
    return tiny_models("llama")[1]


def pool(loaded, kv_cache_dtype: str):
    engine = build_engine(EngineConfig.from_flat(kv_cache_memory_bytes=BUDGET, kv_cache_dtype=kv_cache_dtype), loaded)
    return engine.kv.num_blocks, engine.runner.kv_caches


def test_the_same_memory_holds_more_tokens_in_a_narrower_pool(loaded):
    cfg = loaded.config
    blocks = {name: pool(loaded, name) for name in ("float32", "auto", "float16", "int8")}
    f32_blocks, f32_pool = blocks["float32"]
    assert f32_pool.dtype == torch.float32
    # auto on a CPU: bfloat16, twice the tokens (up to the block that flooring loses).
    auto_blocks, auto_pool = blocks["auto"]
    assert auto_pool.dtype == torch.bfloat16 and blocks["float16"][1].dtype == torch.float16
    assert auto_blocks in (2 * f32_blocks, 2 * f32_blocks + 1) and blocks["float16"][0] == auto_blocks
    int8_blocks, int8_pool = blocks["int8"]
    assert int8_pool.dtype == torch.int8 and int8_pool.shape[-1] == cfg.head_dim + 4
    ratio = int8_blocks / f32_blocks
    assert abs(ratio - 4 * cfg.head_dim / (cfg.head_dim + 4)) < 0.1, ratio
    for num_blocks, kv in blocks.values():
        # The pool spends the budget: all but less than a block of it, plus the scratch block.
        per_block = kv.nbytes // (num_blocks + 1)
        assert BUDGET - per_block < num_blocks * per_block <= BUDGET


@pytest.mark.parametrize("kv_cache_dtype", ["bfloat16", "int8"])
def test_generation_over_a_narrow_pool_follows_the_float_pool(loaded, kv_cache_dtype):
    # A tiny random model: its greedy text over a rounded KV may drift late, so compare the
    # first tokens only, and check every request finishes.
    prompts = [[1, 5, 9, 13, 2, 7] * 4, [3, 3, 4, 8]]
    greedy = SamplingParams(temperature=0, max_tokens=8)

    def run(dtype):
        llm = LLM(loaded=loaded, kv_cache_memory_bytes=BUDGET, kv_cache_dtype=dtype)
        return [o.outputs[0].token_ids for o in llm.generate(prompts, greedy)]

    ref, got = run("float32"), run(kv_cache_dtype)
    assert all(len(t) == 8 for t in got)
    assert [t[:2] for t in got] == [t[:2] for t in ref]


def test_an_unknown_kv_dtype_is_refused_by_name():
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        EngineConfig.from_flat(kv_cache_dtype="fp8_e4m3")


def test_serve_flag():
    from tokenmill.cli import build_parser, engine_config

    assert engine_config(build_parser().parse_args(["serve"])).cache.kv_cache_dtype == "auto"
    assert engine_config(build_parser().parse_args(["serve", "--kv-cache-dtype", "int8"])).cache.kv_cache_dtype == "int8"
