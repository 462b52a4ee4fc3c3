"""Hugging Face checkpoint directories: config.json, *.safetensors, tokenizer.json and
(optionally) tokenizer_config.json / chat_template.jinja / generation_config.json."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from tokenizers import Tokenizer as BackendTokenizer

from tokenmill.config import ModelConfig
from tokenmill.model.tokenizer import Tokenizer


class HFError(ValueError):
    """Something wrong with a checkpoint directory; the message names the file."""


@dataclass
class HFCheckpoint:
    config: ModelConfig
    weights: dict[str, torch.Tensor]
    tokenizer: Tokenizer


def read_hf_dir(path: str | Path) -> HFCheckpoint:
    root = Path(path)
    raw = _json(root / "config.json")
    try:
        config = ModelConfig.from_hf(raw)
    except (KeyError, ValueError) as e:
        raise HFError(f"{root / 'config.json'}: {e if isinstance(e, ValueError) else f'missing key {e}'}") from e
    tokenizer = hf_tokenizer(root, raw)
    if not config.eos_token_ids:
        config.eos_token_ids = list(tokenizer.eos_token_ids)
    if config.bos_token_id is None:
        config.bos_token_id = tokenizer.bos_token_id
    return HFCheckpoint(config, hf_weights(root, config, raw.get("quantization_config")), tokenizer)


def _json(path: Path, required: bool = True) -> dict:
    if not path.is_file():
        if required:
            raise HFError(f"{path}: file not found")
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HFError(f"{path}: not valid JSON ({e})") from e


def hf_weights(root: Path, config: ModelConfig, quantization: dict | None = None) -> dict:
    """Float tensors as float32; with a `quantization_config` (GPTQ, AWQ, compressed-tensors),
    each quantized linear as one GroupQuantWeight (model/packed) under `<linear>.weight`."""
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise HFError(f"{root}: no *.safetensors files")
    weights: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as st:
                for name in st.keys():
                    if name.endswith("rotary_emb.inv_freq"):  # old checkpoints save the RoPE table
                        continue
                    t = st.get_tensor(name)
                    # packed ints stay ints: as float32 an int32 word would lose its low bits
                    # and e4m3 stays e4m3 (an FP8 checkpoint's weights run as they are)
                    keep = quantization is not None and (not t.is_floating_point() or t.element_size() == 1)
                    weights[name] = t if keep else t.to(torch.float32)
        except HFError:
            raise
        except Exception as e:  # safetensors raises its own error types for bad headers/truncation
            raise HFError(f"{f}: not a readable safetensors file ({type(e).__name__}: {e})") from e
    if quantization is not None:
        weights = _unpack_quantized(root, weights, quantization)
    if config.tie_word_embeddings:
        # The decoder reuses the embedding; a saved copy of it would only double the memory.
        weights.pop("lm_head.weight", None)
    return weights


def _unpack_quantized(root: Path, weights: dict, quantization: dict) -> dict:
    from tokenmill.model.packed import read_quantized

    if not isinstance(quantization, dict):
        raise HFError(f"{root / 'config.json'}: quantization_config is not an object")
    try:
        return read_quantized(weights, quantization)
    except ValueError as e:
        raise HFError(f"{root}: {e}") from e


def hf_tokenizer(root: Path, config: dict) -> Tokenizer:
    path = root / "tokenizer.json"
    if not path.is_file():
        raise HFError(f"{path}: file not found (only fast tokenizers, tokenizer.json, are supported)")
    try:
        backend = BackendTokenizer.from_file(str(path))
    except Exception as e:
        raise HFError(f"{path}: not a readable tokenizer ({e})") from e
    tok_cfg = _json(root / "tokenizer_config.json", required=False)
    gen_cfg = _json(root / "generation_config.json", required=False)

    def token_id(key: str) -> int | None:
        tok = tok_cfg.get(key)
        if isinstance(tok, dict):
            tok = tok.get("content")
        return backend.token_to_id(tok) if isinstance(tok, str) else None

    bos = token_id("bos_token")
    if bos is None:
        bos = gen_cfg.get("bos_token_id", config.get("bos_token_id"))
    eos_ids: list[int] = []
    for source in (gen_cfg.get("eos_token_id"), config.get("eos_token_id"), token_id("eos_token")):
        for i in source if isinstance(source, list) else [source]:
            if i is not None and i not in eos_ids:
                eos_ids.append(int(i))
    template = tok_cfg.get("chat_template")
    jinja = root / "chat_template.jinja"  # transformers >= 4.50 saves the template beside the config
    if template is None and jinja.is_file():
        template = jinja.read_text(encoding="utf-8")
    if isinstance(template, list):  # a list of named templates: use the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    add_bos = tok_cfg.get("add_bos_token")
    if add_bos is None:
        # No flag: the tokenizer's own post-processor says whether it prepends BOS.
        add_bos = bos is not None and backend.encode("a", add_special_tokens=True).ids[:1] == [bos]
    return Tokenizer(backend, bos_token_id=bos, eos_token_ids=eos_ids, chat_template=template, add_bos_token=add_bos)
