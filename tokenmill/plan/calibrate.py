"""`tokenmill plan calibrate`: fit a device's efficiencies on the real engine's own steps.

Either fits the steps a running server logged (`tokenmill serve --step-log FILE`, then
`calibrate --step-log FILE`: what serving costs, front and clients included), or runs the
engine itself (tokenmill.build, on whatever device it finds) over a grid of workloads:
batches of B requests with prompts of L tokens, so the steps cover prefill chunks of many
sizes and decode batches at many contexts. Each engine.step() is timed whole (scheduling,
the forward pass, sampling, output processing: what a simulated step stands for) together
with its composition. The fit: for each (prefill, decode, memory) efficiency on a log grid,
the per-step, per-sequence, per-arrival (a server's log only) and per-leftover-row overheads
by weighted least squares on relative error; the grid point with the smallest error wins.
The one module of tokenmill.plan that imports torch.
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
    arrivals: int = 0  # requests whose front work ran during this step (a server's log only)


# A step log's "new" requests were taken in between two steps; their front work ran during the
# step before, if the engine went straight on (a busy engine starts its next step within ~0.2
# ms). After a longer gap the engine was idle when they came, and no step paid for them.
ARRIVAL_GAP_S = 0.005

# The rows tokenmill's CPU matmul kernel computes together (model/qkernels.py: a 4-row x
# 3-column microkernel; the rows left over run one at a time). Stated, not imported: that
# module builds C++.
CPU_ROW_BLOCK = 4


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
            for line, after in zip(lines, lines[1:] + [None]):
                if not line["seqs"]:
                    continue
                went_on = after is not None and after["t"] - (line["t"] + line["s"]) < ARRIVAL_GAP_S
                out.append(Sample([SeqShape(start, n, bool(samples), bool(prompt))
                                   for start, n, samples, prompt in line["seqs"]],
                                  line["s"], after.get("new", 0) if went_on else 0))
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
    # prefill FLOPs, decode FLOPs, attention FLOPs (prefill + decode), bytes, sequences, arrivals,
    # rows left over from the kernel's blocks
    feats = np.array([(f[0], f[1], f[2] + f[3], f[4], f[5], s.arrivals, f[6] % base.row_block)
                      for f, s in zip(rows, samples)], dtype=float)
    y = np.array([s.seconds for s in samples])
    arrivals = feats[:, 5]
    robust = np.ones_like(y)
    scale = y
    for _ in range(rounds):
        ep, ed, ea, em, lam, (a, b, c, d) = _fit_round(feats, y, hw.peak_flops(base.weight_format), hw.bandwidth,
                                                       robust / scale**2)
        profile = Profile(base.device, base.weight_format, float(ep), float(ed), float(em), float(ea), float(lam),
                          float(a), float(b), base.allreduce_latency_s, base.kv_bytes, float(c), base.row_block,
                          float(d), source="calibrated")
        fitted = CostModel(shape, hw, profile)
        pred = np.array([fitted.step_seconds(s.seqs) for s in samples]) + profile.arrival_s * arrivals
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
        "steps_with_arrivals": int((arrivals > 0).sum()),
        "outlier_steps": int((np.abs(rel) > 3 * spread).sum()),  # off by more than 3 robust SDs
    }})


_LOG_EFF_RANGE = (-3.5, 0.0)  # efficiencies from 0.03% to 100% of the nominal peak


def _fit_round(feats: np.ndarray, y: np.ndarray, peak: float, bw: float, w2: np.ndarray) -> tuple:
    """One weighted fit of (prefill, decode, attention, memory) efficiencies, the share of
    compute and memory time that does not overlap, and the per-step, per-sequence,
    per-arrival and per-leftover-row overheads, on squared error times w2 (1 / a step's scale
    squared, times its robust weight: relative error). For any efficiencies the overheads are a
    linear least-squares problem (solved exactly, never negative); the efficiencies enter through
    max(compute, memory), so they are searched: a coarse log grid over all four (at no
    overlap and at none), then a coordinate search around the best point down to 0.5% steps
    (the grid's 60% steps alone left the fit's error dominated by where the points fell)."""
    fp, fd, fa, nbytes, nseq, arrivals, leftover = feats.T
    # The overheads' columns: per step, per sequence, per arrival, per leftover row; a column
    # that is zero throughout (an offline calibration has no arrivals; a kernel without row
    # blocks leaves no rows over) has no coefficient to fit, and gets 0.
    every = [np.ones_like(nseq), nseq, arrivals, leftover]
    kept = [j for j, col in enumerate(every) if j < 2 or (w2 * col**2).sum() > 0]
    cols = np.stack([every[j] for j in kept])
    k = len(cols)
    gram = (w2 * cols[:, None, :] * cols[None, :, :]).sum(-1)  # the same for every grid point
    # Non-negative least squares by its active sets: every subset of the columns, solved
    # exactly; the best solution with no negative coefficient wins (the empty set, all zero,
    # is always allowed). Errors from the normal equations' quadratic form, so no candidate's
    # residuals are built sample by sample.
    subsets = []
    for mask in range(1, 2**k):
        idx = [j for j in range(k) if mask >> j & 1]
        sub = gram[np.ix_(idx, idx)]
        if np.linalg.cond(sub) < 1e12:  # collinear columns (say one sequence per step): skip
            subsets.append((idx, np.linalg.inv(sub)))

    wcols = w2 * cols

    def overheads(r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The coefficients >= 0 minimising sum w2 (r - coef . cols)^2, r of shape [...,
        sample], and that minimum less sum w2 r^2."""
        rhs = np.einsum("...n,kn->...k", r, wcols)
        best_coef = np.zeros(rhs.shape)
        best_err = np.zeros(rhs.shape[:-1])  # the all-zero solution's
        for idx, inv in subsets:
            coef = np.zeros(rhs.shape)
            coef[..., idx] = rhs[..., idx] @ inv.T
            err = -2 * (coef * rhs).sum(-1) + np.einsum("...i,ij,...j->...", coef, gram, coef)
            better = (coef >= 0).all(-1) & (err < best_err)
            best_coef = np.where(better[..., None], coef, best_coef)
            best_err = np.where(better, err, best_err)
        return best_coef, best_err

    def combine(compute: np.ndarray, memory: np.ndarray, lam: float) -> np.ndarray:
        return np.maximum(compute, memory) + lam * np.minimum(compute, memory)

    def error(x: np.ndarray) -> tuple[float, np.ndarray]:
        ep, ed, ea, em = 10.0 ** x[:4]
        base = combine(fp / (peak * ep) + fd / (peak * ed) + fa / (peak * ea), nbytes / (bw * em), x[4])
        coef, _ = overheads(y - base)
        return float((w2 * (base + coef @ cols - y) ** 2).sum()), coef

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
                r = y - base
                err = (w2 * r**2).sum(-1) + overheads(r)[1]
                i, j = np.unravel_index(np.argmin(err), err.shape)
                if err[i, j] < best[0]:
                    best = (err[i, j], np.array([grid[i], grid[j], grid[ia], grid[im], lam]))
    # Coordinate search: four log10 efficiencies, then the overlap share (in [0, 1]).
    x, step = best[1], grid[1] - grid[0]
    bounds = [_LOG_EFF_RANGE] * 4 + [(0.0, 1.0)]
    err, _ = error(x)
    while step > 0.002:  # log10 steps: 0.002 is 0.5%
        moved = False
        for p in range(5):
            for sign in (1.0, -1.0):
                trial = x.copy()
                trial[p] = np.clip(trial[p] + sign * step, *bounds[p])
                e, _ = error(trial)
                if e < err:
                    x, err, moved = trial, e, True
        if not moved:
            step /= 2
    _, coef = error(x)
    overhead = [0.0] * len(every)
    for j, value in zip(kept, coef):
        overhead[j] = float(value)
    ep, ed, ea, em = 10.0 ** x[:4]
    return ep, ed, ea, em, x[4], overhead


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
