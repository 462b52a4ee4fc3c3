"""Cost model: the seconds one engine step takes, from what the step computes.

A roofline per step: matmul FLOPs against peak x efficiency, bytes (weights once per step,
the context's KV read, the new KV written) against bandwidth x efficiency; the slower of the
two (plus, where they do not overlap, a share of the faster: see Profile.no_overlap), plus a
fixed per-step overhead (scheduling, sampling, launch, output processing), a
per-sequence overhead (building its rows, detokenizing), a cost per row left over from the
matmul kernel's row blocks, and with tensor parallelism two all-reduces of the step's
activations per layer over the link. (The simulator adds a cost per request arriving during
a step: Profile.arrival_s.)

Prefill rows and decode rows have separate compute efficiencies: on a CPU a few decode rows
use the int4 kernel far less well than a long prompt's rows do; on a GPU a small batch of
decode rows uses the tensor cores far less well than a long prompt. Attention (QK^T and PV
over the context) can have its own: on a CPU it is a different kernel from the linears, and
on the 2-core EPYC it reached a fifth of their FLOP rate, so a 32-token prompt after a
192-token cached prefix cost 25-35% more than the linears' rate predicted. The efficiencies
and overheads come from a Profile: fitted (calibrate.py) or stated defaults.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tokenmill.engine.scheduler import ScheduledChunk
from tokenmill.plan.catalog import WEIGHT_BYTES, Hardware, ModelShape
from tokenmill.step import StepRecord

PROFILES_DIR = Path(__file__).with_name("profiles")


@dataclass(frozen=True)
class SeqShape:
    """One sequence of a step: num_tokens computed from position start."""

    start: int
    num_tokens: int
    samples: bool  # its logits give a token: the LM head runs on its last row
    prompt: bool  # the chunk starts inside the prompt (a prefill row; otherwise decode/verify)


def shape_of_chunks(chunks: list[ScheduledChunk]) -> list[SeqShape]:
    return [SeqShape(c.start, c.num_scheduled, c.samples, c.prompt) for c in chunks]


def shape_of_record(record: StepRecord) -> list[SeqShape]:
    return [SeqShape(s.start, len(s.token_ids), s.sample is not None, s.prompt) for s in record.seqs]


@dataclass(frozen=True)
class Profile:
    """Efficiencies and overheads of one device running one weight format."""

    device: str
    weight_format: str
    eff_prefill: float = 0.6  # share of peak FLOP/s reached by prompt rows (and the LM head)
    eff_decode: float = 0.3  # by decode rows' matmuls
    eff_memory: float = 0.75  # share of peak bandwidth reached reading weights and KV
    # Attention's share of peak FLOP/s; None: priced as the rows' matmuls (prefill or decode).
    eff_attention: float | None = None
    # The share of the shorter of compute and memory time that does not hide under the longer:
    # 0 is the roofline (a GPU streams weights while it computes); on the 2-core CPU a 24-row
    # prompt chunk cost 25-30% more than the roofline's max, as if reading the weights and
    # computing on them added up (the fit found 0.4-1 there).
    no_overlap: float = 0.0
    step_overhead_s: float = 0.003
    per_seq_s: float = 1e-5
    allreduce_latency_s: float = 1e-5
    kv_bytes: float = 2  # bytes per KV element (the engine keeps KV in the model's dtype)
    # Added to the step in progress for each request that arrives during it: the server's front
    # (HTTP, tokenizing, the stream) works on the new request on the same cores and the same
    # GIL as the step. On the 2-core CPU a decode step with an arrival ran 2-4 ms (5-13%) over
    # its price. Fitted from a server's step log; 0 for an offline calibration (no front).
    arrival_s: float = 0.0
    # Rows the device's matmul kernel computes together, and the cost of each row of a step
    # beyond its last whole block. tokenmill's CPU kernel (model/qkernels.py) runs 4 rows at a
    # time and a leftover row alone: on the 2-core EPYC a step's leftover rows cost ~2 ms each,
    # so a decode step of 8 rows took 51 ms and one of 3 rows 38 ms, which no price linear in
    # the rows matched (8 rows 6% over, 3 rows 10% under).
    row_block: int = 1
    per_leftover_row_s: float = 0.0
    # The front's latency outside the steps: from a client's send until the scheduler can see the
    # request (HTTP, validation, tokenizing, the hand-over to the engine thread), and from a
    # token's step end until the client has it (streaming). Fitted from client results lined up
    # with the step log (`calibrate --bench-result`); 0 where none were given.
    ingress_s: float = 0.0
    egress_s: float = 0.0
    source: str = "stated defaults, not measured"
    fit: dict = field(default_factory=dict)  # how calibrate fitted it: samples, errors, machine, date

    @classmethod
    def load(cls, path: str | Path) -> "Profile":
        return cls(**json.loads(Path(path).read_text()))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2) + "\n")


def default_profile(device: str, weight_format: str) -> Profile:
    """A shipped, measured profile when there is one for this device and format; else defaults."""
    path = PROFILES_DIR / f"{device}-{weight_format}.json"
    if path.exists():
        return Profile.load(path)
    return Profile(device, weight_format)


# Not frozen: built once per simulated step (millions a fleet-hour), and a frozen dataclass's
# __init__ (object.__setattr__ per field) was a third of decode_step_seconds.
@dataclass(slots=True)
class StepCost:
    compute_s: float
    memory_s: float
    comm_s: float
    overhead_s: float
    no_overlap: float = 0.0  # Profile.no_overlap

    @property
    def seconds(self) -> float:
        longer, shorter = max(self.compute_s, self.memory_s), min(self.compute_s, self.memory_s)
        return self.overhead_s + longer + self.no_overlap * shorter + self.comm_s

    @property
    def bound(self) -> str:
        return "compute" if self.compute_s >= self.memory_s else "memory"


class CostModel:
    """Called once per simulated step (millions of times for a fleet-hour): the constants are
    folded once here, and step_seconds is a single pass over the step's sequences."""

    def __init__(self, shape: ModelShape, hw: Hardware, profile: Profile, tp: int = 1):
        self.shape, self.hw, self.profile, self.tp = shape, hw, profile, tp
        peak = hw.peak_flops(profile.weight_format) * tp
        self._sec_per_flop_prefill = 1.0 / (peak * profile.eff_prefill)
        self._sec_per_flop_decode = 1.0 / (peak * profile.eff_decode)
        ea = profile.eff_attention
        self._sec_per_flop_attn_p = self._sec_per_flop_prefill if ea is None else 1.0 / (peak * ea)
        self._sec_per_flop_attn_d = self._sec_per_flop_decode if ea is None else 1.0 / (peak * ea)
        self._sec_per_byte = 1.0 / (hw.bandwidth * tp * profile.eff_memory)
        wb = WEIGHT_BYTES[profile.weight_format]
        self._body_flops = 2.0 * shape.body_params_active
        self._head_flops = 2.0 * shape.head_params
        self._attn_flops = 4.0 * shape.num_layers * shape.num_heads * shape.head_dim  # QK^T and PV per (query, key)
        self._kv_token_bytes = shape.kv_bytes_per_token(profile.kv_bytes)
        self._dense_bytes = (shape.params_total - shape.num_layers * shape.num_experts * shape.expert_params) * wb
        self._expert_bytes = shape.num_layers * shape.expert_params * wb
        self._moe = shape.num_experts > 1
        self._link = hw.link_gbs * 1e9
        self._act_bytes = shape.hidden_size * 2  # bf16 activations per token
        # Not step prices: the simulator adds them to the step a request arrives in, to a
        # request's way in, and to every token's way out.
        self.arrival_s, self.ingress_s, self.egress_s = profile.arrival_s, profile.ingress_s, profile.egress_s

    def weight_bytes_read(self, num_tokens: int) -> float:
        """Weights streamed once per step; an MoE layer reads only the experts its tokens chose
        (expected distinct experts when each token picks k of E uniformly)."""
        if not self._moe:
            return self._dense_bytes + self._expert_bytes
        e, k = self.shape.num_experts, self.shape.experts_per_token
        touched = e * (1.0 - (1.0 - k / e) ** num_tokens)
        return self._dense_bytes + self._expert_bytes * touched

    def features(self, seqs: list[SeqShape]) -> tuple[float, float, float, float, float, int, int]:
        """(prefill FLOPs, decode FLOPs, prefill attention FLOPs, decode attention FLOPs, bytes
        moved, sequences, tokens): what the time depends on, before any efficiency is applied
        (calibrate fits the efficiencies on these). The first two are the linears' (the LM head
        counts as prefill: it runs dense either way).

        The sums are of integers (rows, attention pairs), scaled once at the end: a float sum
        would depend on the order of the sequences, and decode_step_seconds must give the same
        seconds, to the bit, as this pass over the same decode batch."""
        body_p = attn_p = body_d = attn_d = head_rows = kv_read = tokens = 0
        for s in seqs:
            n = s.num_tokens
            attn = n * s.start + n * (n + 1) // 2
            if s.prompt:
                body_p += n
                attn_p += attn
                head_rows += 1 if s.samples else 0  # a prefill chunk needs logits on its last row
            else:
                body_d += n
                attn_d += attn
                head_rows += n if s.samples else 0  # verify rows (decode with drafts): on every row
            kv_read += s.start
            tokens += n
        return self._features(body_p, attn_p, body_d, attn_d, head_rows, kv_read, tokens, len(seqs))

    def _features(self, body_p: int, attn_p: int, body_d: int, attn_d: int, head_rows: int, kv_read: int,
                  tokens: int, num_seqs: int) -> tuple[float, float, float, float, float, int, int]:
        flops_prefill = self._body_flops * body_p + self._head_flops * head_rows
        flops_decode = self._body_flops * body_d
        nbytes = self.weight_bytes_read(tokens) + (kv_read + tokens) * self._kv_token_bytes
        return (flops_prefill, flops_decode, self._attn_flops * attn_p, self._attn_flops * attn_d, nbytes,
                num_seqs, tokens)

    def _cost(self, flops_prefill: float, flops_decode: float, attn_prefill: float, attn_decode: float,
              nbytes: float, num_seqs: int, tokens: int) -> StepCost:
        compute = (flops_prefill * self._sec_per_flop_prefill + flops_decode * self._sec_per_flop_decode
                   + attn_prefill * self._sec_per_flop_attn_p + attn_decode * self._sec_per_flop_attn_d)
        memory = nbytes * self._sec_per_byte
        comm = 0.0
        if self.tp > 1:
            ring = 2.0 * (self.tp - 1) / self.tp * tokens * self._act_bytes / self._link
            comm = 2 * self.shape.num_layers * (self.profile.allreduce_latency_s + ring)
        overhead = self.profile.step_overhead_s + self.profile.per_seq_s * num_seqs
        if self.profile.per_leftover_row_s:
            overhead += self.profile.per_leftover_row_s * (tokens % self.profile.row_block)
        return StepCost(compute, memory, comm, overhead, self.profile.no_overlap)

    def cost(self, seqs: list[SeqShape]) -> StepCost:
        return self._cost(*self.features(seqs))

    def step_seconds(self, seqs: list[SeqShape]) -> float:
        return self.cost(seqs).seconds

    def decode_step_seconds(self, num_seqs: int, sum_start: int) -> float:
        """step_seconds of num_seqs decode rows (one token each, all sampling) whose starts sum
        to sum_start, without building the rows: the simulator's fast-forward prices a run of
        steady decode steps with it. Equal to the bit to step_seconds on the same rows."""
        return self._cost(*self._features(0, 0, num_seqs, sum_start + num_seqs, num_seqs, sum_start, num_seqs,
                                          num_seqs)).seconds


class ConstantCost:
    """Every step costs the same: makes the simulator's step i start at i x seconds, so a test
    can line its steps up one for one with a real engine's."""

    arrival_s = ingress_s = egress_s = 0.0

    def __init__(self, seconds: float):
        self.seconds = seconds

    def step_seconds(self, seqs: list[SeqShape]) -> float:
        return self.seconds

    def decode_step_seconds(self, num_seqs: int, sum_start: int) -> float:
        return self.seconds
