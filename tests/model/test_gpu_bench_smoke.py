"""The end-to-end GPU benchmark's code path, on CPU with tiny shapes (the GPU run is
scripts/gpu_check.sh's): it must not first break in a scarce GPU slot."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU check runs the real benchmark")
def test_e2e_bench_smoke():
    run = subprocess.run([sys.executable, "benchmarks/gpu/e2e_bench.py", "--smoke"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "decode batch 1" in run.stdout and "transformers generate" in run.stdout
