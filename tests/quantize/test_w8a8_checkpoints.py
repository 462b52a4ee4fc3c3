"""The W8A8 checkpoints vLLM users bring, made by llm-compressor's own library: the default model
(its GGUF dequantized) compressed by the `compressed-tensors` package as int8 W8A8 (`int-quantized`,
per channel) and FP8 (`float-quantized`, per channel and per tensor), then loaded by tokenmill: each
linear runs its kernel on the file's values, perplexity on the held-apart evaluation text stays
close to the float model's, and the int8 one answers through the real server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.model.real import perplexity, sequence_logits
from tests.quantize.test_formats import compressed_by_the_package
from tokenmill.config import EngineConfig
from tokenmill.model.fp8 import Fp8Linear
from tokenmill.model.llama import LlamaForCausalLM
from tokenmill.model.loader import load_model
from tokenmill.model.quant import Int8Linear, make_linear
from tokenmill.quantize.checkpoint import hf_config, write_tokenizer
from tokenmill.quantize.pipeline import float_weights

pytestmark = pytest.mark.slow  # the default model written three times, four evaluation prefills
EVAL = Path(__file__).parent / "data" / "eval.txt"
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def source():
    lm = load_model("smollm2")
    return lm, float_weights(lm.weights)


def write(out: Path, source, preset: str) -> Path:
    lm, weights = source
    tensors, cfg = {}, None
    for name, w in weights.items():
        if name.rsplit(".", 2)[-2] in LINEARS:
            t, cfg = compressed_by_the_package(w, preset)
            t.pop("x.decompressed")
            tensors |= {name[: -len("weight")] + k[2:]: v.contiguous() for k, v in t.items()}
        else:
            tensors[name] = w.to(torch.float16).contiguous()
    out.mkdir()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf_config(lm.config) | {"quantization_config": cfg}), encoding="utf-8")
    write_tokenizer(out, lm.tokenizer)
    return out


def model(path: str, quantization: str = "auto") -> LlamaForCausalLM:
    lm = load_model(path)
    return LlamaForCausalLM(lm.config, lm.weights, torch.float32,
                            lambda w, b: make_linear(w, b, torch.float32, quantization, 32), max_positions=2048)


@pytest.fixture(scope="module")
def float_reference(source):
    ids = source[0].tokenizer.encode(EVAL.read_text(encoding="utf-8"))
    return ids, sequence_logits(model("smollm2", "none"), ids)


@pytest.fixture(scope="module")
def own_fp8_perplexity(float_reference):
    """tokenmill's own --quantization fp8 of the same float weights (per-channel e4m3 W8A8)."""
    ids, _ = float_reference
    return perplexity(sequence_logits(model("smollm2", "fp8"), ids), ids)


# int8 W8A8 keeps the model (measured +0.31%, agreement 0.975). e4m3 keeps 3 mantissa bits: on
# this model the e4m3 weights alone cost +1.5% (per tensor) to +2.9% (per channel) and W8A8 FP8
# +2.2% / +3.1%, so FP8 is held to what tokenmill's own fp8 of the same weights gives (+4.7%).
@pytest.mark.parametrize("preset,kernel", [("W8A8", Int8Linear), ("FP8_DYNAMIC", Fp8Linear), ("FP8", Fp8Linear)])
def test_checkpoint_runs_its_kernel_close_to_float(tmp_path, source, float_reference, own_fp8_perplexity, preset, kernel):
    path = write(tmp_path / preset, source, preset)
    m = model(str(path))
    layer = m.layers[0]
    assert type(layer.self_attn.o_proj) is kernel and type(layer.mlp.down) is kernel
    ids, logits_f = float_reference
    logits_q = sequence_logits(m, ids)
    ppl_f, ppl_q = perplexity(logits_f, ids), perplexity(logits_q, ids)
    agree = (logits_f.argmax(-1) == logits_q.argmax(-1)).float().mean().item()
    print(f"{preset}: perplexity {ppl_q:.3f} vs float {ppl_f:.3f} ({ppl_q / ppl_f - 1:+.2%}), agreement {agree:.3f}; "
          f"own fp8 {own_fp8_perplexity:.3f}")
    if kernel is Int8Linear:
        assert ppl_q < ppl_f * 1.01 and agree >= 0.95
    else:
        assert ppl_q <= own_fp8_perplexity and agree >= 0.9


def test_w8a8_checkpoint_serves_through_the_server(tmp_path, source):
    from tests.server.conftest import KEY, LiveServer
    from tokenmill.build import build_async_engine
    from tokenmill.server.app import create_app

    path = write(tmp_path / "w8a8", source, "W8A8")
    engine = build_async_engine(EngineConfig.from_flat(model=str(path), num_kv_blocks=64))
    engine.start()
    live = LiveServer(create_app({"w8a8": engine}, api_keys=[KEY]))
    try:
        chat = live.client().chat.completions.create(
            model="w8a8", messages=[{"role": "user", "content": "What is the capital of France?"}], max_tokens=16,
            temperature=0)
        assert "Paris" in chat.choices[0].message.content
    finally:
        live.stop()
        engine.shutdown()
