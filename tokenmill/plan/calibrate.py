"""`tokenmill plan calibrate`: fit a device's efficiencies on the real engine's own steps.

Runs the engine (tokenmill.build, on whatever device it finds) over a grid of workloads:
batches of B requests with prompts of L tokens, so the steps cover prefill chunks of many
sizes and decode batches at many contexts. Each engine.step() is timed whole (scheduling,
the forward pass, sampling, output processing: what a simulated step stands for) together
with its composition. The fit: for each (prefill, decode, memory) efficiency on a log grid,
the per-step and per-sequence overheads by weighted least squares on relative error; the
grid point with the smallest error wins. The one module of tokenmill.plan that imports torch.
"""

from __future__ import annotations

import datetime
import os
import platform
import time
from dataclasses import dataclass

import numpy as np

from tokenmill.config import EngineConfig
from tokenmill.plan.catalog import Hardware, ModelShape
from tokenmill.plan.cost import CostModel, Profile, SeqShape, shape_of_chunks
from tokenmill.sampling import SamplingParams

DEFAULT_GRID = [(b, n) for b in (1, 4, 8) for n in (32, 192)]  # (batch, prompt length): minutes on a loaded 2-core CPU


@dataclass
class Sample:
    seqs: list[SeqShape]
    seconds: float


def measure(config: EngineConfig, grid=DEFAULT_GRID, output_len: int = 16, log=print) -> list[Sample]:
    from tokenmill.build import build_engine

    engine = build_engine(config)
    shapes: list[list[SeqShape]] = []
    schedule = engine.core.scheduler.schedule

    def logged():
        out = schedule()
        shapes.append(shape_of_chunks(out.chunks))  # before update() moves the requests on
        return out

    engine.core.scheduler.schedule = logged
    samples: list[Sample] = []
    rid = 0
    for warm, (batch, prompt_len) in [(True, grid[0])] + [(False, g) for g in grid]:
        for _ in range(batch):
            ids = [(rid * 7919 + j * 31 + 1) % (engine.vocab_size - 1) for j in range(prompt_len)]
            engine.add_request(f"cal-{rid}", ids, SamplingParams(max_tokens=output_len, ignore_eos=True))
            rid += 1
        while engine.has_unfinished:
            shapes.clear()
            t0 = time.perf_counter()
            engine.step()
            dt = time.perf_counter() - t0
            if shapes and shapes[0] and not warm:
                samples.append(Sample(shapes[0], dt))
        if not warm:
            log(f"batch {batch:3d} x prompt {prompt_len:4d}: {len(samples)} steps so far")
    return samples


def fit(samples: list[Sample], shape: ModelShape, hw: Hardware, base: Profile, rounds: int = 4) -> Profile:
    """The profile whose step times best match the samples' in relative error, robust to
    outlier steps: on a shared machine a few steps take several times their share (another
    process had the core), and least squares would bend the whole model towards them. So the
    fit is iteratively reweighted: after each round, a step whose relative error is beyond
    1.345 robust standard deviations (from the median absolute deviation) is down-weighted by
    Huber's rule; `rounds=1` is the plain least-squares fit."""
    model = CostModel(shape, hw, base)
    feats = np.array([model.features(s.seqs)[:4] for s in samples], dtype=float)
    y = np.array([s.seconds for s in samples])
    robust = np.ones_like(y)
    for _ in range(rounds):
        params = _fit_round(feats, y, hw.peak_flops(base.weight_format), hw.bandwidth, robust)
        ep, ed, em, a, b = params
        profile = Profile(base.device, base.weight_format, float(ep), float(ed), float(em), float(a), float(b),
                          base.allreduce_latency_s, base.kv_bytes, source="calibrated")
        rel = (np.array([CostModel(shape, hw, profile).step_seconds(s.seqs) for s in samples]) - y) / y
        # A robust standard deviation, floored at 1%: timing jitter is never smaller than that.
        spread = max(1.4826 * np.median(np.abs(rel - np.median(rel))), 0.01)
        robust = np.minimum(1.0, 1.345 * spread / np.maximum(np.abs(rel), 1e-12))
    rel = np.abs(rel)
    return Profile(**{**profile.__dict__, "fit": {
        "samples": len(samples), "median_abs_rel_error": float(np.median(rel)), "p90_abs_rel_error": float(np.percentile(rel, 90)),
        "step_seconds_range": [float(y.min()), float(y.max())], "robust_rounds": rounds,
        "outlier_steps": int((np.abs(rel) > 3 * spread).sum()),  # off by more than 3 robust SDs
    }})


def _fit_round(feats: np.ndarray, y: np.ndarray, peak: float, bw: float, robust: np.ndarray) -> tuple:
    """One weighted fit: for each (prefill, decode, memory) efficiency on a log grid, the
    per-step and per-sequence overheads by weighted least squares on relative error; the grid
    point with the smallest weighted error wins."""
    fp, fd, nbytes, nseq = feats.T
    effs = np.logspace(-3.5, 0, 36)
    w2 = robust / y**2  # relative error, times each step's robust weight
    # Normal equations of r ~ a + b * nseq, weighted: the matrix is the same for every grid point.
    S = np.array([[w2.sum(), (w2 * nseq).sum()], [(w2 * nseq).sum(), (w2 * nseq**2).sum()]])
    S_inv = np.linalg.inv(S)
    best = (np.inf, None)
    comp_p = fp[None, :] / (peak * effs[:, None])  # [eff, sample]
    comp_d = fd[None, :] / (peak * effs[:, None])
    for em in effs:
        mem = nbytes / (bw * em)
        compute = comp_p[:, None, :] + comp_d[None, :, :]  # [ep, ed, sample]
        base_t = np.maximum(compute, mem)
        r = y - base_t
        rhs = np.stack([(w2 * r).sum(-1), (w2 * nseq * r).sum(-1)], -1)  # [ep, ed, 2]
        ab = rhs @ S_inv.T
        ab = np.maximum(ab, 0.0)  # overheads are never negative (a clipped fit is still a valid one)
        pred = base_t + ab[..., :1] + ab[..., 1:2] * nseq
        err = (w2 * (pred - y) ** 2).sum(-1)
        i, j = np.unravel_index(np.argmin(err), err.shape)
        if err[i, j] < best[0]:
            best = (err[i, j], (effs[i], effs[j], em, ab[i, j, 0], ab[i, j, 1]))
    return best[1]


def machine_facts() -> dict:
    model = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": model, "cores": os.cpu_count(), "load_avg_1m": os.getloadavg()[0],
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
