"""The router tokenizes a request as the server does; the per-piece cache changes no id."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenmill.model.tokenizer import Tokenizer
from tokenmill.router.prompts import SegmentEncoder, prompt_ids, tokenizer_from_doc

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    from tokenmill.bench.tokenizer import load_tokenizer  # the default model's tokenizer, cached as JSON

    backend = load_tokenizer().backend
    # Through the same wire format the replicas publish it in (server/info.py).
    return tokenizer_from_doc({"tokenizer_json": backend.to_str(), "bos_token_id": None, "eos_token_ids": [],
                               "chat_template": CHATML, "add_bos_token": False})


pieces = st.sampled_from(["<|im_start|>", "<|im_end|>", "<|endoftext|>", "\n", " ", "hello", "  world", "é",
                          "<|im", "end|>", "🙂", "\t12345"])
texts = st.lists(st.one_of(pieces, st.text(max_size=8)), max_size=12).map("".join)


@settings(max_examples=300, deadline=None)
@given(texts=st.lists(texts, min_size=1, max_size=4))
def test_segment_cache_gives_the_tokenizers_ids(tok, texts):
    enc = SegmentEncoder(tok, cache_size=8)
    for text in texts + texts:  # the second round comes from the cache
        assert enc.encode(text) == tok.encode(text, add_special_tokens=False)


def test_chat_and_completion_prompts_as_the_server_reads_them(tok):
    body = {"messages": [{"role": "system", "content": "Be brief."},
                         {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]}]}
    expected = tok.encode(tok.apply_chat_template([{"role": "system", "content": "Be brief."},
                                                   {"role": "user", "content": "Hi there"}]), add_special_tokens=False)
    assert prompt_ids(tok, "/v1/chat/completions", body) == expected
    assert prompt_ids(tok, "/v1/chat/completions", body, SegmentEncoder(tok)) == expected
    assert prompt_ids(tok, "/v1/completions", {"prompt": "Once upon"}) == tok.encode("Once upon")
    assert prompt_ids(tok, "/v1/completions", {"prompt": [5, 6, 7]}) == [5, 6, 7]
    assert prompt_ids(tok, "/v1/completions", {"prompt": ["a", "b"]}) is None  # a batch: no single prefix
    assert prompt_ids(tok, "/v1/chat/completions", {"messages": "nonsense"}) is None
