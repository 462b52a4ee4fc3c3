"""Start-up (issue 21 item 4): the GGUF read in place equals gguf's reader, built kernels are
imported from their cache (and a bad cache entry is rebuilt, never a crash), the fast
dequantizer and the lazily zeroed KV pool equal what they replace, the default model's hash is
not recomputed for a file already checked, and every phase is logged."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize

from tests.model.gguf_files import write_tiny_gguf
from tokenmill.model import cpp_build, loader, qkernels
from tokenmill.model.gguf_blocks import QuantizedWeight
from tokenmill.model.gguf_file import GGUFFormatError, read_gguf_file
from tokenmill.model.host import lazy_zeros


def assert_same_as_gguf_reader(path: str) -> None:
    ours, theirs = read_gguf_file(path), GGUFReader(path)
    assert list(ours.metadata) == [k for k in theirs.fields if not k.startswith("GGUF.")]
    for key, value in ours.metadata.items():
        assert value == theirs.fields[key].contents(), key
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
    for a, b in zip(ours.tensors, theirs.tensors):
        assert (a.tensor_type, list(a.shape), a.data_offset, a.n_bytes) == (
            b.tensor_type, b.shape.tolist(), b.data_offset, b.n_bytes), a.name
        assert a.data.dtype == b.data.dtype and a.data.shape == b.data.shape, a.name
        assert np.array_equal(a.data.view(np.uint8), np.asarray(b.data).view(np.uint8)), a.name


@pytest.mark.parametrize("qtype", [None, Q.Q4_0, Q.Q4_1, Q.Q8_0])
def test_gguf_file_reads_what_gguf_reader_reads(tmp_path, qtype):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, quantized=qtype)
    assert_same_as_gguf_reader(str(path))


@pytest.mark.slow  # gguf's reader takes 10+ s on the default model's vocabulary
def test_gguf_file_reads_the_default_model_as_gguf_reader_does():
    assert_same_as_gguf_reader(str(loader.default_model_path()))


def test_gguf_file_tensors_are_views_of_the_mapped_file(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path)
    f = read_gguf_file(str(path))
    assert all(not t.data.flags.owndata and not t.data.flags.writeable for t in f.tensors)


@pytest.mark.parametrize("cut", [3, 10, 30, 200])
def test_gguf_file_cut_inside_the_header_is_a_format_error(tmp_path, cut):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path)
    path.write_bytes(path.read_bytes()[:cut])
    with pytest.raises(GGUFFormatError):
        read_gguf_file(str(path))


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q8_0])
@pytest.mark.parametrize("shape", [(1, 32), (7, 96), (33, 320)])
def test_fast_dequantize_is_bit_identical_to_gguf(qtype, shape):
    w = np.random.default_rng(sum(shape)).standard_normal(shape).astype(np.float32) * 3
    qw = QuantizedWeight(quantize(w, qtype), qtype, shape)
    ref = np.asarray(gguf_dequantize(qw.data, qtype), dtype=np.float32).reshape(shape)
    got = qw.dequantize().numpy()
    assert got.dtype == np.float32 and np.array_equal(got.view(np.uint32), ref.view(np.uint32))


# --- the kernel cache ---


@pytest.fixture
def qlinear():
    module = qkernels.kernel()
    if module is None:
        pytest.skip("the quantized linear kernel cannot be built here (no compiler?)")
    return module


@pytest.fixture
def own_cache(tmp_path, monkeypatch, qlinear):
    """An empty kernel cache ($TORCH_EXTENSIONS_DIR in tmp_path), and torch's path replaced by
    a recorder that hands back the module built already (so no test here compiles)."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    calls = []

    def load_inline(name, source, functions, flags):
        calls.append(name)
        return qlinear

    monkeypatch.setattr(cpp_build, "_load_inline", load_inline)
    name, _ = cpp_build.module_name(qkernels.PREFIX, qkernels._SOURCE, qkernels.CFLAGS)
    return calls, cpp_build.cached_path(name)


def build_qlinear():
    return cpp_build.build(qkernels.PREFIX, qkernels._SOURCE, qkernels.FUNCTIONS, qkernels.CFLAGS)


_INT4_CASE = """
import torch
g = torch.Generator().manual_seed(3)
x = torch.randn(5, 256, generator=g)
q = torch.randint(0, 256, (6, 32, 32), dtype=torch.uint8, generator=g)  # 48 columns, 256 inputs
scale = (torch.rand(6, 8, 8, generator=g) / 10).half()
minimum = (-torch.rand(6, 8, 8, generator=g)).half()
"""

# A new process (one extension module per name and process): the kernel must come from the
# cache, torch's build path must not be taken, nor torch.utils.cpp_extension even imported.
_FRESH_PROCESS = _INT4_CASE + """
import sys
from tokenmill.model import cpp_build, qkernels
def through_torch(*args):
    raise AssertionError("went through torch's load_inline")
cpp_build._load_inline = through_torch
module = qkernels.kernel()
assert module is not None and "torch.utils.cpp_extension" not in sys.modules
torch.save(module.int4_linear(x, q, scale, minimum, 32, 48), sys.argv[1])
print(module.__file__)
"""


def test_a_new_process_imports_the_cached_kernel_directly_and_computes_the_same(own_cache, qlinear, tmp_path):
    import subprocess
    import sys

    calls, path = own_cache
    build_qlinear()
    assert calls and os.path.isfile(path) and os.path.isfile(path + ".sha256")  # built once, then stored
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    out = tmp_path / "y.pt"
    proc = subprocess.run([sys.executable, "-c", _FRESH_PROCESS, str(out)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert os.path.samefile(proc.stdout.strip().splitlines()[-1], path)
    case: dict = {}
    exec(_INT4_CASE, case)
    expected = qlinear.int4_linear(case["x"], case["q"], case["scale"], case["minimum"], 32, 48)
    assert torch.equal(torch.load(out), expected)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty", "no checksum"])
def test_a_corrupt_cache_entry_is_rebuilt_not_a_crash(own_cache, qlinear, caplog, damage):
    calls, path = own_cache
    build_qlinear()  # a good entry
    good = Path(path).read_bytes()
    if damage == "no checksum":
        os.remove(path + ".sha256")
    else:
        bad = {"garbage": b"\x7fELF not really" * 100, "truncated": good[: len(good) // 2], "empty": b""}[damage]
        tmp = Path(path + ".damaged")
        tmp.write_bytes(bad)
        tmp.replace(path)  # a new file: never write over a library this process may have mapped
    calls.clear()
    with caplog.at_level(logging.WARNING, logger="tokenmill"):
        module = build_qlinear()
    assert calls, "the damaged entry was not rebuilt through torch"
    assert module.isa() == qlinear.isa()
    assert any("unusable" in r.message for r in caplog.records)
    assert Path(path).read_bytes() == good  # replaced by the rebuilt module's file
    calls.clear()
    build_qlinear()
    assert calls == []  # and taken from the cache again


def test_a_cached_file_of_another_build_is_never_imported(own_cache, monkeypatch):
    calls, path = own_cache
    build_qlinear()
    monkeypatch.setattr(cpp_build, "isa_flags", lambda flags: ["-mno-such-flag"])  # another CPU: another key
    calls.clear()
    build_qlinear()
    assert len(calls) == 1 and not os.path.basename(path).startswith(calls[0] + ".")


# --- KV pool, sha256 stamp, phase logs ---


def test_lazy_zeros_are_zero_writable_and_not_resident_until_touched():
    def rss_kib() -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))

    before = rss_kib()
    kv = lazy_zeros((2, 4, 1024, 3, 16, 64), torch.bfloat16)  # 192 MiB
    assert kv.shape == (2, 4, 1024, 3, 16, 64) and kv.dtype == torch.bfloat16 and kv.is_contiguous()
    assert rss_kib() - before < 16 * 1024
    kv[1, 3, 1023] = 2.5
    assert kv[1, 3, 1023].float().sum().item() == 2.5 * 3 * 16 * 64
    assert kv[0, 0, :8].abs().sum().item() == 0 and kv[1, 3, 1022].abs().sum().item() == 0
    assert rss_kib() - before < 16 * 1024  # one block written, a few pages resident


def test_sha256_is_skipped_only_for_the_same_unchanged_file(tmp_path, monkeypatch):
    import hashlib

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    model = tmp_path / "m.gguf"
    model.write_bytes(b"weights" * 1000)
    good = hashlib.sha256(model.read_bytes()).hexdigest()
    loader._check_sha256(model, good)  # hashed, then stamped
    real_sha256 = hashlib.sha256

    def no_hashing(*args):
        raise AssertionError("hashed again")

    monkeypatch.setattr(loader.hashlib, "sha256", no_hashing)
    loader._check_sha256(model, good)  # the stamp matches: no hash
    monkeypatch.setattr(loader.hashlib, "sha256", real_sha256)
    model.write_bytes(b"WEIGHTS" * 1000)  # same size, new content (and mtime)
    os.utime(model, ns=(1, 1))
    with pytest.raises(loader.ModelLoadError, match="sha256"):
        loader._check_sha256(model, good)


def test_loading_logs_each_phase(tmp_path, caplog):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path)
    with caplog.at_level(logging.INFO, logger="tokenmill"):
        loader.load_model(str(path))
    lines = [r.message for r in caplog.records if r.message.startswith("startup: ")]
    assert any(re.fullmatch(r"startup: gguf read .* \d+\.\d\d s", line) for line in lines), lines


@pytest.mark.slow  # a real `tokenmill serve` of the default model
def test_serve_logs_every_start_up_phase_and_its_total():
    from tests.server.process import ServeProcess

    server = ServeProcess("--log-level", "info", startup_timeout=600)
    server.terminate()
    log = server.proc.stdout.read()
    for phase in ["interpreter and imports done", "HTTP server listening", "gguf read", "model built",
                  "kernel tokenmill_qlinear", "KV cache allocated", "model 'smollm2' ready"]:
        assert re.search(rf"startup: {re.escape(phase)}.* \d+\.\d\d s", log), (phase, log[-3000:])
    # The start runs with the cyclic GC off; it is on again once the model is in, with the
    # start's objects (imports, tokenizer, model) frozen out of its collections.
    frozen = re.search(r"startup: cyclic GC on again, (\d+) objects of the start frozen", log)
    assert frozen and int(frozen[1]) > 100_000, log[-3000:]
