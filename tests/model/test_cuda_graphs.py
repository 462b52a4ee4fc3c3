"""The padded static-buffer decode path behind CUDA graphs: padding rows must not change the
real rows' hidden states nor touch any request's KV. On CPU the path runs eagerly; on a GPU
the captured graphs replay it."""

import pytest
import torch

from tokenmill import LLM, SamplingParams
from tokenmill.model.cuda_graphs import DecodeGraphs, batch_ladder
from tokenmill.step import ScheduledSeq


def test_batch_ladder():
    assert batch_ladder(1) == [1]
    assert batch_ladder(20) == [1, 2, 4, 8, 16, 20]
    assert batch_ladder(64)[-3:] == [48, 56, 64]


def _decode_segments(llm, prompts):
    """Prefill the prompts, then return one decode segment per request (its next position)."""
    engine = llm.engine
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))
    engine.step()  # every prompt prefilled in one step, first tokens sampled
    reqs = sorted(engine.scheduler.running, key=lambda r: int(r.request_id))
    for r in reqs:  # room for the next token's KV
        assert engine.kv.allocate_slots(r, 1)
    return reqs, [ScheduledSeq(list(r.block_ids), r.num_computed_tokens, [r.output_token_ids[-1]]) for r in reqs]


@pytest.mark.parametrize("capture", [False] + ([True] if torch.cuda.is_available() else []))
def test_padded_decode_equals_plain_forward(tiny_models, capture):
    _, loaded = tiny_models("llama")
    device = "cuda" if capture else "cpu"
    llm = LLM("tiny", loaded=loaded, block_size=8, num_kv_blocks=64, device=device, dtype="float32",
              enforce_eager=True)
    runner = llm.engine.runner
    prompts = [[5 + i] * (3 + 7 * i) for i in range(5)]  # 5 requests: padded up to 8
    _, segments = _decode_segments(llm, prompts)
    graphs = DecodeGraphs(runner, max_batch=8, max_blocks_per_seq=16, capture=capture)
    assert graphs.fits(segments)
    pool_before = runner.kv_caches[:, :, : runner.scratch_block].clone()
    padded = graphs.run(segments).clone()
    pool_after_padded = runner.kv_caches[:, :, : runner.scratch_block].clone()
    # The plain path writes the same slots with the same values.
    plain = runner.forward(segments)
    torch.testing.assert_close(padded, plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(runner.kv_caches[:, :, : runner.scratch_block], pool_after_padded, rtol=1e-5, atol=1e-5)
    # Exactly the 5 new slots changed: the padding rows wrote into the scratch block only.
    changed = (pool_after_padded != pool_before).any(dim=-1).any(dim=0).any(dim=0)  # [blocks, kv_heads, bs]
    assert int(changed.any(dim=1).sum()) == 5


def test_engine_with_padded_decode_path_matches_plain_engine(tiny_models):
    """A whole generation with every decode step through the padded path (eager on CPU)."""
    _, loaded = tiny_models("llama")
    prompts = [[7] * 5, [9, 3, 4] * 6, list(range(2, 40))]
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    want = [o.outputs[0].token_ids for o in LLM("tiny", loaded=loaded, block_size=8, num_kv_blocks=64).generate(prompts, params)]
    llm = LLM("tiny", loaded=loaded, block_size=8, num_kv_blocks=64, debug_checks=True)
    runner = llm.engine.runner
    runner.decode_graphs = DecodeGraphs(runner, max_batch=4, max_blocks_per_seq=16, capture=False)
    calls = []
    run = runner.decode_graphs.run
    runner.decode_graphs.run = lambda segs: calls.append(len(segs)) or run(segs)
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    assert got == want
    assert len(calls) >= 25 and set(calls) <= {1, 2, 3}
    assert llm.engine.kv.num_free_blocks == llm.engine.kv.num_blocks


def test_graphs_do_not_keep_the_kv_pool_alive(tiny_models):
    """runner -> graphs -> runner would be a cycle: the pool would outlive `del llm` until the GC
    runs, and on a GPU the next model would not fit."""
    import gc
    import weakref

    _, loaded = tiny_models("llama")
    llm = LLM("tiny", loaded=loaded, block_size=8, num_kv_blocks=16)
    runner = llm.engine.runner
    runner.decode_graphs = DecodeGraphs(runner, max_batch=4, max_blocks_per_seq=8, capture=False)
    pool = weakref.ref(runner.kv_caches)
    del llm, runner
    gc.disable()
    try:
        assert pool() is None
    finally:
        gc.enable()


def test_profiling_forward_fits_the_context(tiny_models):
    """The largest step is profiled as segments no longer than the context (RoPE has no
    positions past it), each on its own blocks."""
    from tokenmill.config import EngineConfig
    from tokenmill.build import profile_forward, profile_segments
    from tokenmill.model.llama import LlamaForCausalLM

    segments, blocks = profile_segments(100, 64, 16)
    assert [len(s.token_ids) for s in segments] == [64, 36]
    assert [s.block_ids for s in segments] == [[0, 1, 2, 3], [4, 5, 6, 7]] and blocks == 8
    _, loaded = tiny_models("llama")
    model = LlamaForCausalLM(loaded.config, loaded.weights, max_positions=64)
    config = EngineConfig.from_flat(max_num_batched_tokens=200, block_size=16)
    assert profile_forward(model, config, 64) > 0  # runs: positions stay below 64
