from __future__ import annotations

import pytest


class ToyTokenizer:
    """Words 't0'..'t999' <-> ids; ids below 10 play the special tokens."""

    ordinary_ids = list(range(10, 1000))

    def encode(self, text: str) -> list[int]:
        return [int(w[1:]) for w in text.split() if w.startswith("t") and w[1:].isdigit()] + [
            999 for w in text.split() if not (w.startswith("t") and w[1:].isdigit())
        ]

    def decode(self, ids: list[int]) -> str:
        return " ".join(f"t{i}" for i in ids)

    def count(self, text: str) -> int:
        return len(text.split())


@pytest.fixture
def toy_tokenizer() -> ToyTokenizer:
    return ToyTokenizer()


@pytest.fixture
def toy_tokenizer_json(tmp_path) -> str:
    """A real tokenizers file (word level), so CLI runs need no model package."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, **{f"t{i}": i + 1 for i in range(999)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    return str(path)
