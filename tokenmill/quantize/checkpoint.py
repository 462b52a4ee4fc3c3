"""Writing the quantized model as an HF checkpoint directory: config.json with its
`quantization_config`, model.safetensors in the chosen format's tensor layout, the tokenizer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from tokenmill.config import ModelConfig
from tokenmill.model.packed import GroupQuantWeight, gptq as gptq_format
from tokenmill.model.packed import awq as awq_format, compressed_tensors as ct_format
from tokenmill.model.tokenizer import Tokenizer
from tokenmill.quantize.spec import QuantizeSpec

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                   "chat_template.jinja")


def quantization_config(spec: QuantizeSpec) -> dict:
    fmt = spec.checkpoint_format
    if fmt in ("gptq", "gptq_v2"):
        return gptq_format.config(spec.bits, spec.group_size, spec.sym, spec.act_order, v1=fmt == "gptq", damp=spec.damp)
    if fmt == "awq":
        return awq_format.config(spec.bits, spec.group_size)
    return ct_format.config(spec.bits, spec.group_size, spec.sym, ignore=["lm_head"])


def checkpoint_tensors(weights: dict, spec: QuantizeSpec) -> dict[str, torch.Tensor]:
    fmt = spec.checkpoint_format
    tensors: dict[str, torch.Tensor] = {}
    for name, w in weights.items():
        if not isinstance(w, GroupQuantWeight):
            tensors[name] = w.to(torch.float16).contiguous()
            continue
        prefix = name[: -len("weight")]
        if fmt in ("gptq", "gptq_v2"):
            tensors |= gptq_format.write(w, prefix, v1=fmt == "gptq")
        elif fmt == "awq":
            tensors |= awq_format.write(w, prefix)
        else:
            tensors |= ct_format.write(w, prefix, spec.sym)
    return tensors


def hf_config(cfg: ModelConfig) -> dict:
    """config.json for a model read from a GGUF (an HF source keeps its own, see write_checkpoint)."""
    arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
            "qwen3": "Qwen3ForCausalLM"}[cfg.architecture]
    out = {
        "architectures": [arch], "model_type": cfg.architecture, "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim, "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta, "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings, "attention_bias": cfg.attention_bias,
        "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_ids, "torch_dtype": "float16",
    }
    if cfg.rope_scaling:
        out["rope_scaling"] = cfg.rope_scaling
    return out


def write_checkpoint(out_dir: Path, cfg: ModelConfig, tokenizer: Tokenizer, weights: dict, spec: QuantizeSpec,
                     source: Path | None, extra: dict | None = None) -> None:
    """`source`: the HF directory the model came from (its config and tokenizer files are kept),
    or None (a GGUF: both are written from what was read)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if source is not None and source.is_dir():
        config = json.loads((source / "config.json").read_text(encoding="utf-8"))
        for name in TOKENIZER_FILES:
            if (source / name).is_file():
                shutil.copy(source / name, out_dir / name)
    else:
        config = hf_config(cfg)
        write_tokenizer(out_dir, tokenizer)
    config["quantization_config"] = quantization_config(spec) | {"tokenmill": extra or {}}
    save_file(checkpoint_tensors(weights, spec), str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def write_tokenizer(out_dir: Path, tokenizer: Tokenizer) -> None:
    tokenizer.backend.save(str(out_dir / "tokenizer.json"))
    name = tokenizer.id_to_token
    tok_cfg = {
        "bos_token": None if tokenizer.bos_token_id is None else name(tokenizer.bos_token_id),
        "eos_token": name(tokenizer.eos_token_ids[0]) if tokenizer.eos_token_ids else None,
        "add_bos_token": tokenizer.add_bos_token,
    }
    if tokenizer.chat_template:
        tok_cfg["chat_template"] = tokenizer.chat_template
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n", encoding="utf-8")
    (out_dir / "generation_config.json").write_text(
        json.dumps({"eos_token_id": list(tokenizer.eos_token_ids)}) + "\n", encoding="utf-8")
