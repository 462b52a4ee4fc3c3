"""The memory model's KV pool for the default model equals what the engine allocates."""

import pytest

from tokenmill.config import EngineConfig
from tokenmill.plan.catalog import hardware, model_shape
from tokenmill.plan.memory import block_bytes, cpu_pool_blocks, gpu_plan


@pytest.mark.slow
def test_predicted_pool_equals_the_engines(small_engine, engine_settings):
    config = EngineConfig.from_flat(**engine_settings)
    # The catalog's shape, not the loaded config: the catalog must describe the model right.
    assert cpu_pool_blocks(model_shape("smollm2-135m"), config) == small_engine.kv.num_blocks == 10  # bfloat16 KV


def test_predicted_pool_of_the_default_budget():
    # 512 MiB over 2 x 30 layers x 3 KV heads x 64 x 2 bytes (bfloat16 KV on CPU) x 16 tokens
    assert cpu_pool_blocks(model_shape("smollm2-135m"), EngineConfig()) == 512 * 2**20 // 368_640
    # int8: 68 bytes per 64 values (the row's scale)
    int8 = EngineConfig.from_flat(kv_cache_dtype="int8")
    assert cpu_pool_blocks(model_shape("smollm2-135m"), int8) == 512 * 2**20 // (2 * 30 * 3 * 68 * 16)


def test_kv_bytes_per_token_formula():
    shape = model_shape("llama-3.1-8b")
    # 2 x 32 layers x 8 KV heads x 128 x 2 bytes = 128 KiB per token in bf16
    assert shape.kv_bytes_per_token(2) == 131072
    assert block_bytes(shape, 16, 2) == 16 * 131072
    assert block_bytes(shape, 16, 2, tp=8) == 2 * 131072  # one KV head per chip


def test_params_of_known_models():
    # Published sizes: Llama-3.1-8B 8.03B, 70B 70.6B, 405B 405.9B; Mixtral-8x7B 46.7B total, 12.9B active.
    assert round(model_shape("llama-3.1-8b").params_total / 1e9, 2) == 8.03
    assert round(model_shape("llama-3.1-70b").params_total / 1e9, 1) == 70.6
    assert round(model_shape("llama-3.1-405b").params_total / 1e9) == 406
    moe = model_shape("mixtral-8x7b")
    assert round(moe.params_total / 1e9, 1) == 46.7
    assert round(moe.body_params_active / 1e9 + moe.embedding_params / 1e9 * 2, 1) == 12.9


def test_gpu_plan_leaves_room_only_when_weights_fit():
    shape, h100 = model_shape("llama-3.1-70b"), hardware("H100")
    assert not gpu_plan(shape, h100, tp=1, weight_format="bf16").fits  # 141 GB of weights on 80 GB
    plan = gpu_plan(shape, h100, tp=4, weight_format="bf16")
    assert plan.fits and plan.kv_budget == pytest.approx(
        plan.capacity - plan.weights - plan.activations - plan.reserved)
    assert gpu_plan(shape, h100, tp=4, weight_format="fp8").num_blocks > plan.num_blocks
