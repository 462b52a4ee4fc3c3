"""GPU counters over the window, from `nvidia-smi --query-gpu ... --format=csv -l 1` output or
from DCGM exporter scrapes.

Why not `utilization.gpu` alone: it is the share of time *any* kernel ran, so one small kernel
at a time on one SM reads 100%. DCGM's profiling counters say how much of the chip worked: SM
active (share of SMs with a warp resident), tensor pipe active, DRAM active (bandwidth used).
"""

from __future__ import annotations

import csv
import io
import statistics
from dataclasses import dataclass, field

from tokenmill.doctor.recording import parse_exposition

# clocks_event_reasons / clocks_throttle_reasons bits that cost speed (not "idle" 0x1 nor
# "applications clocks" 0x2): SW power cap, HW slowdown, SW thermal, HW thermal, power brake.
COSTLY_THROTTLE = {0x4: "software power cap", 0x8: "hardware slowdown", 0x40: "software thermal slowdown",
                   0x80: "hardware thermal slowdown", 0x100: "power brake"}


@dataclass
class GpuWindow:
    samples: int = 0
    util: list[float] = field(default_factory=list)  # utilization.gpu, 0..1
    sm_active: list[float] = field(default_factory=list)  # DCGM, 0..1
    tensor_active: list[float] = field(default_factory=list)
    dram_active: list[float] = field(default_factory=list)
    power_w: list[float] = field(default_factory=list)
    sm_clock_mhz: list[float] = field(default_factory=list)
    max_sm_clock_mhz: float | None = None
    throttle: list[int] = field(default_factory=list)  # bitmask per sample

    @staticmethod
    def _mean(values: list[float]) -> float | None:
        return statistics.fmean(values) if values else None

    @property
    def mean_util(self) -> float | None:
        return self._mean(self.util)

    @property
    def mean_sm_active(self) -> float | None:
        return self._mean(self.sm_active)

    @property
    def mean_tensor_active(self) -> float | None:
        return self._mean(self.tensor_active)

    @property
    def mean_dram_active(self) -> float | None:
        return self._mean(self.dram_active)

    def throttled_share(self) -> tuple[float, list[str]]:
        """Share of samples with a costly throttle reason, and the reasons seen."""
        if not self.throttle:
            return 0.0, []
        hits = [m for m in self.throttle if any(m & bit for bit in COSTLY_THROTTLE)]
        reasons = sorted({name for m in hits for bit, name in COSTLY_THROTTLE.items() if m & bit})
        return len(hits) / len(self.throttle), reasons


def _number(text: str) -> float | None:
    text = text.strip().split(" ")[0]
    if not text or text.startswith("[") or text.lower() in ("n/a", "[n/a]"):
        return None
    try:
        return float(int(text, 16)) if text.startswith("0x") else float(text)
    except ValueError:
        return None


def read_nvidia_smi_csv(text: str) -> GpuWindow:
    """`--format=csv` (headers with units, e.g. `utilization.gpu [%]`), any subset of the fields
    used here, all GPUs' rows pooled."""
    rows = list(csv.reader(io.StringIO(text.strip()), skipinitialspace=True))
    if not rows:
        return GpuWindow()
    names = [h.split(" [")[0].strip() for h in rows[0]]
    w = GpuWindow()
    for row in rows[1:]:
        if row == rows[0] or len(row) != len(names):
            continue  # `-l` repeats the header after a restart; a torn last line
        values = dict(zip(names, row))
        w.samples += 1
        for key, target, scale in (("utilization.gpu", w.util, 0.01), ("power.draw", w.power_w, 1.0),
                                   ("clocks.sm", w.sm_clock_mhz, 1.0)):
            v = _number(values.get(key, ""))
            if v is not None:
                target.append(v * scale)
        top = _number(values.get("clocks.max.sm", ""))
        if top is not None:
            w.max_sm_clock_mhz = top
        mask = values.get("clocks_event_reasons.active", values.get("clocks_throttle_reasons.active"))
        if mask is not None and (m := _number(mask)) is not None:
            w.throttle.append(int(m))
    return w


DCGM = {"DCGM_FI_DEV_GPU_UTIL": ("util", 0.01), "DCGM_FI_PROF_SM_ACTIVE": ("sm_active", 1.0),
        "DCGM_FI_PROF_PIPE_TENSOR_ACTIVE": ("tensor_active", 1.0), "DCGM_FI_PROF_DRAM_ACTIVE": ("dram_active", 1.0),
        "DCGM_FI_DEV_POWER_USAGE": ("power_w", 1.0), "DCGM_FI_DEV_SM_CLOCK": ("sm_clock_mhz", 1.0)}


def read_dcgm_scrapes(texts: list[str]) -> GpuWindow:
    """DCGM exporter scrapes (Prometheus text), one per sample time; GPUs pooled."""
    w = GpuWindow()
    for text in texts:
        w.samples += 1
        for (name, _labels), value in parse_exposition(text).items():
            if name in DCGM:
                attr, scale = DCGM[name]
                getattr(w, attr).append(value * scale)
            elif name == "DCGM_FI_DEV_CLOCK_THROTTLE_REASONS":
                w.throttle.append(int(value))
    return w
