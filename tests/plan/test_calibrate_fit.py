"""The calibration fit recovers a cost model from step timings it generated itself."""

import math
import random

import pytest

from tokenmill.plan.calibrate import Sample, fit
from tokenmill.plan.catalog import hardware, model_shape
from tokenmill.plan.cost import CostModel, Profile, SeqShape


def _steps(n: int, rng: random.Random) -> list[list[SeqShape]]:
    steps = []
    for _ in range(n):
        if rng.random() < 0.4:  # a prefill chunk, maybe beside some decode rows
            seqs = [SeqShape(rng.choice([0, 64, 256]), rng.randint(16, 512), rng.random() < 0.5, True)]
        else:
            seqs = []
        seqs += [SeqShape(rng.randint(16, 600), 1, True, False) for _ in range(rng.randint(0 if seqs else 1, 16))]
        steps.append(seqs)
    return steps


def _truth():
    """The model shape, the device, and a cost model of known efficiencies to fit back."""
    shape, hw = model_shape("smollm2-135m"), hardware("cpu-2core")
    truth = Profile("cpu-2core", "q4_1", eff_prefill=0.08, eff_decode=0.02, eff_memory=0.3,
                    step_overhead_s=0.012, per_seq_s=0.0015, kv_bytes=4)
    return shape, hw, CostModel(shape, hw, truth)


def test_fit_recovers_step_times_of_a_known_profile():
    shape, hw, model = _truth()
    steps = _steps(150, random.Random(0))
    samples = [Sample(s, model.step_seconds(s)) for s in steps]
    fitted = fit(samples, shape, hw, Profile("cpu-2core", "q4_1", kv_bytes=4))
    assert fitted.source == "calibrated"
    assert fitted.fit["median_abs_rel_error"] < 0.03
    # And on steps it never saw.
    fitted_model = CostModel(shape, hw, fitted)
    held_out = _steps(50, random.Random(1))
    errors = sorted(abs(fitted_model.step_seconds(s) / model.step_seconds(s) - 1) for s in held_out)
    assert errors[len(errors) // 2] < 0.05


def test_fit_is_robust_to_outlier_steps():
    # A shared machine: one step in eight took 2-6x its time (another process had the core).
    shape, hw, model = _truth()
    rng = random.Random(2)
    steps = _steps(200, rng)
    samples = [Sample(s, model.step_seconds(s) * (rng.uniform(2, 6) if rng.random() < 0.125 else 1.0))
               for s in steps]
    held_out = _steps(60, random.Random(3))

    def held_out_error(profile):
        fitted = CostModel(shape, hw, profile)
        errors = sorted(abs(fitted.step_seconds(s) / model.step_seconds(s) - 1) for s in held_out)
        return errors[len(errors) // 2]

    robust = fit(samples, shape, hw, Profile("cpu-2core", "q4_1", kv_bytes=4))
    plain = fit(samples, shape, hw, Profile("cpu-2core", "q4_1", kv_bytes=4), rounds=1)
    outliers = sum(sm.seconds > 1.5 * model.step_seconds(sm.seqs) for sm in samples)
    assert robust.fit["outlier_steps"] == outliers > 15  # found, and only them
    assert held_out_error(robust) < 0.05
    assert held_out_error(plain) > 2 * held_out_error(robust)  # what least squares alone does with them


def test_fit_recovers_attention_and_overlap():
    # A CPU-like truth: attention at a third of the linears' rate, compute and memory mostly adding up.
    shape, hw = model_shape("smollm2-135m"), hardware("cpu-2core")
    truth = Profile("cpu-2core", "q4_1", eff_prefill=0.25, eff_decode=0.4, eff_memory=0.07, eff_attention=0.08,
                    no_overlap=0.9, step_overhead_s=0.005, per_seq_s=0.002, kv_bytes=2)
    model = CostModel(shape, hw, truth)
    samples = [Sample(s, model.step_seconds(s)) for s in _steps(150, random.Random(4))]
    fitted = fit(samples, shape, hw, Profile("cpu-2core", "q4_1", kv_bytes=2))
    assert fitted.fit["median_abs_rel_error"] < 0.01
    assert fitted.no_overlap > 0.5  # not the roofline (the efficiencies trade off, so not exactly 0.9)
    # Held out: short prompts after a long cached prefix, where attention is most of the cost.
    fitted_model = CostModel(shape, hw, fitted)
    for start in (256, 1024, 2048):
        s = [SeqShape(start, 32, True, True)]
        assert fitted_model.step_seconds(s) == pytest.approx(model.step_seconds(s), rel=0.05)


def test_fit_predicts_the_mean_step_time_under_skewed_noise():
    # A request's latency is a sum of steps, so the fit should price a step shape at its mean
    # time. With multiplicative noise (log-normal, sigma 0.2: mean 1.02x the noiseless time), a
    # fit on error relative to the measured time settles near E[1/e] / E[1/e^2] = 0.94x, below
    # even the median; relative to the prediction, it settles near the mean.
    shape, hw, model = _truth()
    rng = random.Random(5)
    samples = [Sample(s, model.step_seconds(s) * rng.lognormvariate(0.0, 0.2)) for s in _steps(400, rng)]
    held_out = _steps(100, random.Random(6))
    mean_total = sum(model.step_seconds(s) for s in held_out) * math.exp(0.2**2 / 2)

    def total(profile):
        return sum(CostModel(shape, hw, profile).step_seconds(s) for s in held_out)

    fitted = total(fit(samples, shape, hw, Profile("cpu-2core", "q4_1", kv_bytes=4)))
    on_measured = total(fit(samples, shape, hw, Profile("cpu-2core", "q4_1", kv_bytes=4), rounds=1))
    assert fitted == pytest.approx(mean_total, rel=0.03)
    assert on_measured < 0.95 * mean_total
