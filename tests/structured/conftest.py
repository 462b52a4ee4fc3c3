import pytest


@pytest.fixture(scope="session")
def llm():
    from tokenmill.llm import LLM

    return LLM("smollm2", dtype="bfloat16")


@pytest.fixture(autouse=True)
def pool_whole(request):
    yield
    if "llm" in request.fixturenames:
        engine = request.getfixturevalue("llm").engine
        assert not engine.has_unfinished
        assert engine.kv.num_free_blocks == engine.kv.num_blocks
