"""AsyncEngine: concurrent streams, bad requests, disconnects, and the periodic stats line."""

import asyncio
import logging

from tests.engine.helpers import assert_pool_whole
from tokenmill import EngineConfig, SamplingParams
from tokenmill.engine import async_engine as ae_mod
from tokenmill.build import build_async_engine


def test_streams_errors_disconnect_and_stats_log(tiny_models, caplog, monkeypatch):
    _, loaded = tiny_models("llama")
    monkeypatch.setattr(ae_mod, "STATS_LOG_INTERVAL_S", 0.0)
    engine = build_async_engine(EngineConfig.from_flat(model="tiny", num_kv_blocks=64), loaded)

    async def main():
        async def one(i):
            texts = []
            p = SamplingParams(temperature=0.8, seed=i, max_tokens=10, ignore_eos=True)
            async for out in engine.generate([5, 6, 7, i + 8], p, f"r{i}"):
                texts.append(out.outputs[0].token_ids)
            assert out.finished and len(texts[-1]) == 10
            return texts[-1]

        results = await asyncio.gather(*[one(i) for i in range(4)])
        assert len({tuple(r) for r in results}) > 1
        try:
            async for _ in engine.generate([5] * 600, SamplingParams(max_tokens=10), "bad"):
                pass
        except ValueError as e:
            assert "maximum context length" in str(e)
        else:
            raise AssertionError("too-long prompt accepted")
        stream = engine.generate([1, 2, 3], SamplingParams(max_tokens=200, ignore_eos=True), "gone")
        async for _ in stream:
            break
        await stream.aclose()  # the client went away
        for _ in range(100):
            if not engine.engine.has_unfinished:
                break
            await asyncio.sleep(0.01)

    with caplog.at_level(logging.INFO, logger="tokenmill"):
        asyncio.run(main())
    engine.shutdown()
    assert not engine.engine.has_unfinished
    assert_pool_whole(engine.engine)
    assert any("prefix cache hit rate" in r.getMessage() for r in caplog.records)
