"""The prompt's token ids as the replica's engine will see them, for prefix prediction.

Each replica publishes its tokenizer (server/info.py) under a fingerprint; the router fetches
each distinct one once and tokenizes a request the way the server does: a chat through the
model's chat template then encode without extra BOS (the template writes it), a completion
prompt string through encode with the model's BOS rule, a token-id prompt as is.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from functools import lru_cache

import aiohttp
import jinja2
import jinja2.ext  # noqa: F401  (the tokenizer's template sandbox needs the submodule loaded)
import tokenizers

from tokenmill.model.tokenizer import Tokenizer

log = logging.getLogger("tokenmill.router")


def tokenizer_from_doc(doc: dict) -> Tokenizer:
    return Tokenizer(tokenizers.Tokenizer.from_str(doc["tokenizer_json"]), doc["bos_token_id"],
                     list(doc["eos_token_ids"]), doc["chat_template"], doc["add_bos_token"])


class SegmentEncoder:
    """`tok.encode(text, add_special_tokens=False)`, cached per piece between added tokens.

    The tokenizer itself cuts a text at its added tokens (<|im_start|>, ...) and encodes the
    pieces between them independently, so encoding the pieces one by one gives the same ids;
    a chat's system prompt and history recur request after request, and only the new message
    is encoded anew. Tokenizing is most of what a routing decision costs (~0.5-3 ms for a few
    hundred tokens); this makes it the cost of the last message. Only for added tokens that
    match verbatim (no strip or word options): otherwise every call goes to the tokenizer.
    """

    def __init__(self, tok: Tokenizer, cache_size: int = 4096):
        self.tok = tok
        added = {t.content: i for i, t in tok.backend.get_added_tokens_decoder().items()}
        plain = all(not (t.lstrip or t.rstrip or t.single_word or t.normalized)
                    for t in tok.backend.get_added_tokens_decoder().values())
        self._added = added if plain else None
        # Longest first: at one position the longest added token wins, as in the tokenizer.
        self._split = re.compile("(" + "|".join(re.escape(t) for t in sorted(added, key=len, reverse=True)) + ")") \
            if added else None
        self._piece = lru_cache(maxsize=cache_size)(self._encode_piece)

    def _encode_piece(self, piece: str) -> tuple[int, ...]:
        return tuple(self.tok.backend.encode(piece, add_special_tokens=False).ids)

    def encode(self, text: str) -> list[int]:
        if self._added is None or self._split is None:
            return self.tok.encode(text, add_special_tokens=False)
        ids: list[int] = []
        for i, piece in enumerate(self._split.split(text)):
            if i % 2:  # the split's captured delimiters: the added tokens
                ids.append(self._added[piece])
            elif piece:
                ids.extend(self._piece(piece))
        return ids


def prompt_ids(tok: Tokenizer, path: str, body: dict, chat_encoder: SegmentEncoder | None = None) -> list[int] | None:
    """The prompt's token ids, or None when there is nothing to predict from (a batch of
    prompts, a malformed body: the replica will answer that one itself)."""
    try:
        if path.endswith("/chat/completions"):
            messages = [{"role": m["role"], "content": _text(m.get("content"))} for m in body["messages"]]
            text = tok.apply_chat_template(messages, add_generation_prompt=body.get("add_generation_prompt", True))
            # The template writes BOS and every special token itself, as the server reads it.
            return chat_encoder.encode(text) if chat_encoder else tok.encode(text, add_special_tokens=False)
        prompt = body["prompt"]
        if isinstance(prompt, str):
            return tok.encode(prompt)
        if prompt and all(isinstance(t, int) for t in prompt):
            return list(prompt)
    except (KeyError, TypeError, ValueError, jinja2.TemplateError):
        pass
    return None


def _text(content) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content)


class Tokenizers:
    """Tokenizers by fingerprint, each fetched once from a replica that serves it."""

    def __init__(self):
        self._by_fingerprint: dict[str, Tokenizer] = {}
        self.encoders: dict[str, SegmentEncoder] = {}
        self._fetching: dict[str, asyncio.Task] = {}

    def get(self, fingerprint: str | None) -> Tokenizer | None:
        return self._by_fingerprint.get(fingerprint) if fingerprint else None

    def ensure(self, client: aiohttp.ClientSession, fingerprint: str, url: str, model: str) -> None:
        """Start fetching this fingerprint's tokenizer in the background (if not yet)."""
        if fingerprint in self._by_fingerprint or fingerprint in self._fetching:
            return
        self._fetching[fingerprint] = asyncio.create_task(self._fetch(client, fingerprint, url, model))

    async def _fetch(self, client: aiohttp.ClientSession, fingerprint: str, url: str, model: str) -> None:
        try:
            async with client.get(url + "/v1/tokenmill/tokenizer", params={"model": model},
                                  timeout=aiohttp.ClientTimeout(total=30)) as resp:
                resp.raise_for_status()
                raw = await resp.read()
            # Parsing a 2 MB tokenizer.json takes ~100 ms: off the event loop.
            tok = await asyncio.to_thread(lambda: tokenizer_from_doc(json.loads(raw)))
            self.encoders[fingerprint] = SegmentEncoder(tok)
            self._by_fingerprint[fingerprint] = tok
            log.info("tokenizer %s loaded from %s", fingerprint, url)
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, KeyError) as e:
            log.warning("could not load tokenizer %s from %s: %s", fingerprint, url, e)
        finally:
            self._fetching.pop(fingerprint, None)
