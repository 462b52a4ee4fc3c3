"""GGUF checkpoints: config, weights and tokenizer from one llama.cpp file, read in place
(gguf_file.py maps it; `gguf` supplies the type tables and the reference dequantizer).

Weights come back under Hugging Face Llama names. Float tensors (F32/F16/BF16) become float32
torch tensors; quantized ones stay `QuantizedWeight`s (raw blocks) so `make_linear` can keep
them quantized. llama.cpp's converter permutes the rows of Q and K of Llama-architecture models
(interleaved RoPE pairs); we undo that on the raw rows, which is exact even for quantized data.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as BackendTokenizer

from tokenmill.config import ModelConfig
from tokenmill.model.gguf_blocks import QuantizedWeight
from tokenmill.model.gguf_file import GGUFFile, GGUFFormatError, read_gguf_file
from tokenmill.model.tokenizer import Tokenizer

FLOAT_TYPES = (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16)
SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3")
# Only the "llama" converter permutes Q/K (llama.cpp runs Llama's RoPE on interleaved pairs;
# Qwen2/Qwen3 are converted with NeoX-style RoPE and keep HF's row order).
PERMUTED_QK = ("llama",)
TOKEN_TYPE_CONTROL = 3

_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}

# Pre-tokenizer split patterns by `tokenizer.ggml.pre`, as llama.cpp applies them.
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLITS = {"llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT}


class GGUFError(ValueError):
    """Something wrong with the content of a GGUF file; the loader adds the file name."""


@dataclass
class GGUFCheckpoint:
    config: ModelConfig
    weights: dict[str, "torch.Tensor | QuantizedWeight"]
    tokenizer: Tokenizer


def read_gguf(path: str) -> GGUFCheckpoint:
    reader = _open(path)
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise GGUFError(f"unsupported architecture {arch!r}; supported: {SUPPORTED_ARCHITECTURES}")
    tokenizer = gguf_tokenizer(reader)
    config = gguf_config(reader, arch, tokenizer)
    return GGUFCheckpoint(config, gguf_weights(reader, config, arch), tokenizer)


def _open(path: str) -> GGUFFile:
    try:
        return read_gguf_file(path)
    except GGUFFormatError as e:
        if str(e).startswith("truncated"):
            raise GGUFError(str(e)) from e
        raise GGUFError(f"not a readable GGUF file ({e})") from e


def _field(reader: GGUFFile, key: str, default=None, required: bool = True):
    value = reader.metadata.get(key)
    if value is None:
        if required and default is None:
            raise GGUFError(f"missing metadata key {key!r}")
        return default
    return value


def gguf_config(reader: GGUFFile, arch: str, tokenizer: Tokenizer) -> ModelConfig:
    def get(key: str, default=None):
        return _field(reader, f"{arch}.{key}", default)

    hidden = get("embedding_length")
    heads = get("attention.head_count")
    names = {t.name for t in reader.tensors}
    scaling = None
    kind = _field(reader, f"{arch}.rope.scaling.type", required=False)
    if kind in ("linear",):
        scaling = {"rope_type": "linear", "factor": get("rope.scaling.factor")}
    elif kind not in (None, "none"):
        raise GGUFError(f"unsupported rope scaling {kind!r}")
    vocab = _field(reader, f"{arch}.vocab_size", required=False) or tokenizer.backend.get_vocab_size()
    return ModelConfig(
        vocab_size=int(vocab),
        hidden_size=int(hidden),
        intermediate_size=int(get("feed_forward_length")),
        num_layers=int(get("block_count")),
        num_heads=int(heads),
        num_kv_heads=int(get("attention.head_count_kv", heads)),
        head_dim=int(get("attention.key_length", hidden // heads)),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        max_position_embeddings=int(get("context_length", 2048)),
        tie_word_embeddings="output.weight" not in names,
        attention_bias=arch == "qwen2",
        qk_norm=arch == "qwen3",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_ids=list(tokenizer.eos_token_ids),
        architecture=arch,
    )


def hf_name(gguf_name: str) -> str | None:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}"
    return None  # e.g. rope_freqs: derived from the config instead


def unpermute_rows(n_rows: int, n_heads: int) -> np.ndarray:
    """Row index mapping llama.cpp's Q/K layout back to HF's: hf = gguf[index].

    The converter stores, per head, the rotate-half pairs (i, i + d/2) as adjacent rows
    (2i, 2i + 1); HF row h*d + j*d/2 + i therefore sits at GGUF row h*d + 2i + j."""
    head_dim = n_rows // n_heads
    return np.arange(n_rows).reshape(n_heads, head_dim // 2, 2).transpose(0, 2, 1).reshape(-1)


def gguf_weights(reader: GGUFFile, cfg: ModelConfig, arch: str) -> dict[str, "torch.Tensor | QuantizedWeight"]:
    weights: dict[str, torch.Tensor | QuantizedWeight] = {}
    for t in reader.tensors:
        name = hf_name(t.name)
        if name is None:
            continue
        shape = tuple(int(n) for n in reversed(list(t.shape)))  # GGUF lists dims innermost first
        if t.tensor_type in FLOAT_TYPES:
            w: torch.Tensor | QuantizedWeight = torch.from_numpy(
                np.array(gguf_dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)  # copy: the file is mapped read-only
            )
        elif len(shape) == 2:
            w = QuantizedWeight(np.asarray(t.data).reshape(shape[0], -1), GGMLQuantizationType(t.tensor_type), shape)
        else:
            raise GGUFError(f"tensor {t.name!r} is quantized ({t.tensor_type.name}) but not a matrix")
        if arch in PERMUTED_QK and (name.endswith("q_proj.weight") or name.endswith("k_proj.weight")):
            heads = cfg.num_heads if "q_proj" in name else cfg.num_kv_heads
            index = unpermute_rows(shape[0], heads)
            w = w.rows(index) if isinstance(w, QuantizedWeight) else w[torch.from_numpy(index)].contiguous()
        weights[name] = w
    return weights


def gguf_tokenizer(reader: GGUFFile) -> Tokenizer:
    """Byte-level BPE from `tokenizer.ggml.*`: vocab and merges as the file spells them (already
    in the GPT-2 byte alphabet), control tokens (type 3) registered as special so they never split."""
    model = _field(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise GGUFError(f"unsupported tokenizer model {model!r} (supported: 'gpt2' byte-level BPE)")
    tokens = list(_field(reader, "tokenizer.ggml.tokens"))
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    types = list(_field(reader, "tokenizer.ggml.token_type", default=[1] * len(tokens)))
    vocab = {tok: i for i, tok in enumerate(tokens)}
    backend = BackendTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    backend.pre_tokenizer = _pre_tokenizer(_field(reader, "tokenizer.ggml.pre", default="default"))
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(
        [AddedToken(tok, special=True, normalized=False) for tok, ty in zip(tokens, types) if ty == TOKEN_TYPE_CONTROL]
    )
    bos = _field(reader, "tokenizer.ggml.bos_token_id", required=False)
    eos = _field(reader, "tokenizer.ggml.eos_token_id", required=False)
    eot = _field(reader, "tokenizer.ggml.eot_token_id", required=False)
    eos_ids = [int(i) for i in dict.fromkeys(x for x in (eos, eot) if x is not None)]
    return Tokenizer(
        backend,
        bos_token_id=None if bos is None else int(bos),
        eos_token_ids=eos_ids,
        chat_template=_field(reader, "tokenizer.chat_template", required=False),
        add_bos_token=bool(_field(reader, "tokenizer.ggml.add_bos_token", default=False)),
    )


def _pre_tokenizer(pre: str):
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    if pre == "smollm":
        # SmolLM's vocabulary was trained with every digit its own pre-token.
        split = pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated")
        gpt2 = pre_tokenizers.Split(Regex(_GPT2_SPLIT), behavior="isolated")
        return pre_tokenizers.Sequence([split, gpt2, byte_level])
    pattern = _SPLITS.get(pre, _GPT2_SPLIT)
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), behavior="isolated"), byte_level])
