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
from tokenmill.cli import (
    build_parser, engine_config, engine_flag, engine_settings, main, parse_bytes, read_api_keys, run_chat, sampling_params,
)
from tokenmill.config import DEFAULT_MODEL, EngineConfig


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
    assert (cfg.load.model, cfg.load.dtype, cfg.load.quantization) == ("m.gguf", "bfloat16", "int8")
    assert (cfg.scheduler.max_num_seqs, cfg.scheduler.max_num_batched_tokens, cfg.scheduler.max_model_len) == (3, 256, 1024)
    assert (cfg.cache.kv_cache_memory_bytes, cfg.cache.block_size, cfg.cache.enable_prefix_caching) == (64 * 2**20, 32, False)
    assert (cfg.scheduler.max_waiting_requests, cfg.runtime.seed) == (7, 5)
    assert args.api_key == ["a", "b"] and args.port == 9000 and args.host == "127.0.0.1"


def test_defaults_are_the_default_model():
    args = build_parser().parse_args(["serve"])
    assert engine_config(args).load.model == DEFAULT_MODEL and args.port == 8000


def _engine_actions(command: str = "serve") -> dict[str, argparse.Action]:
    sub = build_parser()._subparsers._group_actions[0].choices[command]
    return {a.dest: a for a in sub._actions}


# Settings deliberately without a flag (none today: add one here with the reason why).
NO_FLAG: set[str] = set()


@pytest.mark.parametrize("command", ["serve", "generate", "chat", "run-batch"])
def test_every_setting_has_a_flag_defaulting_to_the_dataclass(command):
    actions = _engine_actions(command)
    settings = EngineConfig.settings()
    assert set(settings) - NO_FLAG <= set(actions)
    for name, (_, f) in settings.items():
        if name not in NO_FLAG:
            assert actions[name].default == f.default, name
            assert actions[name].help, name


def test_flags_default_to_the_default_config():
    assert engine_config(build_parser().parse_args(["serve"])) == EngineConfig()


@pytest.mark.parametrize("flag, setting, value", [
    ("--no-prefix-cache", "enable_prefix_caching", False), ("--enforce-eager", "enforce_eager", True),
    ("--debug-checks", "debug_checks", True),
])
def test_switches_flip_their_default(flag, setting, value):
    args = build_parser().parse_args(["serve", flag])
    assert engine_settings(args)[setting] is value


def test_flag_spellings():
    flags = {engine_flag(f) for _, f in EngineConfig.settings().values()}
    assert {"--kv-cache-memory", "--no-prefix-cache", "--max-num-seqs", "--speculative-method",
            "--gpu-memory-utilization", "--num-kv-blocks", "--speculative-disable-by-batch-size"} <= flags
    args = build_parser().parse_args(["generate", "x", "--kv-cache-memory", "1.5GiB", "--num-kv-blocks", "9",
                                      "--speculative-method", "ngram", "--prompt-lookup-max", "5"])
    cfg = engine_config(args)
    assert (cfg.cache.kv_cache_memory_bytes, cfg.cache.num_kv_blocks) == (int(1.5 * 2**30), 9)
    assert (cfg.speculative.speculative_method, cfg.speculative.prompt_lookup_max) == ("ngram", 5)
    assert cfg.speculative.num_lookahead_tokens == 4


def test_bad_choice_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--dtype", "float8"])
    assert "--dtype" in capsys.readouterr().err


def test_from_flat_groups_settings_and_rejects_unknown_names():
    cfg = EngineConfig.from_flat(model="m", block_size=8, max_num_seqs=4, speculative_method="ngram", seed=3)
    assert (cfg.load.model, cfg.cache.block_size, cfg.scheduler.max_num_seqs, cfg.runtime.seed) == ("m", 8, 4, 3)
    assert cfg.speculative.num_lookahead_tokens == 4 and EngineConfig().speculative.num_lookahead_tokens == 0
    with pytest.raises(TypeError, match="'blok_size'"):
        EngineConfig.from_flat(blok_size=8)


def test_pre_grouping_reads_fail_loudly():
    # No group shares a setting's name, so a stale `config.block_size` cannot find a group instead.
    cfg = EngineConfig()
    for name in EngineConfig.settings():
        assert not hasattr(cfg, name), name


@pytest.mark.parametrize("name, value", [
    ("block_size", 0), ("kv_cache_memory_bytes", -1), ("num_kv_blocks", 0), ("max_num_seqs", 0),
    ("max_num_batched_tokens", 1.5), ("max_model_len", 0), ("max_waiting_requests", True), ("dtype", "fp64"),
    ("device", "tpu"), ("quantization", "int3"), ("quant_group_size", 0), ("dense_weight_limit_gb", -1.0),
    ("gpu_memory_utilization", 1.5), ("num_threads", 0),
])
def test_validation_errors_name_the_setting(name, value):
    with pytest.raises(ValueError, match=name):
        EngineConfig.from_flat(**{name: value})


@pytest.mark.parametrize("name, value", [
    ("speculative_method", "medusa"), ("num_speculative_tokens", 0), ("prompt_lookup_min", 0),
    ("prompt_lookup_max", 1), ("speculative_disable_by_batch_size", 0),
])
def test_speculative_validation_names_the_setting(name, value):
    with pytest.raises(ValueError, match=name):
        EngineConfig.from_flat(**{"speculative_method": "ngram", name: value})


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
