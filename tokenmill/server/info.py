"""What a router needs to predict this server's prefix-cache hits: per model its block size
and its tokenizer (vocabulary, special ids, chat template), so the router tokenizes a prompt
exactly as the engine will and hashes the same blocks.

`GET /v1/tokenmill/info` is small and polled; `GET /v1/tokenmill/tokenizer?model=NAME` is large
(the whole tokenizer.json) and fetched once per fingerprint.
"""

from __future__ import annotations

import hashlib

from fastapi import FastAPI
from fastapi.responses import JSONResponse

from tokenmill.server.errors import error_response
from tokenmill.server.served import ServedModels


def limits(engine) -> dict:
    """The settings that bound what the metrics can show (a queue under a full batch means
    something else at max_num_seqs 2 than at 64): what `tokenmill doctor` needs to read them."""
    c = engine.engine.config
    return {"max_num_seqs": c.scheduler.max_num_seqs, "max_num_batched_tokens": c.scheduler.max_num_batched_tokens,
            "num_kv_blocks": engine.engine.kv.num_blocks, "enable_prefix_caching": c.cache.enable_prefix_caching,
            # What the pool holds and in what ("auto" resolved): the capacity behind kv_cache_usage_perc.
            "kv_cache_tokens": engine.engine.kv.num_blocks * engine.block_size,
            "kv_cache_dtype": getattr(engine.engine.runner, "kv_cache_dtype", None),
            "speculative_method": c.speculative.speculative_method,
            "num_speculative_tokens": c.speculative.num_lookahead_tokens,
            "speculative_disable_by_batch_size": c.speculative.speculative_disable_by_batch_size}


def add_info_routes(app: FastAPI, models: ServedModels) -> None:
    # Serializing a tokenizer takes tens of ms: once per model, not per poll.
    cache: dict[str, dict] = {}

    def tokenizer_doc(name: str, engine) -> dict:
        if name not in cache:
            tok = engine.tokenizer
            doc = {"tokenizer_json": tok.backend.to_str(), "bos_token_id": tok.bos_token_id,
                   "eos_token_ids": list(tok.eos_token_ids), "chat_template": tok.chat_template,
                   "add_bos_token": tok.add_bos_token}
            digest = hashlib.sha256(repr(sorted(doc.items())).encode()).hexdigest()[:16]
            cache[name] = doc | {"fingerprint": f"{digest}-b{engine.block_size}"}
        return cache[name]

    @app.get("/v1/tokenmill/info")
    async def info():
        return JSONResponse({"models": [
            {"id": name, "block_size": engine.block_size, "max_model_len": engine.max_model_len,
             "fingerprint": tokenizer_doc(name, engine)["fingerprint"], "limits": limits(engine)}
            for name, engine in models.loaded.items()]})

    @app.get("/v1/tokenmill/tokenizer")
    async def tokenizer(model: str):
        engine = models.loaded.get(model)
        if engine is None:
            return error_response(404, f"the model {model!r} is not loaded here", code="model_not_found")
        return JSONResponse(tokenizer_doc(model, engine))
