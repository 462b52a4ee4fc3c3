"""The layer contracts in pyproject.toml ([tool.importlinter]) hold: one test per contract, so a
failure names the contract and lists the offending imports."""

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONTRACTS = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]

# In a child process: import-linter puts its working directory on sys.path, and the graph it
# builds must be of this checkout's tokenmill, whatever the test process imported.
LINT = (
    "import sys; from importlinter.cli import lint_imports; "
    "sys.exit(lint_imports(limit_to_contracts=(sys.argv[1],), no_cache=True, no_logo=True))"
)


@pytest.mark.parametrize("contract", [c["id"] for c in CONTRACTS])
def test_layer_contract(contract):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", LINT, contract], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
