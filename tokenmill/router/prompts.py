"""The prompt's token ids as the replica's engine will see them, for prefix prediction.

Each replica publishes its tokenizer (server/info.py) under a fingerprint; the router fetches
each distinct one once and tokenizes a request the way the server does: a chat through the
model's chat template then encode without extra BOS (the template writes it), a completion
prompt string through encode with the model's BOS rule, a token-id prompt as is.
"""

from __future__ import annotations

import asyncio
import logging

import httpx
import jinja2
import jinja2.ext  # noqa: F401  (the tokenizer's template sandbox needs the submodule loaded)
import tokenizers

from tokenmill.model.tokenizer import Tokenizer

log = logging.getLogger("tokenmill.router")


def tokenizer_from_doc(doc: dict) -> Tokenizer:
    return Tokenizer(tokenizers.Tokenizer.from_str(doc["tokenizer_json"]), doc["bos_token_id"],
                     list(doc["eos_token_ids"]), doc["chat_template"], doc["add_bos_token"])


def prompt_ids(tok: Tokenizer, path: str, body: dict) -> list[int] | None:
    """The prompt's token ids, or None when there is nothing to predict from (a batch of
    prompts, a malformed body: the replica will answer that one itself)."""
    try:
        if path.endswith("/chat/completions"):
            messages = [{"role": m["role"], "content": _text(m.get("content"))} for m in body["messages"]]
            text = tok.apply_chat_template(messages, add_generation_prompt=body.get("add_generation_prompt", True))
            return tok.encode(text, add_special_tokens=False)
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
        self._fetching: dict[str, asyncio.Task] = {}

    def get(self, fingerprint: str | None) -> Tokenizer | None:
        return self._by_fingerprint.get(fingerprint) if fingerprint else None

    def ensure(self, client: httpx.AsyncClient, fingerprint: str, url: str, model: str) -> None:
        """Start fetching this fingerprint's tokenizer in the background (if not yet)."""
        if fingerprint in self._by_fingerprint or fingerprint in self._fetching:
            return
        self._fetching[fingerprint] = asyncio.create_task(self._fetch(client, fingerprint, url, model))

    async def _fetch(self, client: httpx.AsyncClient, fingerprint: str, url: str, model: str) -> None:
        try:
            resp = await client.get(url + "/v1/tokenmill/tokenizer", params={"model": model}, timeout=30)
            resp.raise_for_status()
            # Parsing a 2 MB tokenizer.json takes ~100 ms: off the event loop.
            self._by_fingerprint[fingerprint] = await asyncio.to_thread(tokenizer_from_doc, resp.json())
            log.info("tokenizer %s loaded from %s", fingerprint, url)
        except (httpx.HTTPError, ValueError, KeyError) as e:
            log.warning("could not load tokenizer %s from %s: %s", fingerprint, url, e)
        finally:
            self._fetching.pop(fingerprint, None)
