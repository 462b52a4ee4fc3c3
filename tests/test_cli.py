"""The CLI: flags -> EngineConfig, sizes, key files, and `generate`/`chat` on a tiny checkpoint."""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import subprocess
import sys

import pytest

from tests.server.process import REPO, write_tiny_checkpoint
from tokenmill.cli import build_parser, engine_config, main, parse_bytes, read_api_keys, run_chat, sampling_params


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-cli"))


@pytest.mark.parametrize("text, value", [("512MiB", 512 * 2**20), ("2GiB", 2 * 2**30), ("1.5G", 1_500_000_000),
                                         ("1000", 1000), ("64kib", 65536)])
def test_parse_bytes(text, value):
    assert parse_bytes(text) == value


@pytest.mark.parametrize("text", ["", "MiB", "-5MiB", "12 parsecs", "0"])
def test_parse_bytes_rejects(text):
    with pytest.raises(argparse.ArgumentTypeError):
        parse_bytes(text)


def test_serve_flags_build_engine_config():
    args = build_parser().parse_args([
        "serve", "--model", "m.gguf", "--dtype", "bfloat16", "--quantization", "int8", "--max-num-seqs", "3",
        "--max-num-batched-tokens", "256", "--max-model-len", "1024", "--kv-cache-memory", "64MiB",
        "--block-size", "32", "--no-prefix-cache", "--max-waiting-requests", "7", "--seed", "5",
        "--api-key", "a", "--api-key", "b", "--port", "9000",
    ])
    cfg = engine_config(args)
    assert (cfg.model, cfg.dtype, cfg.quantization, cfg.max_num_seqs) == ("m.gguf", "bfloat16", "int8", 3)
    assert (cfg.max_num_batched_tokens, cfg.max_model_len, cfg.kv_cache_memory_bytes) == (256, 1024, 64 * 2**20)
    assert (cfg.block_size, cfg.enable_prefix_caching, cfg.max_waiting_requests, cfg.seed) == (32, False, 7, 5)
    assert args.api_key == ["a", "b"] and args.port == 9000 and args.host == "127.0.0.1"


def test_defaults_are_the_default_model():
    args = build_parser().parse_args(["serve"])
    assert engine_config(args).model == "smollm2" and args.port == 8000


def test_bad_engine_flag_is_a_clear_error(capsys):
    assert main(["generate", "hi", "--max-num-seqs", "0"]) == 2
    assert "max_num_seqs" in capsys.readouterr().err


def test_api_key_file(tmp_path):
    f = tmp_path / "keys"
    f.write_text("# comment\nsk-1\n\n  sk-2  \n")
    assert read_api_keys(["sk-0"], str(f)) == ["sk-0", "sk-1", "sk-2"]


def test_bench_is_wired():
    try:
        import tokenmill.bench.cli  # noqa: F401
    except ImportError:
        assert main(["bench"]) == 2  # a clear message, not a traceback
    else:
        with pytest.raises(SystemExit) as e:
            main(["bench", "--help"])
        assert e.value.code == 0


def test_generate_subprocess(tiny_dir):
    out = subprocess.run(
        [sys.executable, "-m", "tokenmill", "generate", "The quick brown fox", "--model", str(tiny_dir),
         "--max-tokens", "5", "--temperature", "0"],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip()


def test_chat_repl_streams_and_exits(tiny_dir):
    args = build_parser().parse_args(["chat", "--model", str(tiny_dir), "--max-tokens", "4", "--temperature", "0"])
    stdin, stdout = io.StringIO("hello\n\nsecond turn\n/exit\nnever read\n"), io.StringIO()
    assert asyncio.run(run_chat(engine_config(args), sampling_params(args), "be brief", stdin, stdout)) == 0
    assert stdout.getvalue().count("> ") == 4  # two answered turns, one blank line, then /exit


def test_serve_exits_1_when_the_model_does_not_load(tmp_path):
    from tests.server.conftest import free_port

    out = subprocess.run(
        [sys.executable, "-m", "tokenmill", "serve", "--model", str(tmp_path / "missing.gguf"),
         "--port", str(free_port())],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 1
    assert "missing.gguf" in out.stderr
