"""BERT-style bidirectional encoder for sentence embeddings (all-MiniLM-L6-v2 and kin).

A checkpoint is a sentence-transformers directory: config.json + model.safetensors (a HF
`BertModel`), tokenizer.json, and modules.json naming the pipeline (Transformer -> Pooling ->
optional Normalize) with 1_Pooling/config.json saying which pooling.

Batches are packed: all sequences' tokens form one [tokens, hidden] stream, so the linear
layers never compute a padding row. Attention stays inside each sequence: the stream is
ordered by length, and each run of equal-length sequences is one [n, heads, len, dim] SDPA
call with no mask (a mask would force the slow path and still compute the padded scores).

The linears (two thirds of an equal-length batch's time) run in bfloat16 where the CPU
multiplies bfloat16 natively (AVX-512 BF16, from /proc/cpuinfo): weights and inputs
rounded to bfloat16, float32 accumulation, measured 2.7x float32's GEMM rate on an AMD EPYC
with AVX-512 BF16 and cosine >= 0.99993 to the float32 embeddings. Everything else (embedding
sums, layer norms, GELU, attention, pooling) stays float32. Elsewhere, and with dtype
"float32", the linears are float32.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tokenizers import Tokenizer as BackendTokenizer

from tokenmill.model.cpp_build import cpu_flags
from tokenmill.model.tokenizer import Tokenizer

DTYPES = ("auto", "float32", "bfloat16")
# The /proc/cpuinfo flag of x86 CPUs that multiply bfloat16 in hardware (oneDNN's bfloat16 GEMM
# uses it). Without it oneDNN emulates bfloat16: 10x slower here, and not batch-invariant.
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16"})
# Where the CPU lists AMX-BF16, oneDNN's bfloat16 GEMM runs AMX kernels whose blocking follows the
# row count, and a row's embedding then depends on its batch: on an Intel Xeon with AMX granted,
# a text alone and in a batch of 17 differed by 7.8e-4 (brg_matmul avx10_1_512_amx). auto keeps
# float32 there; the encoders promise the same embedding whatever the batch.
BATCH_VARIANT_BF16_FLAGS = frozenset({"amx_bf16"})


def linear_dtype(name: str, flags: str) -> torch.dtype:
    """The encoder's linear dtype for `name` (DTYPES) on a CPU listing `flags`."""
    if name not in DTYPES:
        raise ValueError(f"encoder dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    if name == "auto":
        have = set(flags.split())
        native = NATIVE_BF16_FLAGS & have and not BATCH_VARIANT_BF16_FLAGS & have
        return torch.bfloat16 if native else torch.float32
    return torch.bfloat16 if name == "bfloat16" else torch.float32


class EncoderLoadError(ValueError):
    """An encoder checkpoint could not be read; the message names the file."""


@dataclass(frozen=True)
class BertConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float
    # from the sentence-transformers files
    pooling: str  # "mean" or "cls"
    normalize: bool
    max_seq_length: int

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


_POOLINGS = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls"}


def is_encoder_dir(path: Path) -> bool:
    """A sentence-transformers directory (modules.json) over a BertModel."""
    return (path / "modules.json").is_file() and (path / "config.json").is_file()


def read_bert_config(root: Path) -> BertConfig:
    raw = _json(root / "config.json")
    if raw.get("model_type") != "bert":
        raise EncoderLoadError(f"{root / 'config.json'}: model_type {raw.get('model_type')!r}, expected 'bert'")
    if raw.get("hidden_act", "gelu") != "gelu" or raw.get("position_embedding_type", "absolute") != "absolute":
        raise EncoderLoadError(f"{root / 'config.json'}: only gelu and absolute positions are supported")
    modules = _json(root / "modules.json")
    types = [m.get("type", "") for m in modules]
    pooling_dir = next((m["path"] for m in modules if m.get("type", "").endswith(".Pooling")), None)
    if pooling_dir is None:
        raise EncoderLoadError(f"{root / 'modules.json'}: no Pooling module")
    pool_cfg = _json(root / pooling_dir / "config.json")
    chosen = [mode for key, mode in _POOLINGS.items() if pool_cfg.get(key)]
    others = [k for k, v in pool_cfg.items() if k.startswith("pooling_mode") and v and k not in _POOLINGS]
    if len(chosen) != 1 or others:
        raise EncoderLoadError(f"{root / pooling_dir / 'config.json'}: exactly one of mean/cls pooling is supported")
    st = _json(root / "sentence_bert_config.json") if (root / "sentence_bert_config.json").is_file() else {}
    max_pos = int(raw["max_position_embeddings"])
    try:
        return BertConfig(
            vocab_size=int(raw["vocab_size"]), hidden_size=int(raw["hidden_size"]),
            num_layers=int(raw["num_hidden_layers"]), num_heads=int(raw["num_attention_heads"]),
            intermediate_size=int(raw["intermediate_size"]), max_position_embeddings=max_pos,
            type_vocab_size=int(raw.get("type_vocab_size", 2)), layer_norm_eps=float(raw.get("layer_norm_eps", 1e-12)),
            pooling=chosen[0], normalize=any(t.endswith(".Normalize") for t in types),
            max_seq_length=min(int(st.get("max_seq_length", max_pos)), max_pos),
        )
    except KeyError as e:
        raise EncoderLoadError(f"{root / 'config.json'}: missing key {e}") from e


def read_bert_tokenizer(root: Path) -> Tokenizer:
    path = root / "tokenizer.json"
    try:
        backend = BackendTokenizer.from_file(str(path))
    except Exception as e:
        raise EncoderLoadError(f"{path}: {e}") from e
    # The file pads and truncates to a fixed 128; the engine packs instead and refuses
    # (rather than silently cuts) an input over the model's length.
    backend.no_padding()
    backend.no_truncation()
    return Tokenizer(backend)


@dataclass
class _Layer:
    qkv_w: torch.Tensor  # [3H, H]: one GEMM for q, k and v
    qkv_b: torch.Tensor
    out_w: torch.Tensor
    out_b: torch.Tensor
    ln1_w: torch.Tensor
    ln1_b: torch.Tensor
    up_w: torch.Tensor
    up_b: torch.Tensor
    down_w: torch.Tensor
    down_b: torch.Tensor
    ln2_w: torch.Tensor
    ln2_b: torch.Tensor


@dataclass(frozen=True)
class Packed:
    """A batch as one token stream. Sequences are ordered by length (longest first) so that
    each run of equal lengths is contiguous; `order[i]` is the caller's index of the i-th."""

    ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    runs: tuple[tuple[int, int, int], ...]  # (first token, sequences, length) per run
    order: tuple[int, ...]

    @property
    def num_tokens(self) -> int:
        return int(self.ids.numel())


def pack(seqs: list[list[int]]) -> Packed:
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    ids: list[int] = []
    positions: list[int] = []
    runs: list[tuple[int, int, int]] = []
    for i in order:
        n = len(seqs[i])
        if runs and runs[-1][2] == n:
            start, count, _ = runs[-1]
            runs[-1] = (start, count + 1, n)
        else:
            runs.append((len(ids), 1, n))
        ids.extend(seqs[i])
        positions.extend(range(n))
    return Packed(torch.tensor(ids, dtype=torch.long), torch.tensor(positions, dtype=torch.long),
                  tuple(runs), tuple(order))


class BertEncoder:
    def __init__(self, config: BertConfig, weights: dict[str, torch.Tensor], source: str = "",
                 linear_dtype: torch.dtype = torch.float32):
        self.config = config
        self.linear_dtype = linear_dtype
        w = {k.removeprefix("bert."): v.float().contiguous() for k, v in weights.items()}
        try:
            self.word = w["embeddings.word_embeddings.weight"]
            self.pos = w["embeddings.position_embeddings.weight"]
            # Every input is one segment (type 0): its embedding is a constant row.
            self.type0 = w["embeddings.token_type_embeddings.weight"][0].clone()
            self.emb_ln = (w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"])
            self.layers = [self._layer(w, f"encoder.layer.{i}.", linear_dtype) for i in range(config.num_layers)]
        except KeyError as e:
            raise EncoderLoadError(f"{source}: missing tensor {e}") from e
        if tuple(self.word.shape) != (config.vocab_size, config.hidden_size):
            raise EncoderLoadError(f"{source}: word embeddings have shape {list(self.word.shape)}")

    @staticmethod
    def _layer(w: dict, p: str, dtype: torch.dtype) -> _Layer:
        a = p + "attention."
        lin = lambda name: w[name].to(dtype).contiguous()  # noqa: E731  (the linears' weights and biases)
        return _Layer(
            qkv_w=torch.cat([w[a + f"self.{n}.weight"] for n in ("query", "key", "value")]).to(dtype).contiguous(),
            qkv_b=torch.cat([w[a + f"self.{n}.bias"] for n in ("query", "key", "value")]).to(dtype),
            out_w=lin(a + "output.dense.weight"), out_b=lin(a + "output.dense.bias"),
            ln1_w=w[a + "output.LayerNorm.weight"], ln1_b=w[a + "output.LayerNorm.bias"],
            up_w=lin(p + "intermediate.dense.weight"), up_b=lin(p + "intermediate.dense.bias"),
            down_w=lin(p + "output.dense.weight"), down_b=lin(p + "output.dense.bias"),
            ln2_w=w[p + "output.LayerNorm.weight"], ln2_b=w[p + "output.LayerNorm.bias"],
        )

    def _linear(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """x @ w.T + b in float32 out; bfloat16 weights take x rounded to bfloat16."""
        if w.dtype == torch.float32:
            return F.linear(x, w, b)
        return F.linear(x.to(w.dtype), w, b).float()

    @property
    def num_bytes(self) -> int:
        tensors = [self.word, self.pos] + [t for layer in self.layers for t in vars(layer).values()]
        return sum(t.numel() * t.element_size() for t in tensors)

    @torch.inference_mode()
    def embed(self, seqs: list[list[int]]) -> torch.Tensor:
        """[len(seqs), hidden] sentence embeddings, in the order given."""
        packed = pack(seqs)
        pooled = self.pool(self.hidden_states(packed), packed)
        if self.config.normalize:
            pooled = F.normalize(pooled, p=2.0, dim=-1)
        out = torch.empty_like(pooled)
        out[list(packed.order)] = pooled
        return out

    def hidden_states(self, packed: Packed) -> torch.Tensor:
        cfg = self.config
        eps, hidden = cfg.layer_norm_eps, cfg.hidden_size
        x = self.word[packed.ids] + self.pos[packed.positions] + self.type0
        x = F.layer_norm(x, (hidden,), *self.emb_ln, eps)
        for layer in self.layers:
            attn = self._attention(self._linear(x, layer.qkv_w, layer.qkv_b), packed)
            x = F.layer_norm(self._linear(attn, layer.out_w, layer.out_b) + x, (hidden,), layer.ln1_w, layer.ln1_b, eps)
            up = F.gelu(self._linear(x, layer.up_w, layer.up_b))
            x = F.layer_norm(self._linear(up, layer.down_w, layer.down_b) + x, (hidden,), layer.ln2_w, layer.ln2_b, eps)
        return x

    def _attention(self, qkv: torch.Tensor, packed: Packed) -> torch.Tensor:
        heads, dim = self.config.num_heads, self.config.head_dim
        out = torch.empty(qkv.shape[0], heads * dim, dtype=qkv.dtype)
        for start, count, length in packed.runs:
            end = start + count * length
            # [n*L, 3H] -> 3 x [n, heads, L, dim]
            q, k, v = qkv[start:end].view(count, length, 3, heads, dim).permute(2, 0, 3, 1, 4)
            o = F.scaled_dot_product_attention(q, k, v)
            out[start:end] = o.transpose(1, 2).reshape(count * length, heads * dim)
        return out

    def pool(self, x: torch.Tensor, packed: Packed) -> torch.Tensor:
        hidden = self.config.hidden_size
        pooled = []
        for start, count, length in packed.runs:
            seqs = x[start:start + count * length].view(count, length, hidden)
            pooled.append(seqs[:, 0] if self.config.pooling == "cls" else seqs.mean(dim=1))
        return torch.cat(pooled)


@dataclass
class LoadedEncoder:
    model: BertEncoder
    tokenizer: Tokenizer
    source: str

    @property
    def config(self) -> BertConfig:
        return self.model.config


def load_bert_dir(path: str | Path, dtype: str = "auto") -> LoadedEncoder:
    """`dtype`: the linears' (DTYPES; auto: bfloat16 where the CPU multiplies it natively)."""
    root = Path(path)
    dt = linear_dtype(dtype, cpu_flags())
    config = read_bert_config(root)
    weights_path = root / "model.safetensors"
    if not weights_path.is_file():
        raise EncoderLoadError(f"{weights_path}: no such file")
    try:
        weights = load_file(str(weights_path))
    except Exception as e:
        raise EncoderLoadError(f"{weights_path}: {e}") from e
    model = BertEncoder(config, weights, str(weights_path), dt)
    return LoadedEncoder(model, read_bert_tokenizer(root), str(root))


def _json(path: Path) -> dict | list:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise EncoderLoadError(f"{path}: no such file") from e
    except (OSError, ValueError) as e:
        raise EncoderLoadError(f"{path}: {e}") from e


def special_ids(tokenizer: Tokenizer) -> tuple[int, int]:
    """([CLS], [SEP]): what the tokenizer's template puts around every text."""
    cls, sep = tokenizer.backend.token_to_id("[CLS]"), tokenizer.backend.token_to_id("[SEP]")
    if cls is None or sep is None:
        raise EncoderLoadError("the tokenizer has no [CLS]/[SEP] tokens")
    return cls, sep


def tokenize(tokenizer: Tokenizer, texts: list[str]) -> list[list[int]]:
    """Each text's ids with the model's own [CLS] ... [SEP] (the tokenizer's template)."""
    return [e.ids for e in tokenizer.backend.encode_batch(texts, add_special_tokens=True)]
