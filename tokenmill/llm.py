"""The offline API: `LLM(model, **settings).generate(prompts, params) -> list[RequestOutput]`,
and `Encoder(model).embed(texts) -> tensor` for embedding models."""

from __future__ import annotations

import torch

from tokenmill.build import build_engine
from tokenmill.config import DEFAULT_MODEL, EngineConfig
from tokenmill.outputs import RequestOutput
from tokenmill.sampling import SamplingParams


class LLM:
    def __init__(self, model: str = DEFAULT_MODEL, *, loaded=None, draft_loaded=None, **settings):
        """`settings`: any EngineConfig setting by its flat name (max_num_seqs=4, block_size=8, ...)."""
        self.config = EngineConfig.from_flat(model=model, **settings)
        self.engine = build_engine(self.config, loaded, draft_loaded)
        self._next_id = 0

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: str | list[int] | list[str | list[int]],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params or SamplingParams()
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError("one SamplingParams per prompt, or a single one for all")
        for p in params_list:
            if p.structured is not None:  # offline, waiting for the compile blocks nobody
                self.engine.grammars.validate(p.structured)
        ids = []
        try:
            for prompt, p in zip(prompts, params_list):
                rid = str(self._next_id)
                self._next_id += 1
                self.engine.add_request(rid, prompt, p)
                ids.append(rid)
        except Exception:
            for rid in ids:
                self.engine.abort_request(rid)
            raise
        finished: dict[str, RequestOutput] = {}
        while self.engine.has_unfinished:
            for out in self.engine.step():
                if out.finished:
                    finished[out.request_id] = out
        return [finished[rid] for rid in ids]

    def chat(self, messages: list[dict] | list[list[dict]], sampling_params: SamplingParams | None = None):
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        # The template writes every special token itself, so no BOS is added on top.
        prompts = [
            self.tokenizer.encode(self.tokenizer.apply_chat_template(m, add_generation_prompt=True), False)
            for m in conversations
        ]
        return self.generate(prompts, sampling_params)


class Encoder:
    """The offline API of an embedding model: `Encoder("minilm").embed(texts) -> [n, dim]`."""

    def __init__(self, model: str = "minilm", max_batch_tokens: int | None = None, num_threads: int | None = None,
                 dtype: str = "auto"):
        from tokenmill.build import build_async_embedder

        # The async engine's model and limits, run synchronously here: no thread, no loop.
        self._embedder = build_async_embedder(model, max_batch_tokens=max_batch_tokens, num_threads=num_threads,
                                              dtype=dtype)

    @property
    def tokenizer(self):
        return self._embedder.tokenizer

    @property
    def linear_dtype(self):
        """The torch dtype the linears run in (dtype "auto" chose it by the CPU's flags)."""
        return self._embedder.model.linear_dtype

    @property
    def dimensions(self) -> int:
        return self._embedder.dimensions

    def embed(self, inputs: str | list[str] | list[int] | list[list[int]]) -> torch.Tensor:
        """Texts, or token ids without the model's special tokens (as `/v1/embeddings` takes
        them) -> one embedding row per input. ValueError (EmbedInputError) for a bad input."""
        from tokenmill.engine.async_embedder import embed_in_batches

        if isinstance(inputs, str) or (inputs and isinstance(inputs[0], int)):
            inputs = [inputs]
        e = self._embedder
        if any(isinstance(x, str) for x in inputs):
            seqs = e.encode_texts(list(inputs))
        else:
            seqs = [e.wrap_ids(ids) for ids in inputs]
        e.check(seqs, one_request=False)  # offline: any number of inputs
        return embed_in_batches(e.model.embed, seqs, e.limits)
