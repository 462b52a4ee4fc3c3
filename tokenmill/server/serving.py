"""The OpenAI endpoints' logic: request -> (prompt ids, SamplingParams) -> engine -> response.

Kept apart from app.py so routes stay thin and this can be read top to bottom: validation
first (every problem becomes a 400 that names the field), then running, then formatting.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import jinja2
import jinja2.ext  # noqa: F401  (the tokenizer's sandbox environment needs the submodule loaded)
from fastapi import Request
from fastapi.responses import StreamingResponse

from tokenmill.engine.async_engine import AsyncEngine
from tokenmill.outputs import CompletionOutput, RequestOutput, TokenLogprobs
from tokenmill.sampling import MAX_N, SamplingParams
from tokenmill.server.errors import APIError
from tokenmill.server.metrics import ModelMetrics
from tokenmill.server.protocol import (
    AssistantMessage,
    AssistantRequestMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    ErrorInfo,
    ErrorResponse,
    PromptTokensDetails,
    ToolMessage,
    TopLogprob,
    Usage,
    UserMessage,
    _SamplingFields,
)
from tokenmill.server.streams import Started, merged, start_requests, until_disconnect
from tokenmill.server.tools import ToolCallDeltas, ToolMode, finish_reason, forced_call, message_tool_calls, tool_mode

log = logging.getLogger("tokenmill.server")

_SEED_MOD = 2**63 - MAX_N  # keeps seed + choice index (< n) inside torch's 64-bit range
# How long one request may wait for its constraint to compile. llguidance bounds the work
# itself (fuel limits); this bounds the wait, so a pathological schema fails its own request
# with a 400 and never holds a client (the engine loop never waits for a compile at all).
COMPILE_TIMEOUT_S = 10.0
_MEDIA_PARTS = {"image_url": "image", "input_audio": "audio", "file": "file"}


@dataclass
class Serving:
    """The endpoints for one served model, over its engine's async API only."""

    engine: AsyncEngine
    model_name: str
    metrics: ModelMetrics
    _token_text: dict[int, str] = field(default_factory=dict)
    # Engine request ids being answered now, so a drain that runs out of time can end them.
    active: set[str] = field(default_factory=set)

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    # -- validation ----------------------------------------------------------------------
    def check_length(self, prompts: list[list[int]], max_tokens: int | None, param: str) -> int:
        """Return max_tokens (the rest of the context when None); say the numbers when over."""
        if not prompts or any(not ids for ids in prompts):
            raise APIError(400, "the prompt is empty", param="prompt" if param == "max_tokens" else "messages")
        longest = max(len(ids) for ids in prompts)
        if max_tokens is None:
            # "The rest of the context", but never more than the KV pool could ever hold, or a
            # small pool would refuse every request that leaves max_tokens out.
            room = min(self.max_model_len, self.engine.max_kv_tokens) - longest
            wanted = room if room >= 1 else self.max_model_len - longest
        else:
            wanted = max_tokens
        if longest >= self.max_model_len or longest + wanted > self.max_model_len:
            raise APIError(
                400,
                f"this model's maximum context length is {self.max_model_len} tokens; you requested "
                f"{longest + wanted} tokens ({longest} in the prompt, {wanted} for the completion)",
                param=param, code="context_length_exceeded",
            )
        return wanted

    def check_fields(self, req: _SamplingFields, n: int) -> None:
        """What the schema cannot say: token ids within this model's vocabulary, and the
        OpenAI fields tokenmill does not implement refused rather than silently ignored."""
        vocab = self.tokenizer.vocab_size
        if req.stop_token_ids and max(req.stop_token_ids) >= vocab:
            raise APIError(400, f"stop_token_ids must be token ids below the vocabulary size {vocab}",
                           param="stop_token_ids", code="invalid_value")
        if req.logit_bias:
            bad = next((k for k in req.logit_bias if int(k) >= vocab), None)
            if bad is not None:
                raise APIError(400, f"logit_bias: token id {bad[:20]} is not below the vocabulary size {vocab}",
                               param="logit_bias", code="invalid_value")
            raise APIError(400, "logit_bias is not supported by this server", param="logit_bias",
                           code="unsupported_parameter")
        best_of = getattr(req, "best_of", None)
        if best_of is not None and best_of != n:
            what = "must be >= n" if best_of < n else "other than n is not supported (every choice is returned)"
            raise APIError(400, f"best_of ({best_of}) {what} (n = {n})", param="best_of",
                           code="invalid_value" if best_of < n else "unsupported_parameter")

    def sampling_params(self, req: _SamplingFields, max_tokens: int, logprobs: int | None) -> SamplingParams:
        top_k = -1 if req.top_k is None else req.top_k
        if top_k >= self.tokenizer.vocab_size:  # the same as no top-k, and keeps the sampler's tensors small
            top_k = -1
        try:
            return SamplingParams(
                n=req.n,
                max_tokens=max_tokens,
                min_tokens=req.min_tokens,
                temperature=1.0 if req.temperature is None else req.temperature,
                top_p=1.0 if req.top_p is None else req.top_p,
                top_k=top_k,
                min_p=0.0 if req.min_p is None else req.min_p,
                presence_penalty=req.presence_penalty,
                frequency_penalty=req.frequency_penalty,
                repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
                seed=None if req.seed is None else req.seed % _SEED_MOD,
                stop=req.stop or [],
                stop_token_ids=req.stop_token_ids or [],
                include_stop_str_in_output=req.include_stop_str_in_output,
                ignore_eos=req.ignore_eos,
                logprobs=logprobs,
                skip_special_tokens=req.skip_special_tokens,
            )
        except ValueError as e:
            message = str(e)
            raise APIError(400, message, param=message.split(" ", 1)[0]) from None

    async def constrained(self, req: _SamplingFields, params: SamplingParams,
                          tools: ToolMode | None = None) -> SamplingParams:
        """params with the structured output the request asks for (response_format, guided_*,
        or a forced tool call). The constraint is compiled (and cached) now, off the event
        loop, so a bad one is a 400 naming its field before anything reaches the engine."""
        field_name = None
        try:
            structured, field_name = req.structured_output()
            call = forced_call(req, tools) if isinstance(req, ChatCompletionRequest) else None
            if call is not None:
                if structured is not None:
                    raise ValueError("tool_choice required/named cannot be combined with response_format")
                structured, field_name = call, "tool_choice"
        except ValueError as e:
            message = str(e)
            named = message.split(":", 1)[0]  # the messages start with the field they are about
            raise APIError(400, message, param=named if named.isidentifier() else field_name or "response_format") from None
        if structured is None:
            return params
        try:
            await asyncio.wait_for(self.engine.check_structured(structured), COMPILE_TIMEOUT_S)
        except ValueError as e:
            raise APIError(400, f"{field_name}: {e}", param=field_name) from None
        except TimeoutError:
            raise APIError(400, f"{field_name}: the constraint did not compile within {COMPILE_TIMEOUT_S:g} s; "
                                "simplify it", param=field_name, code="constraint_too_complex") from None
        return dataclasses.replace(params, structured=structured)

    # -- formatting helpers --------------------------------------------------------------
    def token_text(self, token_id: int) -> str:
        text = self._token_text.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id], skip_special_tokens=False)
            if len(self._token_text) < 1_000_000:
                self._token_text[token_id] = text
        return text

    def usage(self, finals: dict[int, RequestOutput]) -> Usage:
        prompt = sum(len(o.prompt_token_ids) for o in finals.values())
        completion = sum(len(c.token_ids) for o in finals.values() for c in o.outputs)
        cached = sum(o.num_cached_tokens for o in finals.values())
        return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                     prompt_tokens_details=PromptTokensDetails(cached_tokens=cached))

    def completion_logprobs(self, entries: list[TokenLogprobs], offset: int) -> CompletionLogprobs:
        lp = CompletionLogprobs()
        for e in entries:
            token = self.token_text(e.sampled.token_id)
            lp.tokens.append(token)
            lp.token_logprobs.append(e.sampled.logprob)
            top: dict[str, float] = {}
            for t in e.top:  # tokens that decode alike (partial UTF-8) keep the likelier entry
                top.setdefault(self.token_text(t.token_id), t.logprob)
            lp.top_logprobs.append(top)
            lp.text_offset.append(offset)
            offset += len(token)
        return lp

    def chat_logprobs(self, entries: list[TokenLogprobs]) -> ChatLogprobs:
        def top(t) -> TopLogprob:
            text = self.token_text(t.token_id)
            return TopLogprob(token=text, logprob=t.logprob, bytes=list(text.encode("utf-8")))

        content = []
        for e in entries:
            s = top(e.sampled)
            content.append(ChatTokenLogprob(token=s.token, logprob=s.logprob, bytes=s.bytes,
                                            top_logprobs=[top(t) for t in e.top]))
        return ChatLogprobs(content=content)

    # -- running -------------------------------------------------------------------------
    async def _run(self, http: Request, prompts: list[list[int]], params: SamplingParams, prefix: str,
                   priority: int) -> Started:
        request_id = f"{prefix}-{uuid.uuid4().hex}"
        started = await until_disconnect(http, start_requests(self.engine, prompts, params, request_id, priority))
        self.active.update(first.request_id for _, first in started)
        return started

    async def _merged(self, started: Started) -> AsyncIterator[tuple[int, RequestOutput]]:
        try:
            async for i, out in merged(started):
                if out.finished:
                    self.metrics.observe_finished(out)
                yield i, out
        finally:
            self.active.difference_update(first.request_id for _, first in started)

    def abort_all(self) -> int:
        """End every request being answered (finish_reason "abort"); their clients still get
        a well-formed response with what was generated so far."""
        ids = list(self.active)
        for request_id in ids:
            self.engine.abort(request_id)
        return len(ids)

    async def _collect(self, http: Request, started: Started) -> dict[int, RequestOutput]:
        async def gather() -> dict[int, RequestOutput]:
            finals: dict[int, RequestOutput] = {}
            async for i, out in self._merged(started):
                finals[i] = out
            return finals

        return await until_disconnect(http, gather())

    # -- /v1/completions -----------------------------------------------------------------
    def completion_prompts(self, req: CompletionRequest) -> tuple[list[list[int]], list[str]]:
        p = req.prompt
        if isinstance(p, str):
            texts: list[str | list[int]] = [p]
        elif p and isinstance(p[0], int):
            texts = [p]
        else:
            texts = list(p)
        ids, echo = [], []
        for t in texts:
            if isinstance(t, str):
                ids.append(self.tokenizer.encode(t))
                echo.append(t)
            else:
                if t and max(t) >= self.tokenizer.vocab_size:
                    raise APIError(400, f"prompt token ids must be below the vocabulary size "
                                        f"{self.tokenizer.vocab_size}", param="prompt", code="invalid_value")
                ids.append(list(t))
                echo.append(None)
        # Decoding token prompts (for echo) is done only when asked, and after validation.
        return ids, echo

    async def completions(self, req: CompletionRequest, http: Request):
        if req.suffix:
            raise APIError(400, "suffix is not supported", param="suffix")
        self.check_fields(req, req.n)
        # Off the event loop: tokenizing a long prompt takes seconds, and every other request waits on the loop.
        prompts, prompt_texts = await asyncio.to_thread(self.completion_prompts, req)
        max_tokens = self.check_length(prompts, req.max_tokens, "max_tokens")
        params = await self.constrained(req, self.sampling_params(req, max_tokens, req.logprobs))
        started = await self._run(http, prompts, params, "cmpl", req.priority)
        base = started[0][1].request_id.rsplit("-", 1)[0]
        echo = [""] * len(prompts)
        if req.echo:
            echo = [t if t is not None else self.tokenizer.decode(ids) for t, ids in zip(prompt_texts, prompts)]
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return _sse(self._completion_events(started, base, req, echo, include_usage))
        finals = await self._collect(http, started)
        choices = []
        for i in sorted(finals):
            for c in finals[i].outputs:
                choices.append(self._completion_choice(i * req.n + c.index, c, echo[i], req.logprobs))
        return CompletionResponse(id=base, model=self.model_name, choices=choices, usage=self.usage(finals))

    def _completion_choice(self, index: int, c: CompletionOutput, echo: str, logprobs: int | None) -> CompletionChoice:
        lp = self.completion_logprobs(c.logprobs or [], len(echo)) if logprobs is not None else None
        return CompletionChoice(index=index, text=echo + c.text, logprobs=lp,
                                finish_reason=_finish(c), stop_reason=c.stop_reason)

    async def _completion_events(
        self, started: Started, base: str, req: CompletionRequest, echo: list[str], include_usage: bool
    ) -> AsyncIterator[str]:
        sent_text: dict[tuple[int, int], int] = {}
        sent_lp: dict[tuple[int, int], int] = {}
        finals: dict[int, RequestOutput] = {}
        async for i, out in self._merged(started):
            finals[i] = out
            choices = []
            for c in out.outputs:
                key = (i, c.index)
                first = key not in sent_text
                start, lp_start = sent_text.get(key, 0), sent_lp.get(key, 0)
                delta = c.text[start:]
                new_lp = (c.logprobs or [])[lp_start:]
                if not delta and not c.finished and not new_lp and not first:
                    continue
                prefix = echo[i] if first else ""
                sent_text[key], sent_lp[key] = len(c.text), lp_start + len(new_lp)
                lp = None
                if req.logprobs is not None:
                    offset = len(echo[i]) + start
                    lp = self.completion_logprobs(new_lp, offset)
                choices.append(CompletionChoice(index=i * req.n + c.index, text=prefix + delta, logprobs=lp,
                                                finish_reason=_finish(c), stop_reason=c.stop_reason))
            if choices:
                yield _event(CompletionResponse(id=base, model=self.model_name, choices=choices))
        if include_usage:
            yield _event(CompletionResponse(id=base, model=self.model_name, choices=[], usage=self.usage(finals)))
        yield "data: [DONE]\n\n"

    # -- /v1/chat/completions ------------------------------------------------------------
    def chat_messages(self, req: ChatCompletionRequest) -> list[dict]:
        """The messages as the chat template takes them; 400 for parts this model cannot read."""
        messages = []
        for k, m in enumerate(req.messages):
            if isinstance(m, UserMessage) and isinstance(m.content, list):
                for j, part in enumerate(m.content):
                    if part.type in _MEDIA_PARTS:
                        raise APIError(
                            400, f"this model does not take {_MEDIA_PARTS[part.type]} input: "
                                 f"messages[{k}].content[{j}] is a {part.type} part; send text parts only",
                            param=f"messages[{k}].content[{j}]", code="unsupported_content")
            message = {"role": m.role, "content": m.text()}
            if isinstance(m, AssistantRequestMessage) and m.tool_calls:
                # Written back the way tool calls are parsed out of an answer (tools.py), so the
                # model reads its earlier calls in its own convention.
                calls = "".join(
                    "<tool_call>" + json.dumps({"name": c.function.name, "arguments": c.function.arguments})
                    + "</tool_call>" for c in m.tool_calls)
                message["content"] += calls
            if isinstance(m, ToolMessage):
                message["tool_call_id"] = m.tool_call_id
            if getattr(m, "name", None):
                message["name"] = m.name
            messages.append(message)
        return messages

    def chat_prompt(self, req: ChatCompletionRequest) -> list[int]:
        messages = self.chat_messages(req)
        try:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=req.add_generation_prompt)
        except (jinja2.TemplateError, ValueError) as e:
            raise APIError(400, f"could not render the chat template: {e}", param="messages") from None
        # The template writes BOS and every special token itself.
        return self.tokenizer.encode(text, add_special_tokens=False)

    async def chat(self, req: ChatCompletionRequest, http: Request):
        tools = tool_mode(req)
        if req.top_logprobs and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
        self.check_fields(req, req.n)
        prompt = await asyncio.to_thread(self.chat_prompt, req)  # off the event loop, as for completions
        wanted = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        max_tokens = self.check_length([prompt], wanted, param)
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        params = await self.constrained(req, self.sampling_params(req, max_tokens, logprobs), tools)
        started = await self._run(http, [prompt], params, "chatcmpl", req.priority)
        base = started[0][1].request_id.rsplit("-", 1)[0]
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return _sse(self._chat_events(started, base, req, include_usage, tools))
        finals = await self._collect(http, started)
        choices = [
            ChatChoice(
                index=c.index,
                message=AssistantMessage(content=c.text),
                logprobs=self.chat_logprobs(c.logprobs or []) if req.logprobs else None,
                finish_reason=_finish(c),
                stop_reason=c.stop_reason,
            )
            for c in finals[0].outputs
        ]
        if tools is not None:
            for choice in choices:
                message_tool_calls(choice, tools)
        return ChatCompletionResponse(id=base, model=self.model_name, choices=choices, usage=self.usage(finals))

    async def _chat_events(
        self, started: Started, base: str, req: ChatCompletionRequest, include_usage: bool, tools: ToolMode | None
    ) -> AsyncIterator[str]:
        # A forced tool call streams as tool_call deltas; an "auto" one stays plain text.
        calls = ToolCallDeltas() if tools in ("required", "named") else None

        def chunk(choices, usage=None) -> str:
            return _event(ChatCompletionChunk(id=base, model=self.model_name, choices=choices, usage=usage))

        # The first chunk of every choice carries the role, as OpenAI's does.
        yield chunk([ChatChunkChoice(index=j, delta=DeltaMessage(role="assistant", content=""))
                     for j in range(req.n)])
        sent_text: dict[int, int] = {}
        sent_lp: dict[int, int] = {}
        finals: dict[int, RequestOutput] = {}
        async for i, out in self._merged(started):
            finals[i] = out
            choices = []
            for c in out.outputs:
                start, lp_start = sent_text.get(c.index, 0), sent_lp.get(c.index, 0)
                delta = c.text[start:]
                new_lp = (c.logprobs or [])[lp_start:]
                if not delta and not c.finished and not new_lp:
                    continue
                sent_text[c.index], sent_lp[c.index] = len(c.text), lp_start + len(new_lp)
                if calls is not None:
                    message = DeltaMessage(tool_calls=calls.feed(c.index, c.text, c.finished))
                else:
                    message = DeltaMessage(content=delta)
                choices.append(ChatChunkChoice(
                    index=c.index,
                    delta=message,
                    logprobs=self.chat_logprobs(new_lp) if req.logprobs else None,
                    finish_reason=finish_reason(_finish(c), tools),
                ))
            if choices:
                yield chunk(choices)
        if include_usage:
            yield chunk([], self.usage(finals))
        yield "data: [DONE]\n\n"


def _finish(c: CompletionOutput) -> str | None:
    return c.finish_reason


async def _errors_as_events(events: AsyncIterator[str]) -> AsyncIterator[str]:
    """Once a stream has started its status is sent; an engine failure after that can only be
    reported in-band, as OpenAI does: an error event, then the end of the stream."""
    try:
        async for event in events:
            yield event
    except Exception as exc:
        log.exception("stream failed")
        error = ErrorResponse(error=ErrorInfo(message=f"generation failed: {exc}", type="internal_server_error"))
        yield f"data: {error.model_dump_json()}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        await events.aclose()


def _event(model) -> str:
    return f"data: {model.model_dump_json()}\n\n"


class _SSEResponse(StreamingResponse):
    """Closes its iterator however the response ends, so a client that vanished mid-stream
    aborts its engine requests now rather than whenever the generator is collected."""

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


def _sse(events: AsyncIterator[str]) -> StreamingResponse:
    return _SSEResponse(_errors_as_events(events), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
