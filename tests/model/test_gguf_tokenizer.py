"""The tokenizer built from the default GGUF's metadata against transformers' own GGUF
tokenizer loader (an independent implementation of the same metadata)."""

from __future__ import annotations

import warnings

import pytest

from tests.model import real

STRINGS = [
    "Hello, world!",
    "  leading and trailing spaces  ",
    "1234567890 3.14159 2024-01-01",
    " 12 345 x1y22",
    "def f(x):\n    return x**2  # square\n\tindent",
    "emoji 🙂🚀👍🏽 done",
    "中文测试，日本語のテキスト、한국어",
    "naïve café résumé",
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>",
    "a<|im_end|>b<repo_name>c",
    "It's we'll they're I'm",
    "\n\n\n",
    "   ",
    "",
    "x" * 50,
]


@pytest.fixture(scope="module")
def ours():
    return real.loaded("auto").tokenizer


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    from transformers import AutoTokenizer

    directory, name = real.gguf_dir(tmp_path_factory.mktemp("gguf"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoTokenizer.from_pretrained(directory, gguf_file=name)


@pytest.mark.parametrize("text", STRINGS)
def test_ids_match_transformers(ours, reference, text):
    assert ours.encode(text) == reference.encode(text, add_special_tokens=False)
    assert ours.encode(text) == reference.encode(text)  # add_bos_token is false in the metadata


@pytest.mark.parametrize("text", STRINGS)
def test_roundtrip(ours, text):
    assert ours.decode(ours.encode(text), skip_special_tokens=False) == text


def test_special_tokens_never_split(ours):
    assert ours.encode("<|im_start|>") == [1]
    assert ours.encode("<|im_end|>") == [2]
    assert ours.decode([1, 2, 3], skip_special_tokens=True) == ""


def test_metadata(ours, reference):
    assert ours.bos_token_id == reference.bos_token_id == 1
    assert ours.eos_token_ids == [reference.eos_token_id] == [2]
    assert ours.add_bos_token is False
    assert ours.chat_template == reference.chat_template
    assert ours.vocab_size == 49152


def test_chat_template_matches_transformers(ours, reference):
    import jinja2.ext  # noqa: F401  (tokenizer.py uses jinja2.ext without importing it)

    messages = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"}]
    for gen in (True, False):
        expected = reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
        assert ours.apply_chat_template(messages, add_generation_prompt=gen) == expected
