"""Tool calls on /v1/chat/completions: which mode a request asks for, the constraint that
forces a call, and turning the generated text into OpenAI's `tool_calls` (whole or streamed).

Two modes. tool_choice "required" or a named function constrains the output to one call
(tokenmill.structured.tools' grammar), so the text is always a call and a stream can be cut
into tool_call deltas as it grows. tool_choice "auto" (or left out, with tools) leaves the
model free; a finished answer's `<tool_call>` blocks become calls, a stream stays plain text.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Literal

from tokenmill.sampling import StructuredOutput
from tokenmill.server.errors import APIError
from tokenmill.server.protocol import (
    ChatChoice,
    ChatCompletionRequest,
    DeltaFunctionCall,
    DeltaToolCall,
    FunctionCall,
    ToolCall,
)
from tokenmill.structured.tools import ToolCallStream, parse_auto_tool_calls, parse_tool_call, tool_call_constraint

ToolMode = Literal["required", "named", "auto"]


def tool_mode(req: ChatCompletionRequest) -> ToolMode | None:
    """None when tool calls play no part; 400 when tool_choice asks for a call without tools."""
    if req.tool_choice not in (None, "none", "auto") and not req.tools:
        raise APIError(400, "tool_choice needs tools", param="tool_choice")
    if not req.tools or req.tool_choice == "none":
        return None
    if req.tool_choice in (None, "auto"):
        return "auto"
    return "required" if req.tool_choice == "required" else "named"


def forced_call(req: ChatCompletionRequest, mode: ToolMode | None) -> StructuredOutput | None:
    """The constraint that makes the output one call, when the mode forces one; ValueError
    when the tool_choice names no given tool."""
    if mode not in ("required", "named"):
        return None
    named = req.tool_choice.function.name if mode == "named" else None
    return tool_call_constraint([t.function.model_dump() for t in req.tools], named)


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def finish_reason(reason: str | None, mode: ToolMode | None) -> str | None:
    """A forced call that ended by itself ended because the call was complete."""
    return "tool_calls" if reason == "stop" and mode in ("required", "named") else reason


def message_tool_calls(choice: ChatChoice, mode: ToolMode) -> None:
    """Move the calls in a finished choice's text into message.tool_calls (in place); text
    that holds none (a forced call cut short, an auto answer with no call) stays content."""
    text = choice.message.content or ""
    if mode == "auto":
        calls = parse_auto_tool_calls(text)
    else:
        call = parse_tool_call(text)
        calls = [call] if call is not None else []
    if not calls:
        return
    choice.message.tool_calls = [ToolCall(id=call_id(), function=FunctionCall(name=n, arguments=a)) for n, a in calls]
    choice.message.content = None
    if choice.finish_reason == "stop":
        choice.finish_reason = "tool_calls"


@dataclass
class ToolCallDeltas:
    """A forced call streamed: per choice, the call's name once (with its id), then the
    arguments in fragments as the text grows."""

    _streams: dict[int, tuple[ToolCallStream, str]] = field(default_factory=dict)

    def feed(self, index: int, text: str, finished: bool) -> list[DeltaToolCall] | None:
        """text: choice `index`'s whole output so far. None when nothing new can be sent yet."""
        stream, id_ = self._streams.setdefault(index, (ToolCallStream(), call_id()))
        name, args = stream.feed(text, finished)
        if name is None and not args:
            return None
        return [DeltaToolCall(index=0, id=id_ if name is not None else None, type="function" if name else None,
                              function=DeltaFunctionCall(name=name, arguments=args))]
