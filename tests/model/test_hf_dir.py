"""Hugging Face checkpoint directories: tiny random Llama / Qwen2 / Qwen3 saved with
save_pretrained next to a tokenizer.json, loaded and run by tokenmill."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.tiny import hf_greedy, tiny_hf_model, tiny_tokenizer
from tokenmill.model.loader import ModelLoadError, load_model

TEMPLATE = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"


def save_dir(path, arch="llama", tokenizer_config=True):
    model = tiny_hf_model(arch)
    model.save_pretrained(path)
    tiny_tokenizer().backend.save(str(path / "tokenizer.json"))
    if tokenizer_config:
        cfg = {"bos_token": "<s>", "eos_token": {"content": "</s>"}, "chat_template": TEMPLATE, "add_bos_token": True}
        (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    return model


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_load_and_generate_like_transformers(tmp_path, arch):
    from tokenmill import LLM
    from tokenmill.sampling import SamplingParams

    model = save_dir(tmp_path, arch)
    m = load_model(str(tmp_path))
    expected = {k: v for k, v in model.state_dict().items() if not (k == "lm_head.weight" and m.config.tie_word_embeddings)}
    assert set(m.weights) == set(expected)
    for k, v in expected.items():
        assert torch.equal(m.weights[k], v), k
    assert m.config.architecture == arch
    assert m.tokenizer.chat_template == TEMPLATE
    assert m.tokenizer.bos_token_id == 0 and 1 in m.tokenizer.eos_token_ids
    assert m.tokenizer.encode("fox")[0] == 0
    llm = LLM(str(tmp_path), quantization="none", num_kv_blocks=64)
    prompt = tiny_tokenizer().backend.encode("Paged attention keeps").ids
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    assert out[0].outputs[0].token_ids == hf_greedy(model, prompt, 10)


@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_float_checkpoint_quantized_on_load_runs(tmp_path, quantization):
    from tokenmill import LLM
    from tokenmill.sampling import SamplingParams

    save_dir(tmp_path)
    llm = LLM(str(tmp_path), quantization=quantization, num_kv_blocks=64)
    out = llm.generate(["The quick brown"], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 4


NO_GGUF = """
import sys
sys.modules["gguf"] = None  # every `import gguf` now fails, as on a machine without the package
from tokenmill import LLM
from tokenmill.sampling import SamplingParams
path, prompt = sys.argv[1], [int(t) for t in sys.argv[2:]]
params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
for quantization in ("none", "int8", "int4", "fp8"):
    out = LLM(path, quantization=quantization, num_kv_blocks=64).generate([prompt], params)
    print(quantization, *out[0].outputs[0].token_ids)
"""


def test_hf_checkpoint_loads_and_quantizes_without_gguf(tmp_path):
    # gguf is needed for GGUF files only: an HF checkpoint loads, and its float weights quantize
    # to int8/int4/fp8, on a machine that lacks it (a subprocess, so the shim cannot leak).
    model = save_dir(tmp_path)
    prompt = tiny_tokenizer().backend.encode("Paged attention keeps").ids
    root = Path(__file__).resolve().parents[2]
    run = subprocess.run(
        [sys.executable, "-c", NO_GGUF, str(tmp_path), *map(str, prompt)],
        cwd=root, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    outputs = {line.split()[0]: [int(t) for t in line.split()[1:]] for line in run.stdout.splitlines()}
    assert set(outputs) == {"none", "int8", "int4", "fp8"}
    assert outputs["none"] == hf_greedy(model, prompt, 6)
    assert all(len(tokens) == 6 for tokens in outputs.values())


def test_no_tokenizer_config_uses_config_ids(tmp_path):
    save_dir(tmp_path, tokenizer_config=False)
    tok = load_model(str(tmp_path)).tokenizer
    assert tok.chat_template is None and tok.eos_token_ids == [1]


def test_missing_config(tmp_path):
    save_dir(tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(ModelLoadError, match="config.json: file not found"):
        load_model(str(tmp_path))


def test_unsupported_architecture(tmp_path):
    save_dir(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="config.json.*unsupported architecture 'gpt2'"):
        load_model(str(tmp_path))


def test_missing_and_misshapen_tensors(tmp_path):
    model = save_dir(tmp_path)
    weights = {k: v.contiguous() for k, v in model.state_dict().items()}
    st = tmp_path / "model.safetensors"
    save_file({k: v for k, v in weights.items() if k != "model.norm.weight"}, str(st))
    with pytest.raises(ModelLoadError, match="missing tensor 'model.norm.weight'") as e:
        load_model(str(tmp_path))
    assert str(tmp_path) in str(e.value)
    weights["model.layers.0.mlp.up_proj.weight"] = weights["model.layers.0.mlp.up_proj.weight"][:, :-1].contiguous()
    save_file(weights, str(st))
    with pytest.raises(ModelLoadError, match=r"up_proj.weight' has shape \[128, 63\], expected \[128, 64\]"):
        load_model(str(tmp_path))


def test_truncated_safetensors(tmp_path):
    save_dir(tmp_path)
    st = tmp_path / "model.safetensors"
    st.write_bytes(st.read_bytes()[:-1000])
    with pytest.raises(ModelLoadError, match="model.safetensors: not a readable safetensors"):
        load_model(str(tmp_path))


def test_missing_tokenizer(tmp_path):
    save_dir(tmp_path)
    (tmp_path / "tokenizer.json").unlink()
    with pytest.raises(ModelLoadError, match="tokenizer.json: file not found"):
        load_model(str(tmp_path))
