"""Per-step values that layers deep in the model read, set once per forward instead of being
threaded through every layer's forward(x).

Today that is one value, for the CPU's quantized linears (quant.py): from which row of the
flattened batch on the rows are prompt tokens, which they run through their bfloat16 dense
copies. The model's forward enters `step_context`; `current_step()` reads it. A context variable
rather than a module global: a thread (an engine loop runs in its own) sees only the step it
entered.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Iterator


@dataclass(frozen=True)
class StepContext:
    # Rows from here on are prompt tokens (the runner orders them last). None: no row is known
    # to be one, so every row runs the quantized kernels, as outside a forward.
    first_prompt_row: int | None = None


_current: ContextVar[StepContext] = ContextVar("tokenmill_step_context", default=StepContext())


@contextmanager
def step_context(ctx: StepContext) -> Iterator[StepContext]:
    token = _current.set(ctx)
    try:
        yield ctx
    finally:
        _current.reset(token)


def current_step() -> StepContext:
    return _current.get()
