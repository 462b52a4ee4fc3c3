import pytest

# One real engine serves the plan tests: building smollm2 dequantizes its GGUF (most of a
# minute on a loaded 2-core machine), so it is built once. Its KV budget is a memory size,
# not a block count, so the memory-model test checks the engine's own sizing; the budget is
# small (10 blocks of 368,640 bytes, bfloat16 KV, and change) so the scheduling test preempts.
SETTINGS = dict(kv_cache_memory_bytes=3_750_000, block_size=16, max_num_seqs=4, max_num_batched_tokens=48)


@pytest.fixture(scope="session")
def engine_settings():
    return dict(SETTINGS)


@pytest.fixture(scope="session")
def small_engine():
    """smollm2 on the CPU, one thread (the machine is shared: two threads oversubscribe it)."""
    from tokenmill.build import build_engine
    from tokenmill.config import EngineConfig

    return build_engine(EngineConfig.from_flat(**SETTINGS, num_threads=1))
