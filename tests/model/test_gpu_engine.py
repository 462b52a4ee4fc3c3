"""The engine on a CUDA GPU (skipped without one; scripts/gpu_check.sh runs it): float32
greedy decoding token-identical to the CPU path, CUDA-graph replay identical to eager, bf16
agreement reported."""

import pytest
import torch

from tests.tiny import REFERENCE_MAX_TOKENS, reference_prompts
from tokenmill import LLM, SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

PARAMS = SamplingParams(temperature=0, max_tokens=REFERENCE_MAX_TOKENS, ignore_eos=True)


def _tokens(loaded, **config):
    llm = LLM("tiny", loaded=loaded, block_size=8, num_kv_blocks=128, max_num_batched_tokens=32, **config)
    outs = llm.generate(reference_prompts(), PARAMS)
    assert llm.engine.kv.num_free_blocks == llm.engine.kv.num_blocks
    return [o.outputs[0].token_ids for o in outs], llm


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_float32_greedy_matches_cpu(arch, tiny_models):
    _, loaded = tiny_models(arch)
    cpu, _ = _tokens(loaded, device="cpu", dtype="float32")
    eager, _ = _tokens(loaded, device="cuda", dtype="float32", enforce_eager=True)
    graphs, llm = _tokens(loaded, device="cuda", dtype="float32")
    assert llm.engine.runner.decode_graphs is not None and llm.engine.runner.decode_graphs.graphs
    assert eager == cpu
    assert graphs == eager


def test_bfloat16_greedy_mostly_agrees(tiny_models, capsys):
    _, loaded = tiny_models("llama")
    cpu, _ = _tokens(loaded, device="cpu", dtype="float32")
    bf16, _ = _tokens(loaded, device="cuda")  # auto: bfloat16 on CUDA
    same = total = 0
    for a, b in zip(cpu, bf16):
        # Count the common prefix: after the first difference the sequences diverge by design.
        n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
        same, total = same + n, total + len(a)
    with capsys.disabled():
        print(f"\nbf16 GPU vs float32 CPU greedy: {same}/{total} tokens before the first divergence")
    assert same >= total // 2


def test_sampling_on_the_gpu_is_seeded_and_batch_independent(tiny_models):
    """The sampler runs on the logits' device (generators there too): a seeded request gives
    the same tokens twice, alone or in a crowd; penalties and top-k/top-p run there as well."""
    _, loaded = tiny_models("llama")
    llm = LLM("tiny", loaded=loaded, block_size=8, num_kv_blocks=128, device="cuda", dtype="float32")
    seeded = SamplingParams(temperature=0.9, top_k=20, top_p=0.9, repetition_penalty=1.1, max_tokens=16,
                            ignore_eos=True, seed=7)
    prompt, crowd = reference_prompts()[0], reference_prompts()[1:]
    alone = llm.generate([prompt], seeded)[0].outputs[0].token_ids
    mixed = llm.generate([prompt] + crowd, [seeded] + [SamplingParams(temperature=1.0, max_tokens=16)] * len(crowd))
    assert mixed[0].outputs[0].token_ids == alone
    assert len(alone) == 16 and all(0 <= t < loaded.config.vocab_size for t in alone)
    assert llm.engine.kv.num_free_blocks == llm.engine.kv.num_blocks


@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_float32_speculative_greedy_matches_plain_on_the_gpu(method, tiny_models):
    _, loaded = tiny_models("llama")
    plain, _ = _tokens(loaded, device="cuda", dtype="float32")
    spec, llm = _tokens(loaded, device="cuda", dtype="float32", speculative_method=method,
                        draft_loaded=loaded if method == "draft" else None, speculative_disable_by_batch_size=8)
    assert spec == plain
    assert llm.engine.stats.spec_num_accepted_tokens > 0
