"""`tokenmill serve` (or `tokenmill router`) as a real subprocess, and a tiny HF checkpoint dir for it to load."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.server.conftest import CHAT_TEMPLATE, free_port

REPO = Path(__file__).resolve().parents[2]


def write_tiny_checkpoint(path: Path) -> Path:
    """A tiny random Llama saved the way Hugging Face saves one (safetensors + tokenizer.json)."""
    from tests.tiny import tiny_hf_model, tiny_tokenizer

    tiny_hf_model("llama").save_pretrained(path)
    tiny_tokenizer().backend.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "chat_template": CHAT_TEMPLATE}))
    return path


class ServeProcess:
    def __init__(self, *args: str, startup_timeout: float = 120.0, port: int | None = None, wait: bool = True,
                 command: str = "serve"):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "tokenmill", command, "--port", str(self.port), "--log-level", "warning", *args]
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)
        if wait:
            self.wait_healthy(startup_timeout)

    def wait_healthy(self, startup_timeout: float = 120.0) -> None:
        deadline = time.monotonic() + startup_timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve exited with {self.proc.returncode}:\n{self.proc.stdout.read()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError("serve did not become healthy")
            time.sleep(0.2)

    def terminate(self, timeout: float = 60.0) -> int:
        self.proc.terminate()  # SIGTERM: the graceful drain
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
