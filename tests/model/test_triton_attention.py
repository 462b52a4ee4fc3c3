"""Triton paged-attention kernels (tokenmill/model/attention/triton_backend.py) vs the torch reference.

Without CUDA the kernels run under Triton's interpreter on CPU tensors (TRITON_INTERPRET=1 is
set here, before triton is imported); with CUDA they run on the GPU. Both in float32 and
bfloat16, against the torch path in float64. Pools are poisoned with NaN everywhere no token
was written (block 0, the padding entry of the tables, included) and outputs are NaN-filled,
so a kernel that reads past a context or leaves a row unwritten fails.

`python -m tests.model.test_triton_attention` runs every case without pytest (the GPU check
falls back to it where pytest is missing).
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"

try:
    import pytest
except ImportError:
    pytest = None
if pytest is not None:
    pytest.importorskip("triton")
    # The interpreter's numpy warns on log2(0) of an empty split (-inf there, as on the GPU).
    pytestmark = pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")

from tokenmill.model.attention import (  # noqa: E402
    AttentionMetadata,
    PrefillChunk,
    choose_backend,
    torch_paged_attention,
    torch_write_kv,
)
from tokenmill.model.attention import triton_backend as ta  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
BLOCK = 16
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
DTYPES = [torch.float32, torch.bfloat16]


class Skipped(Exception):
    pass


def skip(reason: str):
    if pytest is not None:
        pytest.skip(reason)
    raise Skipped(reason)


def cases(*values):
    """Parametrize over `case`: through pytest when it is there; the plain runner reads fn.cases."""

    def wrap(fn):
        fn.cases = values
        return pytest.mark.parametrize("case", values, ids=str)(fn) if pytest is not None else fn

    return wrap


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double().cpu() - ref).norm() / ref.norm()).item()


def check(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype):
    assert not out.isnan().any(), "NaN in the output: a row unwritten or a poisoned slot read"
    err = rel_err(out, ref)
    assert err < TOL[dtype], f"relative error {err:.2e} over {TOL[dtype]:.0e}"


class Batch:
    """A flattened batch over a NaN-poisoned pool. seqs: (num_tokens, context_len), decodes
    (num_tokens 1) first; each sequence's blocks are scattered at random over the pool."""

    def __init__(self, seqs, kv_heads, group, head_dim, dtype, seed=0):
        g = torch.Generator().manual_seed(seed)
        rng = random.Random(seed)
        self.seqs, self.dtype, self.scale = seqs, dtype, head_dim**-0.5
        need = [-(-ctx // BLOCK) for _, ctx in seqs]
        num_blocks = sum(need) + 3
        ids = list(range(1, num_blocks))  # block 0 is never given out: it is the tables' padding
        rng.shuffle(ids)
        shape = (num_blocks, kv_heads, BLOCK, head_dim)
        self.k_cache = torch.full(shape, float("nan"), dtype=torch.float64)
        self.v_cache = torch.full(shape, float("nan"), dtype=torch.float64)
        self.tables = []
        for (_, ctx), n in zip(seqs, need):
            table, ids = torch.tensor(ids[:n]), ids[n:]
            self.tables.append(table)
            for cache in (self.k_cache, self.v_cache):
                cache[table] = torch.randn(n, kv_heads, BLOCK, head_dim, generator=g, dtype=torch.float64)
                cache[table[-1], :, ctx - (n - 1) * BLOCK :] = float("nan")  # past the context
        tokens = sum(n for n, _ in seqs)
        self.q = 2 * torch.randn(tokens, kv_heads * group, head_dim, generator=g, dtype=torch.float64)
        # Round the inputs to the tested dtype first, so the reference sees the same values.
        self.k_cache, self.v_cache, self.q = (t.to(dtype).double() for t in (self.k_cache, self.v_cache, self.q))

    def meta(self, tables=None) -> AttentionMetadata:
        tables = tables or self.tables
        decodes = [i for i, (n, _) in enumerate(self.seqs) if n == 1]
        dec_tables = dec_lens = None
        if decodes:
            width = max(len(tables[i]) for i in decodes)
            dec_tables = torch.zeros(len(decodes), width, dtype=torch.long)
            for row, i in enumerate(decodes):
                dec_tables[row, : len(tables[i])] = tables[i]
            dec_lens = torch.tensor([self.seqs[i][1] for i in decodes])
        prefills, start = [], len(decodes)
        for i, (n, ctx) in enumerate(self.seqs):
            if n > 1:
                prefills.append(PrefillChunk(start, n, ctx, tables[i]))
                start += n
        return AttentionMetadata(torch.zeros(start, dtype=torch.long), len(decodes), dec_tables, dec_lens, prefills)

    def inputs(self):
        """q, k_cache, v_cache in the tested dtype on the tested device (poison kept)."""
        return (t.to(self.dtype).to(DEVICE) for t in (self.q, self.k_cache, self.v_cache))

    def reference(self) -> torch.Tensor:
        # Poisoned slots are masked out of the softmax, but 0 * NaN would still reach the torch
        # path's P @ V: it reads zeros there instead.
        k, v = self.k_cache.nan_to_num(), self.v_cache.nan_to_num()
        return torch_paged_attention(self.q, k, v, self.meta(), self.scale)

    def run(self, **kw) -> torch.Tensor:
        q, k, v = self.inputs()
        out = torch.full_like(q, float("nan"))
        return ta.paged_attention(q, k, v, self.meta(), self.scale, out=out, **kw)


# Decodes at block boundaries and odd lengths; prefills whole (n == ctx) and chunked (ctx > n).
MIXED = [(1, c) for c in (1, 15, 16, 17, 32, 33)] + [(15, 15), (16, 16), (17, 17), (3, 35), (16, 48), (2, 33)]
if DEVICE == "cuda":  # long contexts, where the decode splits over the KV length
    MIXED = MIXED[:6] + [(1, 777), (1, 4099)] + MIXED[6:] + [(300, 1200)]


@cases(*[(dtype, group, dim) for dtype in DTYPES for group in (1, 4, 8) for dim in (64, 128)])
def test_mixed_batch_matches_reference(case):
    dtype, group, dim = case
    b = Batch(MIXED, kv_heads=2, group=group, head_dim=dim, dtype=dtype, seed=group * dim)
    check(b.run(), b.reference(), dtype)


@cases(*[(dtype, group) for dtype in DTYPES for group in (1, 4)])
def test_strided_queries_as_the_model_passes_them(case):
    # The model rotates q and k as one [T, heads + kv_heads, D] tensor and passes q as a slice
    # of it: rows are strided, which the kernels must follow.
    dtype, group = case
    b = Batch(MIXED, kv_heads=2, group=group, head_dim=64, dtype=dtype, seed=7)
    q, k, v = b.inputs()
    wide = torch.cat([q, torch.full_like(q[:, :2], float("nan"))], dim=1)  # + the k heads, poisoned
    out = ta.paged_attention(wide[:, : q.shape[1]], k, v, b.meta(), b.scale)
    check(out, b.reference(), dtype)


@cases(*[(dtype, group, split) for dtype in DTYPES for group in (1, 4, 8) for split in (16, 32)])
def test_decode_split_over_kv_length(case):
    """Splits of 16/32 keys: several per sequence, some empty, merged by log-sum-exp; a
    trailing padding row (context 0, as a padded graph batch has) gives zeros."""
    dtype, group, split = case
    seqs = [(1, c) for c in (1, 15, 16, 17, 33, 70)]
    b = Batch(seqs, kv_heads=2, group=group, head_dim=64, dtype=dtype, seed=split + group)
    meta = b.meta()
    q, k, v = b.inputs()
    pad = torch.zeros(1, meta.decode_block_tables.shape[1], dtype=torch.long)
    tables = torch.cat([meta.decode_block_tables, pad]).to(DEVICE)
    lens = torch.tensor([c for _, c in seqs] + [0], device=DEVICE)
    q = torch.cat([q, torch.randn_like(q[:1])])
    out = torch.full_like(q, float("nan"))
    ta.decode_attention(q, k, v, tables, lens, b.scale, out=out, split_tokens=split, block_n=16)
    check(out[:-1], b.reference(), dtype)
    assert (out[-1] == 0).all()


@cases(*[(dtype, kv_heads, dim) for dtype in DTYPES for kv_heads in (1, 3) for dim in (64, 128)])
def test_write_kv_matches_reference(case):
    dtype, kv_heads, dim = case
    tokens, num_blocks = 37, 5
    g = torch.Generator().manual_seed(kv_heads * dim)
    kv = torch.randn(tokens, 2, kv_heads, dim, generator=g).to(dtype)  # k, v: strided views
    slots = torch.randperm(num_blocks * BLOCK, generator=g)[:tokens]
    slots[5] = -1  # a padding token: written nowhere
    pool = torch.full((num_blocks, kv_heads, BLOCK, dim), float("nan"), dtype=dtype)
    want_k, want_v = pool.clone(), pool.clone()
    keep = slots >= 0
    torch_write_kv(want_k, want_v, kv[keep, 0], kv[keep, 1], slots[keep])
    k_cache, v_cache, kv_dev = pool.to(DEVICE), pool.clone().to(DEVICE), kv.to(DEVICE)
    ta.write_kv(k_cache, v_cache, kv_dev[:, 0], kv_dev[:, 1], slots.to(DEVICE))
    assert torch.equal(k_cache.cpu().nan_to_num(7.0), want_k.nan_to_num(7.0))
    assert torch.equal(v_cache.cpu().nan_to_num(7.0), want_v.nan_to_num(7.0))


@cases(torch.bfloat16, torch.float16)
def test_float32_model_over_a_16_bit_pool(case):
    # --kv-cache-dtype bfloat16/float16 under a float32 model: the write rounds as torch rounds
    # (same pool bits as the reference write), and decode reads the pool as the reference does.
    pool_dtype, kv_heads, dim, tokens = case, 3, 64, 40
    g = torch.Generator().manual_seed(11)
    k, v = torch.randn(tokens, kv_heads, dim, generator=g), torch.randn(tokens, kv_heads, dim, generator=g)
    q = torch.randn(2, 9, dim, generator=g)
    slots = torch.arange(tokens)
    want_k, want_v = torch.zeros(4, kv_heads, BLOCK, dim, dtype=pool_dtype), torch.zeros(4, kv_heads, BLOCK, dim, dtype=pool_dtype)
    torch_write_kv(want_k, want_v, k, v, slots)
    k_cache, v_cache = torch.zeros_like(want_k).to(DEVICE), torch.zeros_like(want_v).to(DEVICE)
    ta.write_kv(k_cache, v_cache, k.to(DEVICE), v.to(DEVICE), slots.to(DEVICE))
    assert torch.equal(k_cache.cpu(), want_k) and torch.equal(v_cache.cpu(), want_v)
    meta = AttentionMetadata(slot_mapping=slots[:2], num_decodes=2, decode_block_tables=torch.tensor([[0, 1, 2], [0, 1, 2]]),
                             decode_context_lens=torch.tensor([40, 17]), prefills=[])
    ref = torch_paged_attention(q, want_k, want_v, meta, dim**-0.5)
    out = ta.paged_attention(q.to(DEVICE), k_cache, v_cache, meta, dim**-0.5)
    assert out.dtype == torch.float32
    # On a GPU the dots run in the pool's dtype (queries rounded to it): bf16-level tolerance there.
    assert rel_err(out.cpu(), ref) < (1e-5 if DEVICE == "cpu" else TOL[torch.bfloat16])


def test_wrong_block_table_fails_the_check():
    """The comparison can fail: two swapped blocks in one chunk's table are caught."""
    b = Batch([(1, 33), (20, 40)], kv_heads=2, group=4, head_dim=64, dtype=torch.float32)
    check(b.run(), b.reference(), torch.float32)
    swapped = [t.clone() for t in b.tables]
    swapped[1][[0, 1]] = swapped[1][[1, 0]]
    q, k, v = b.inputs()
    out = ta.paged_attention(q, k, v, b.meta(swapped), b.scale)
    try:
        check(out, b.reference(), torch.float32)
    except AssertionError as e:
        assert "relative error" in str(e)
    else:
        raise AssertionError("a wrong block table went unnoticed")


def test_split_heuristic():
    # One long sequence on a 132-SM GPU is split; a large batch fills the GPU without splits.
    assert ta._split_tokens(1, 8, 4096, 132, 64) == 256
    assert ta._split_tokens(256, 8, 4096, 132, 64) == 4096
    assert ta._split_tokens(1, 8, 100, 132, 64) == 256  # never below 256 keys


def test_backend_on_cuda():
    """CUDA gets the Triton backend, which runs a step from CPU metadata prepared once."""
    if DEVICE != "cuda":
        skip("needs CUDA")
    backend = choose_backend(torch.device("cuda"), torch.bfloat16)
    assert isinstance(backend, ta.TritonAttention) and backend.graph_capturable
    b = Batch(MIXED, kv_heads=2, group=4, head_dim=128, dtype=torch.bfloat16)
    q, k, v = b.inputs()
    step = backend.prepare(b.meta(), k)
    assert step.slots.is_cuda and step.decode_lens.is_cuda
    check(backend.forward(q, k, v, step, b.scale), b.reference(), torch.bfloat16)


def test_kernels_compile_for_hopper():
    """The kernels, as a mixed batch, a split decode and a KV write launch them in float32 and
    bf16, compile for sm_90 (ptxas included): the interpreter is more lenient than the
    compiler, and GPU time is too scarce to find that out there."""
    if DEVICE == "cuda":
        skip("the GPU tests compile the kernels for real")
    cmd = [sys.executable, "-m", "tests.model.test_triton_attention", "--compile-sm90"]
    # A fresh cache dir: compile for real every time, whatever an earlier run left behind.
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": cache}
        run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "compiled 10 kernels" in run.stdout, run.stdout[-3000:]


def test_bench_smoke():
    if DEVICE == "cuda":
        skip("the GPU check runs the benchmark itself")
    cmd = [sys.executable, "benchmarks/gpu/attention_bench.py", "--smoke"]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "decode" in run.stdout and "copy" in run.stdout


def compile_sm90():
    """Record the launches of a mixed batch, a split decode and a KV write in float32 and bf16,
    then compile each for sm_90 with the GPU's choice of dot dtype."""
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    types = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.int32: "i32", torch.int64: "i64"}

    def signature(v):
        if isinstance(v, torch.Tensor):
            return "*" + types[v.dtype]
        return {bool: "i1", int: "i32", float: "fp32"}[type(v)]

    launches = []

    class Recorder:
        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            return lambda *args, **kw: launches.append((self.fn, args, kw))

    for name in ("_write_kv_kernel", "_decode_kernel", "_decode_merge_kernel", "_prefill_kernel"):
        setattr(ta, name, Recorder(getattr(ta, name)))
    for dtype in DTYPES:
        b = Batch([(1, 17), (1, 40), (5, 5), (3, 20)], kv_heads=2, group=4, head_dim=128, dtype=dtype)
        q, k, v = b.inputs()
        ta.paged_attention(q, k, v, b.meta(), b.scale)
        tables, lens = torch.ones(2, 8, dtype=torch.long), torch.tensor([17, 40])
        ta.decode_attention(q[:2], k, v, tables, lens, 0.1, split_tokens=64)  # 2 splits: the merge too
        ta.write_kv(k, v, q[:, :2], q[:, :2], torch.arange(q.shape[0]))
    for fn, args, kw in launches:
        options = {key: kw.pop(key) for key in ("num_warps", "num_stages") if key in kw}
        if "DOT_T" in kw and args[1].dtype == torch.bfloat16:
            kw["DOT_T"] = tl.bfloat16  # what a CUDA tensor gets (CPU tensors dot in float32)
        sig = {name: signature(a) for name, a in zip(fn.arg_names, args)} | {name: "constexpr" for name in kw}
        triton.compile(ASTSource(fn, sig, constexprs=kw), target=GPUTarget("cuda", 90, 32), options=options)
    print(f"compiled {len(launches)} kernels")


def run_all() -> int:
    """Every test and case without pytest; the closing line is pytest's count format."""
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    for name, fn in list(globals().items()):
        if not (name.startswith("test_") and callable(fn)):
            continue
        for case in getattr(fn, "cases", [None]):
            label = name if case is None else f"{name}[{case}]"
            try:
                fn() if case is None else fn(case)
                result = "passed"
            except Skipped:
                result = "skipped"
            except Exception as e:  # noqa: BLE001 - report and go on, like pytest
                result = "failed"
                print(f"FAILED {label}: {type(e).__name__}: {e}", flush=True)
            counts[result] += 1
    print(", ".join(f"{n} {k}" for k, n in counts.items()))
    return 1 if counts["failed"] else 0


if __name__ == "__main__":
    if "--compile-sm90" in sys.argv:
        compile_sm90()
    else:
        sys.exit(run_all())
