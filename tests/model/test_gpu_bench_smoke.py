"""The end-to-end GPU benchmark's code path, on CPU with tiny shapes and without gguf (which
the GPU image lacks): it must not first break in a scarce GPU slot."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
# As on the GPU image: no gguf. The benchmark must not import what needs it.
RUN_WITHOUT_GGUF = (
    "import sys, runpy; sys.modules['gguf'] = None; sys.argv = ['e2e_bench.py', '--smoke']; "
    "runpy.run_path('benchmarks/gpu/e2e_bench.py', run_name='__main__')"
)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU check runs the real benchmark")
def test_e2e_bench_smoke_without_gguf():
    run = subprocess.run([sys.executable, "-c", RUN_WITHOUT_GGUF], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "decode batch 1" in run.stdout and "transformers generate" in run.stdout
