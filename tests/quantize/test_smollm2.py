"""`tokenmill quantize` on the real default model (SmolLM2-135M, its Q4_1 GGUF dequantized):
quality against the float model on an evaluation text kept apart from the calibration text,
and a written checkpoint served through the real HTTP server to the `openai` client."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.model.real import perplexity, sequence_logits
from tokenmill.config import EngineConfig
from tokenmill.model.llama import LlamaForCausalLM
from tokenmill.model.loader import load_model
from tokenmill.model.packed import GroupQuantWeight
from tokenmill.model.quant import Int4Linear, make_linear
from tokenmill.quantize.calibration import default_calibration_text

# Slow: five calibrated quantizations of 30 layers (about a minute each on 2 idle cores, many
# more on a busy one, hence the timeout).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]
EVAL = Path(__file__).parent / "data" / "eval.txt"
# GPTQ calibrates on the shipped text (~1,500 tokens) plus GENERATED tokens sampled from the
# model itself: on the shipped text alone it overfits (benchmarks/gptq_heldout.py: layer 3's
# down_proj at 3 bits, held-out output error 0.045 vs RTN's 0.037). Sampled once per session and
# handed to every GPTQ run as one calibration file (each run would otherwise sample its own).
GENERATED = 4080  # 16 sequences of 256


class Quantized:
    """Checkpoints written by the CLI, one per (method, bits), made once per session."""

    def __init__(self, root: Path):
        self.root, self.dirs = root, {}
        self._calibration: Path | None = None

    def calibration(self) -> Path:
        """The shipped text and GENERATED tokens sampled from the model, as one text file."""
        if self._calibration is None:
            from tokenmill.quantize.pipeline import float_weights
            from tokenmill.quantize.selfgen import sample_sequences
            from tokenmill.quantize.threads import torch_threads

            lm = load_model("smollm2")
            with torch_threads(1):  # as the quantizer samples (threads.py)
                seqs = sample_sequences(lm.config, float_weights(lm.weights), lm.tokenizer, GENERATED)
            sampled = [lm.tokenizer.decode(s[1:]) for s in seqs]
            self._calibration = self.root / "calibration.txt"
            self._calibration.write_text("\n\n".join([default_calibration_text(), *sampled]), encoding="utf-8")
        return self._calibration

    def __call__(self, method: str, bits: int, group: int = 64) -> Path:
        key = (method, bits, group)
        if key not in self.dirs:
            from tokenmill.cli import main

            out = self.root / f"{method}{bits}g{group}"
            args = ["quantize", "smollm2", "--method", method, "--bits", str(bits), "--group-size", str(group),
                    "-o", str(out)]
            if method == "gptq":
                args += ["--calib", str(self.calibration()), "--calib-generate", "0", "--mse"]
            assert main(args) == 0
            self.dirs[key] = out
        return self.dirs[key]


@pytest.fixture(scope="session")
def quantized(tmp_path_factory):
    return Quantized(tmp_path_factory.mktemp("quantized"))


def build(source: str) -> tuple[LlamaForCausalLM, object]:
    """The model as the engine builds it on CPU by default (quantization auto, float32 activations)."""
    lm = load_model(source)

    def factory(weight, bias):
        return make_linear(weight, bias, torch.float32, "auto", 32)

    return LlamaForCausalLM(lm.config, lm.weights, torch.float32, factory, max_positions=2048), lm


@pytest.fixture(scope="session")
def float_reference():
    """The float model the quantizers start from: the GGUF dequantized (quantization none)."""
    lm = load_model("smollm2")
    ids = lm.tokenizer.encode(EVAL.read_text(encoding="utf-8"))
    m = LlamaForCausalLM(lm.config, lm.weights, torch.float32,
                         lambda w, b: make_linear(w, b, torch.float32, "none", 32), max_positions=2048)
    return ids, sequence_logits(m, ids)


def quality(path: Path, float_reference) -> tuple[float, float, float]:
    """(float perplexity, the checkpoint's, next-token argmax agreement) on the evaluation text."""
    ids, logits_f = float_reference
    m, _ = build(str(path))
    logits_q = sequence_logits(m, ids)
    agree = (logits_f.argmax(-1) == logits_q.argmax(-1)).float().mean().item()
    return perplexity(logits_f, ids), perplexity(logits_q, ids), agree


def test_evaluation_text_is_apart_from_calibration():
    calib, evaluation = default_calibration_text(), EVAL.read_text(encoding="utf-8")
    lines = {ln.strip() for ln in calib.splitlines() if len(ln.strip()) > 20}
    assert not any(ln.strip() in lines for ln in evaluation.splitlines())


def test_checkpoint_is_a_gptq_checkpoint_running_int4(quantized):
    path = quantized("gptq", 4)
    qcfg = json.loads((path / "config.json").read_text())["quantization_config"]
    assert (qcfg["quant_method"], qcfg["bits"], qcfg["group_size"], qcfg["checkpoint_format"]) == ("gptq", 4, 64, "gptq")
    m, lm = build(str(path))
    assert isinstance(lm.weights["model.layers.0.mlp.down_proj.weight"], GroupQuantWeight)
    assert sum(isinstance(mod, Int4Linear) for mod in m.modules()) == 4 * lm.config.num_layers


# Known failure, measured (docs/benchmarks.md, "Quantization"): on this model the dequantized
# Q4_1 weights requantized at 4-bit g64 lose far more than 3% (round-to-nearest +28.6%, AWQ
# +22.7%, GPTQ +19.5% with 4,096 sampled calibration tokens and --mse, agreement 0.815). strict:
# a pass must remove the mark.
NOT_WITHIN_3_PERCENT = pytest.mark.xfail(strict=True, reason="4-bit g64 measured +19.5% (GPTQ) / +22.7% (AWQ)")


@NOT_WITHIN_3_PERCENT
@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_4bit_g64_close_to_float(quantized, float_reference, method):
    ppl_f, ppl_q, agree = quality(quantized(method, 4), float_reference)
    print(f"\n{method} 4-bit g64: perplexity {ppl_q:.3f} vs float {ppl_f:.3f} ({ppl_q / ppl_f - 1:+.2%}), agreement {agree:.3f}")
    assert ppl_q <= 1.03 * ppl_f
    assert agree >= 0.9


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_3bit_g64_beats_round_to_nearest(quantized, float_reference, method):
    ppl = {m: quality(quantized(m, 3), float_reference)[1] for m in ("rtn", method)}
    print(f"\n3-bit g64 perplexity: {ppl}")
    # "Clearly": at least 5% lower than round-to-nearest at the same bits and groups.
    assert ppl[method] < 0.95 * ppl["rtn"]


def test_quantized_checkpoint_serves_through_the_server(quantized):
    from tests.server.conftest import KEY, LiveServer
    from tokenmill.build import build_async_engine
    from tokenmill.server.app import create_app

    path = quantized("gptq", 4)
    engine = build_async_engine(EngineConfig.from_flat(model=str(path), num_kv_blocks=64))
    engine.start()
    live = LiveServer(create_app({"q4": engine}, api_keys=[KEY]))
    try:
        client = live.client()
        out = client.completions.create(model="q4", prompt="The capital of France is", max_tokens=8, temperature=0)
        assert "Paris" in out.choices[0].text
        chat = client.chat.completions.create(
            model="q4", messages=[{"role": "user", "content": "What is the capital of France?"}], max_tokens=16, temperature=0)
        assert "Paris" in chat.choices[0].message.content
    finally:
        live.stop()
        engine.shutdown()


def test_quantize_refuses_a_group_size_that_does_not_divide(tmp_path, capsys):
    from tokenmill.cli import main

    assert main(["quantize", "smollm2", "--method", "rtn", "--group-size", "100", "-o", str(tmp_path / "x")]) == 2
    assert "does not divide" in capsys.readouterr().err


