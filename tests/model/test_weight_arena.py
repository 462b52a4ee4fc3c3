"""The quantized kernels' weights in one huge-page arena (tokenmill/model/weight_arena.py): the
same bytes as without it, in step order, advised for huge pages, and unmapped with the model."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
import torch

from tests.model import real
from tokenmill.model import weight_arena
from tokenmill.model.attention import choose_backend
from tokenmill.model.llama import LlamaForCausalLM
from tokenmill.model.quant import make_linear


def build(arena: bool, monkeypatch) -> LlamaForCausalLM:
    lm = real.loaded("auto")
    with monkeypatch.context() as m:
        if not arena:
            m.setattr(weight_arena, "gather", lambda model: None)
        factory = lambda weight, bias: make_linear(weight, bias, torch.float32, "auto", 32)  # noqa: E731
        # the engine's CPU attention, so the C++ decoder holds the buffers too
        return LlamaForCausalLM(lm.config, lm.weights, torch.float32, factory, max_positions=256,
                                attention=choose_backend(torch.device("cpu"), torch.float32))


def vma(addr: int) -> dict[str, str] | None:
    """The /proc/self/smaps fields of the mapping holding `addr`, or None."""
    fields, inside = None, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(maxsplit=1)[0]
            if "-" in head and not head.endswith(":"):
                if inside:
                    return fields
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside, fields = lo <= addr < hi, {}
            elif inside:
                fields[head.rstrip(":")] = line.split(":", 1)[1].strip()
    return fields if inside else None


def test_the_arena_holds_every_kernel_buffer_in_step_order_with_the_same_bytes(monkeypatch):
    plain, packed = build(False, monkeypatch), build(True, monkeypatch)
    ours, theirs = weight_arena._kernel_buffers(packed), weight_arena._kernel_buffers(plain)
    # every layer's four linears (Q4_1: nibbles, scales, minimums) and the Q8_0 LM head's two
    assert len(ours) == len(theirs) == 30 * 4 * 3 + 2
    addrs = [t.data_ptr() for _, _, t in ours]
    assert addrs == sorted(addrs) and all(a % weight_arena.ALIGN == 0 for a in addrs)
    span = addrs[-1] + ours[-1][2].numel() * ours[-1][2].element_size() - addrs[0]
    assert addrs[0] % weight_arena.HUGE_PAGE == 0 and span < sum(t.numel() * t.element_size() for _, _, t in ours) + 64 * len(ours)
    assert [(type(m), n) for m, n, _ in ours] == [(type(m), n) for m, n, _ in theirs]
    assert ours[-1][0] is packed.lm_head  # the head last, as a step reads it
    for (_, name, a), (_, _, b) in zip(ours, theirs):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), name
    # The module's own buffers are the views: its state_dict gives them.
    sd = packed.state_dict()
    assert sd["lm_head.qweight"].data_ptr() == ours[-2][2].data_ptr()
    assert sd["layers.0.self_attn.qkv_proj.packed"].data_ptr() == addrs[0]
    ids = real.loaded("none").tokenizer.encode(real.PROMPTS[0])
    assert torch.equal(real.sequence_logits(packed, ids), real.sequence_logits(plain, ids))


def test_the_arena_is_advised_for_huge_pages_and_unmapped_with_the_model(monkeypatch):
    m = build(True, monkeypatch)
    addr = m.lm_head.qweight.data_ptr()
    fields = vma(addr)
    assert fields is not None
    if "[never]" not in Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text():
        assert "hg" in fields["VmFlags"].split()  # MADV_HUGEPAGE took
    assert weight_arena.huge_page_bytes(m.lm_head.qweight) == int(fields["AnonHugePages"].split()[0]) * 1024
    del m, fields
    gc.collect()
    after = vma(addr)
    assert after is None or "hg" not in after.get("VmFlags", "").split()


def test_a_model_without_quantized_kernels_gets_no_arena():
    lin = torch.nn.Linear(4, 4)
    assert weight_arena.gather(torch.nn.Sequential(lin)) is None


@pytest.mark.parametrize("nbytes", [1, 4096, (2 << 20) + 5])
def test_an_arena_starts_on_a_huge_page_boundary_and_is_writable(nbytes):
    a = weight_arena.arena(nbytes)
    assert a.numel() == nbytes and a.data_ptr() % weight_arena.HUGE_PAGE == 0
    a.fill_(7)
    assert int(a.sum()) == 7 * nbytes
