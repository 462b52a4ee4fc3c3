"""Greedy output is token-identical to transformers' generate, however the batch is cut."""

import pytest

from tests.engine.helpers import assert_pool_whole
from tests.tiny import REFERENCE_MAX_TOKENS, REFERENCE_PROMPT_LENS, hf_greedy, reference_prompts
from tokenmill import LLM, SamplingParams
from tokenmill.model.quant import Int4Linear


@pytest.fixture(scope="module")
def references(tiny_models):
    cache = {}

    def get(arch):
        if arch not in cache:
            hf, _ = tiny_models(arch)
            cache[arch] = [hf_greedy(hf, p, REFERENCE_MAX_TOKENS) for p in reference_prompts()]
        return cache[arch]

    return get


SCENARIOS = {
    # everything at once: prompts fit one step's budget
    "roomy": dict(num_kv_blocks=256, max_num_batched_tokens=512),
    # budget smaller than most prompts: every long prompt is chunked, decodes mix with chunks
    "chunked": dict(num_kv_blocks=256, max_num_batched_tokens=16),
    # pool too small for all five at once: running requests get preempted and recomputed
    "preempting": dict(num_kv_blocks=14, max_num_batched_tokens=32, enable_prefix_caching=False),
    "preempting_cached": dict(num_kv_blocks=14, max_num_batched_tokens=32),
}


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_greedy_matches_transformers(arch, scenario, tiny_models, references):
    _, loaded = tiny_models(arch)
    llm = LLM("tiny", loaded=loaded, block_size=8, debug_checks=True, **SCENARIOS[scenario])
    params = SamplingParams(temperature=0, max_tokens=REFERENCE_MAX_TOKENS, ignore_eos=True)
    outs = llm.generate(reference_prompts(), params)
    for out, ref in zip(outs, references(arch)):
        assert out.outputs[0].token_ids == ref
        assert out.outputs[0].finish_reason == "length"
    if scenario.startswith("preempting"):
        assert llm.engine.stats.num_preemptions > 0
    assert_pool_whole(llm.engine)


@pytest.mark.parametrize("quantization", ["none", "int4"])
def test_batch_invariance(tiny_models, quantization):
    # int4: every row, prompt or generated, runs tokenmill's int4 kernel, whose result for a
    # row does not depend on the rows beside it (qkernels.py).
    _, loaded = tiny_models("llama")
    params = SamplingParams(temperature=0, max_tokens=REFERENCE_MAX_TOKENS, ignore_eos=True)
    llm = LLM("tiny", loaded=loaded, num_kv_blocks=256, max_num_batched_tokens=64, quantization=quantization)
    if quantization == "int4":
        assert isinstance(llm.engine.runner.model.layers[0].mlp.gate_up, Int4Linear)
    prompts = reference_prompts(seed=1)
    alone = [llm.generate([p], params)[0].outputs[0].token_ids for p in prompts]
    crowd = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    assert alone == crowd
    assert_pool_whole(llm.engine)


def test_bfloat16_runs_close_to_float32(tiny_models):
    _, loaded = tiny_models("llama")
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    f32 = LLM("tiny", loaded=loaded, num_kv_blocks=64).generate(reference_prompts(), params)
    bf16 = LLM("tiny", loaded=loaded, num_kv_blocks=64, dtype="bfloat16").generate(reference_prompts(), params)
    same = sum(a.outputs[0].token_ids[0] == b.outputs[0].token_ids[0] for a, b in zip(f32, bf16))
    # bf16 keeps ~3 significant digits: the first greedy token should nearly always agree.
    assert same >= len(REFERENCE_PROMPT_LENS) - 1
