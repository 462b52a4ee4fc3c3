"""How many threads torch uses while quantizing. Calibration works on small tensors in long
Python loops (GPTQ's columns, AWQ's grids): there, on a busy machine, torch's thread hand-offs
stall more than the second core gains (measured 2.5x slower with 2 threads than with 1 at a
load average of 13 on 2 cores), so quantization defaults to one thread."""

from __future__ import annotations

from contextlib import contextmanager

import torch


@contextmanager
def torch_threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
