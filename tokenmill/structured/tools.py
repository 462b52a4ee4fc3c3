"""Tool calls: the grammar that makes the output one valid call of the given tools, and the
parser (whole text or streamed) that turns that output back into name + arguments.

The constrained output is `{"name": "<tool>", "arguments": <JSON per the tool's schema>}`;
the prefix up to the arguments is fixed per tool, so a stream can be cut into deltas exactly.
"""

from __future__ import annotations

import json
import re

from tokenmill.structured.compiler import JSON_OPTIONS
from tokenmill.sampling import StructuredOutput

_PREFIX = re.compile(r'\{"name": ("(?:[^"\\]|\\.)*"), "arguments": ')
_AUTO_CALL = re.compile(r"<tool_call>\s*(\{.*?\})\s*</tool_call>", re.S)


def tool_call_constraint(tools: list[dict], name: str | None = None) -> StructuredOutput:
    """tools: OpenAI `function` objects ({"name", "parameters"}); name: the one a call must use."""
    chosen = [t for t in tools if name is None or t["name"] == name]
    if not chosen:
        raise ValueError(f"tool_choice names the function {name!r}, which is not among the tools")
    alts, rules = [], []
    for k, t in enumerate(chosen):
        schema = dict(t.get("parameters") or {"type": "object"})
        schema["x-guidance"] = JSON_OPTIONS
        prefix = json.dumps('{"name": ' + json.dumps(t["name"]) + ', "arguments": ')
        alts.append(f"call_{k}")
        rules.append(f"call_{k}: {prefix} %json {json.dumps(schema)} \"}}\"")
    return StructuredOutput(grammar="start: " + " | ".join(alts) + "\n" + "\n".join(rules))


def parse_tool_call(text: str) -> tuple[str, str] | None:
    """(name, arguments JSON text) of a constrained call; None if the text is not one (cut short)."""
    m = _PREFIX.match(text)
    if m is None or not text.endswith("}"):
        return None
    args = text[m.end() : -1]
    try:
        json.loads(args)
    except ValueError:
        return None
    return json.loads(m.group(1)), args


def parse_auto_tool_calls(text: str) -> list[tuple[str, str]]:
    """Calls a model wrote itself as `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`
    (the Hermes/Qwen template convention); malformed ones are left as text (not returned)."""
    calls = []
    for m in _AUTO_CALL.finditer(text):
        try:
            obj = json.loads(m.group(1))
        except ValueError:
            continue
        if isinstance(obj, dict) and isinstance(obj.get("name"), str):
            calls.append((obj["name"], json.dumps(obj.get("arguments", {}))))
    return calls


class ToolCallStream:
    """Cuts a growing constrained call into (name once, then argument fragments)."""

    def __init__(self):
        self.name: str | None = None
        self._args_start = 0
        self._sent = 0  # characters of the arguments sent so far

    def feed(self, text: str, finished: bool) -> tuple[str | None, str]:
        """text: everything generated so far. Returns (name if it just became known, new arguments)."""
        new_name = None
        if self.name is None:
            m = _PREFIX.match(text)
            if m is None:
                return None, ""
            self.name = new_name = json.loads(m.group(1))
            self._args_start = m.end()
        args = text[self._args_start :]
        # Hold back the last character until the end: it may be the call's closing brace.
        upto = len(args) if finished and not args.endswith("}") else len(args) - 1
        upto = max(upto, self._sent)
        delta = args[self._sent : upto]
        self._sent = max(self._sent, upto)
        return new_name, delta
