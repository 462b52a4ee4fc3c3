"""Tokenizer: a `tokenizers.Tokenizer` plus the special ids and chat template a model brings."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import jinja2
import jinja2.ext
import jinja2.sandbox
import tokenizers


@dataclass
class Tokenizer:
    backend: tokenizers.Tokenizer
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    chat_template: str | None = None
    add_bos_token: bool = False

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # Special tokens written in the text (e.g. "<|im_start|>") always map to their ids;
        # add_special_tokens only controls the BOS we prepend ourselves.
        if len(text) > 4096:
            # encode_batch lets go of the GIL (encode holds it): a 200 kB prompt takes seconds,
            # and tokenized on a worker thread it then stalls no other thread meanwhile.
            ids = self.backend.encode_batch([text], add_special_tokens=False)[0].ids
        else:
            ids = self.backend.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self.add_bos_token and self.bos_token_id is not None:
            if not ids or ids[0] != self.bos_token_id:
                ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token(self) -> str:
        return self.id_to_token(self.bos_token_id) or "" if self.bos_token_id is not None else ""

    @property
    def eos_token(self) -> str:
        return (self.id_to_token(self.eos_token_ids[0]) or "") if self.eos_token_ids else ""

    @cached_property
    def _template(self) -> jinja2.Template:
        if not self.chat_template:
            raise ValueError("this model has no chat template; use a plain completion prompt")
        # The same environment transformers uses: sandboxed, trim_blocks/lstrip_blocks, raise_exception.
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
        )

        def raise_exception(message: str):
            raise jinja2.exceptions.TemplateError(message)

        env.globals["raise_exception"] = raise_exception
        env.filters["tojson"] = _tojson
        return env.from_string(self.chat_template)

    def apply_chat_template(
        self, messages: list[dict], add_generation_prompt: bool = True, tools: list[dict] | None = None, **extra
    ) -> str:
        return self._template.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            tools=tools,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
            **extra,
        )


def _tojson(value, indent=None, ensure_ascii=False, sort_keys=False):
    import json

    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys)
