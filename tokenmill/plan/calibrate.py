"""`tokenmill plan calibrate`: fit a device's efficiencies on the real engine's own steps.

Either fits the steps a running server logged (`tokenmill serve --step-log FILE`, then
`calibrate --step-log FILE`: what serving costs, front and clients included), or runs the
engine itself (tokenmill.build, on whatever device it finds) over a grid of workloads:
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


def samples_from_step_log(paths: list[str]) -> list[Sample]:
    """The steps a running engine logged (`--step-log`): a server's steps, timed where the
    HTTP front and the clients share the machine, which an offline run of the engine misses."""
    from tokenmill.engine.step_log import read_step_log

    out = []
    for path in paths:
        try:
            lines = read_step_log(path)
            out += [Sample([SeqShape(start, n, bool(samples), bool(prompt)) for start, n, samples, prompt in line["seqs"]],
                           line["s"]) for line in lines if line["seqs"]]
        except OSError as e:
            raise ValueError(f"--step-log {path}: {e.strerror or e}") from None
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"--step-log {path}: not a tokenmill step log ({e!r})") from None
    return out


def fit(samples: list[Sample], shape: ModelShape, hw: Hardware, base: Profile, rounds: int = 4) -> Profile:
    """The profile whose step times best match the samples' in relative error, robust to
    outlier steps: on a shared machine a few steps take several times their share (another
    process had the core), and least squares would bend the whole model towards them. So the
    fit is iteratively reweighted: after each round, a step whose error relative to the
    prediction is beyond 1.345 robust standard deviations (from the median absolute deviation)
    is down-weighted by Huber's rule; `rounds=1` is the plain least-squares fit on error
    relative to the measured times."""
    model = CostModel(shape, hw, base)
    rows = [model.features(s.seqs) for s in samples]
    # prefill FLOPs, decode FLOPs, attention FLOPs (prefill + decode), bytes, sequences
    feats = np.array([(f[0], f[1], f[2] + f[3], f[4], f[5]) for f in rows], dtype=float)
    y = np.array([s.seconds for s in samples])
    robust = np.ones_like(y)
    scale = y
    for _ in range(rounds):
        ep, ed, ea, em, lam, a, b = _fit_round(feats, y, hw.peak_flops(base.weight_format), hw.bandwidth,
                                               robust / scale**2)
        profile = Profile(base.device, base.weight_format, float(ep), float(ed), float(em), float(ea), float(lam),
                          float(a), float(b), base.allreduce_latency_s, base.kv_bytes, source="calibrated")
        pred = np.array([CostModel(shape, hw, profile).step_seconds(s.seqs) for s in samples])
        # Errors relative to the prediction from the second round on. Relative to the measured
        # time, the best fit of steps that share a shape is below their mean (a slow step weighs
        # less than a fast one), and a request's latency is a sum of steps: step times here are
        # skewed (a neighbour takes the core, never gives one), and that fit under-predicted the
        # latencies of runs E, F and G of docs/benchmarks.md; relative to the prediction it is
        # their mean.
        scale = pred
        res = (y - pred) / pred
        # A robust standard deviation, floored at 1%: timing jitter is never smaller than that.
        spread = max(1.4826 * np.median(np.abs(res - np.median(res))), 0.01)
        robust = np.minimum(1.0, 1.345 * spread / np.maximum(np.abs(res), 1e-12))
    rel = np.abs(pred - y) / y
    return Profile(**{**profile.__dict__, "fit": {
        "samples": len(samples), "median_abs_rel_error": float(np.median(rel)), "p90_abs_rel_error": float(np.percentile(rel, 90)),
        "step_seconds_range": [float(y.min()), float(y.max())], "robust_rounds": rounds,
        "outlier_steps": int((np.abs(rel) > 3 * spread).sum()),  # off by more than 3 robust SDs
    }})


_LOG_EFF_RANGE = (-3.5, 0.0)  # efficiencies from 0.03% to 100% of the nominal peak


def _fit_round(feats: np.ndarray, y: np.ndarray, peak: float, bw: float, w2: np.ndarray) -> tuple:
    """One weighted fit of (prefill, decode, attention, memory) efficiencies, the share of
    compute and memory time that does not overlap, and the per-step and per-sequence
    overheads, on squared error times w2 (1 / a step's scale squared, times its robust weight:
    relative error). For any efficiencies the overheads are a linear
    least-squares problem (solved exactly, never negative); the efficiencies enter through
    max(compute, memory), so they are searched: a coarse log grid over all four (at no
    overlap and at none), then a coordinate search around the best point down to 0.5% steps
    (the grid's 60% steps alone left the fit's error dominated by where the points fell)."""
    fp, fd, fa, nbytes, nseq = feats.T
    # Normal equations of r ~ a + b * nseq, weighted: the matrix is the same for every point.
    S = np.array([[w2.sum(), (w2 * nseq).sum()], [(w2 * nseq).sum(), (w2 * nseq**2).sum()]])
    S_inv = np.linalg.inv(S)

    def overheads(r: np.ndarray) -> np.ndarray:
        """(a, b) >= 0 minimising sum w2 (r - a - b nseq)^2, r of shape [..., sample]."""
        ra, rb = (w2 * r).sum(-1), (w2 * nseq * r).sum(-1)
        ab = np.stack([ra, rb], -1) @ S_inv.T
        a_only = np.stack([np.maximum(ra / S[0, 0], 0), np.zeros_like(ra)], -1)
        b_only = np.stack([np.zeros_like(rb), np.maximum(rb / S[1, 1], 0)], -1)
        cands = np.stack([ab, a_only, b_only])  # [3, ..., 2]
        errs = (w2 * (r[None] - cands[..., :1] - cands[..., 1:2] * nseq) ** 2).sum(-1)
        errs[0] = np.where((ab >= 0).all(-1), errs[0], np.inf)  # the free solution only where it is >= 0
        return np.take_along_axis(cands, errs.argmin(0)[None, ..., None], 0)[0]

    def combine(compute: np.ndarray, memory: np.ndarray, lam: float) -> np.ndarray:
        return np.maximum(compute, memory) + lam * np.minimum(compute, memory)

    def error(x: np.ndarray) -> tuple[float, np.ndarray]:
        ep, ed, ea, em = 10.0 ** x[:4]
        base = combine(fp / (peak * ep) + fd / (peak * ed) + fa / (peak * ea), nbytes / (bw * em), x[4])
        ab = overheads(y - base)
        return float((w2 * (base + ab[0] + ab[1] * nseq - y) ** 2).sum()), ab

    grid = np.linspace(*_LOG_EFF_RANGE, 18)
    effs = 10.0 ** grid
    comp_p = fp[None, :] / (peak * effs[:, None])  # [eff, sample]
    comp_d = fd[None, :] / (peak * effs[:, None])
    best = (np.inf, None)
    for lam in (0.0, 1.0):
        for ia, ea in enumerate(effs):
            comp_a = fa / (peak * ea)
            compute = comp_p[:, None, :] + comp_d[None, :, :] + comp_a  # [ep, ed, sample]
            for im, em in enumerate(effs):
                base = combine(compute, nbytes / (bw * em), lam)
                ab = overheads(y - base)
                err = (w2 * (base + ab[..., :1] + ab[..., 1:2] * nseq - y) ** 2).sum(-1)
                i, j = np.unravel_index(np.argmin(err), err.shape)
                if err[i, j] < best[0]:
                    best = (err[i, j], np.array([grid[i], grid[j], grid[ia], grid[im], lam]))
    # Coordinate search: four log10 efficiencies, then the overlap share (in [0, 1]).
    x, step = best[1], grid[1] - grid[0]
    bounds = [_LOG_EFF_RANGE] * 4 + [(0.0, 1.0)]
    err, _ = error(x)
    while step > 0.002:  # log10 steps: 0.002 is 0.5%
        moved = False
        for k in range(5):
            for sign in (1.0, -1.0):
                trial = x.copy()
                trial[k] = np.clip(trial[k] + sign * step, *bounds[k])
                e, _ = error(trial)
                if e < err:
                    x, err, moved = trial, e, True
        if not moved:
            step /= 2
    _, (a, b) = error(x)
    ep, ed, ea, em = 10.0 ** x[:4]
    return ep, ed, ea, em, x[4], a, b


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
