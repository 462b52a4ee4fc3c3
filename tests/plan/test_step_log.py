"""`--step-log`: the engine logs each step's composition and seconds, and `tokenmill plan
calibrate --step-log` fits a profile on those lines instead of running the engine."""

import json

import pytest

from tokenmill.engine.step_log import StepLog, read_step_log
from tokenmill.plan.calibrate import samples_from_step_log
from tokenmill.plan.cost import shape_of_chunks
from tokenmill.sampling import SamplingParams


@pytest.mark.slow
def test_logged_steps_are_the_steps_the_scheduler_made(small_engine, tmp_path, monkeypatch):
    engine = small_engine
    path = tmp_path / "steps.jsonl"
    scheduled = []
    schedule = engine.core.scheduler.schedule

    def logged():
        out = schedule()
        if not out.is_empty:
            scheduled.append(shape_of_chunks(out.chunks))
        return out

    monkeypatch.setattr(engine.core.scheduler, "schedule", logged)
    monkeypatch.setattr(engine, "step_log", StepLog(str(path)))
    for i, n in enumerate((70, 20, 33)):  # 70 > the 48-token budget: a chunked prompt
        engine.add_request(f"log-{i}", [(7 * i + j) % 1000 + 1 for j in range(n)],
                           SamplingParams(max_tokens=8, ignore_eos=True))
    while engine.has_unfinished:
        engine.step()
    engine.step_log.close()

    lines = read_step_log(str(path))
    assert len(lines) == len(scheduled) >= 8
    assert all(line["s"] > 0 and line["t"] > 1e9 for line in lines)  # seconds; unix time
    assert [s.seqs for s in samples_from_step_log([str(path)])] == scheduled
    assert [line["new"] for line in lines][:2] == [3, 0] and sum(line["new"] for line in lines) == 3
    assert any(len(s) > 1 and any(q.prompt for q in s) and any(not q.prompt for q in s) for s in scheduled)
    assert engine.kv.num_free_blocks == engine.kv.num_blocks


def test_a_torn_last_line_is_skipped(tmp_path):
    path = tmp_path / "steps.jsonl"
    path.write_text('{"t":1.0,"s":0.5,"seqs":[[0,16,1,1]]}\n{"t":2.0,"s":0.1,"seqs":[[16,1')
    assert read_step_log(str(path)) == [{"t": 1.0, "s": 0.5, "seqs": [[0, 16, 1, 1]]}]


def test_calibrate_fits_a_step_log(tmp_path):
    # Lines made from a known profile: the command must recover their step times.
    from tokenmill.cli import main
    from tokenmill.plan.catalog import hardware, model_shape
    from tokenmill.plan.cost import CostModel, Profile, SeqShape

    truth = Profile("cpu-2core", "q4_1", eff_prefill=0.2, eff_decode=0.4, eff_memory=0.08, eff_attention=0.06,
                    no_overlap=0.8, step_overhead_s=0.004, per_seq_s=0.002, kv_bytes=2)
    model = CostModel(model_shape("smollm2-135m"), hardware("cpu-2core"), truth)
    steps = [[SeqShape(0, n, True, True)] for n in (16, 24, 64, 160, 320, 512)]
    steps += [[SeqShape(c, 1, True, False)] * b for b in (1, 2, 4, 8, 12) for c in (32, 200, 600)]
    steps += [[SeqShape(192, 32, True, True), SeqShape(100, 1, True, False)], [SeqShape(256, 256, False, True)]]
    log = tmp_path / "steps.jsonl"
    log.write_text("".join(json.dumps({"t": 1.7e9 + i, "s": model.step_seconds(s),
                                       "seqs": [[q.start, q.num_tokens, int(q.samples), int(q.prompt)] for q in s]}) + "\n"
                           for i, s in enumerate(steps)))
    out = tmp_path / "profile.json"
    assert main(["plan", "calibrate", "--step-log", str(log), "--output", str(out)]) == 0
    fitted = Profile.load(out)
    assert fitted.fit["samples"] == len(steps)
    assert fitted.fit["measured"].startswith("steps logged by a running server")
    assert fitted.fit["median_abs_rel_error"] < 0.02
    fitted_model = CostModel(model_shape("smollm2-135m"), hardware("cpu-2core"), fitted)
    held_out = [SeqShape(192, 48, True, True)], [SeqShape(300, 1, True, False)] * 6
    for s in held_out:
        assert fitted_model.step_seconds(s) == pytest.approx(model.step_seconds(s), rel=0.05)


def test_calibrate_refuses_a_missing_or_foreign_file(tmp_path, capsys):
    from tokenmill.cli import main

    foreign = tmp_path / "other.jsonl"
    foreign.write_text('{"event": "not a step"}\n')
    for path in (tmp_path / "missing.jsonl", foreign):
        assert main(["plan", "calibrate", "--step-log", str(path), "--output", str(tmp_path / "p.json")]) == 2
        assert f"--step-log {path}" in capsys.readouterr().err
    assert not (tmp_path / "p.json").exists()


def test_serve_refuses_a_step_log_it_cannot_write_before_loading(tmp_path, capsys):
    from tokenmill.cli import main

    path = tmp_path / "no-such-dir" / "steps.jsonl"
    assert main(["serve", "--step-log", str(path), "--port", "1"]) == 2  # returns before any port or model
    err = capsys.readouterr().err
    assert f"--step-log {path}: cannot append to it (No such file or directory)" in err
    assert "could not load the model" not in err


def _line(t, s, seqs, new=0):
    return json.dumps({"t": t, "s": s, "seqs": [[q.start, q.num_tokens, int(q.samples), int(q.prompt)] for q in seqs],
                       "new": new}) + "\n"


def test_arrivals_are_charged_to_the_step_the_engine_went_on_from(tmp_path):
    # "new" counts requests taken in before a line's step; their front work ran during the step
    # before, if the engine went straight on. After an idle gap, no step paid for them.
    from tokenmill.plan.cost import SeqShape

    row = [SeqShape(10, 1, True, False)]
    log = tmp_path / "steps.jsonl"
    log.write_text(_line(100.0, 0.05, row) + _line(100.0502, 0.05, row, new=2)  # went on: step 0 pays for 2
                   + _line(100.5, 0.05, row, new=1)  # 0.4 s idle before it: nobody pays
                   + _line(100.5503, 0.05, row))
    assert [s.arrivals for s in samples_from_step_log([str(log)])] == [2, 0, 0, 0]


def test_calibrate_fits_the_cost_of_an_arrival_and_of_a_leftover_row(tmp_path):
    from tokenmill.cli import main
    from tokenmill.plan.catalog import hardware, model_shape
    from tokenmill.plan.cost import CostModel, Profile, SeqShape

    truth = Profile("cpu-2core", "q4_1", eff_prefill=0.2, eff_decode=0.4, eff_memory=0.08, eff_attention=0.06,
                    no_overlap=0.8, step_overhead_s=0.004, per_seq_s=0.002, kv_bytes=2, arrival_s=0.003,
                    row_block=4, per_leftover_row_s=0.002)
    model = CostModel(model_shape("smollm2-135m"), hardware("cpu-2core"), truth)
    steps = [[SeqShape(0, n, True, True)] for n in (16, 24, 64, 161, 322, 512)]
    steps += [[SeqShape(c, 1, True, False)] * b for b in (1, 2, 3, 4, 5, 7, 8, 12) for c in (32, 200, 600)]
    steps += [[SeqShape(192, 32, True, True), SeqShape(100, 1, True, False)], [SeqShape(256, 256, False, True)]]
    lines, t = [], 1.7e9
    for i, seqs in enumerate(steps * 2):
        arrivals = (i % 3 == 1) + (i % 7 == 2)  # requests taken in after this step, whose front work it ran beside
        seconds = model.step_seconds(seqs) + truth.arrival_s * arrivals
        lines.append((t, seconds, seqs))
        lines.append(arrivals)
        t += seconds + 0.0002
    log = tmp_path / "steps.jsonl"
    log.write_text("".join(_line(t, s, seqs, new=lines[2 * i - 1] if i else 0)
                           for i, (t, s, seqs) in enumerate(lines[::2])))
    out = tmp_path / "profile.json"
    assert main(["plan", "calibrate", "--step-log", str(log), "--output", str(out)]) == 0
    fitted = Profile.load(out)
    assert fitted.arrival_s == pytest.approx(truth.arrival_s, rel=0.1)
    assert fitted.row_block == 4 and fitted.per_leftover_row_s == pytest.approx(truth.per_leftover_row_s, rel=0.1)
    assert fitted.fit["median_abs_rel_error"] < 0.02


def _bench_result(path, start_unix, sends, ttfts):
    n = len(sends)  # the fields tokenmill bench writes per request
    path.write_text(json.dumps({"start_unix": start_unix, "start_times": [t - start_unix for t in sends],
                                "ttfts": ttfts, "input_lens": [40] * n, "output_lens": [4] * n,
                                "itls": [[0.05] * 3] * n, "e2els": [x + 0.15 for x in ttfts],
                                "generated_texts": [""] * n, "errors": [""] * n}))
    return str(path)


def test_front_latency_from_requests_sent_alone_to_an_idle_engine(tmp_path):
    # Six lone requests on an idle engine: each is taken in 4 ms after its send and prefilled in
    # one 100 ms step, and the client has its first token 2 ms after that step. Two requests sent
    # together and one sent into a busy step are not read (they would say 4 and 54 ms).
    from tokenmill.cli import main
    from tokenmill.plan.cost import Profile
    from tokenmill.plan.front import front_latency

    prefill, decode = [[0, 40, 1, 1]], [[40, 1, 1, 0]]
    lines, sends, ttfts = [], [], []
    t = 1.7e9
    for i in range(6):
        ingress = 0.004 + 0.0005 * (i % 2)
        sends.append(t)
        ttfts.append(ingress + 0.1 + 0.002)
        lines.append({"t": t + ingress, "s": 0.1, "seqs": prefill, "new": 1})
        lines += [{"t": t + ingress + 0.1 + 0.05 * j, "s": 0.05, "seqs": decode, "new": 0} for j in range(4)]
        t += 1.0
    sends += [t, t + 0.01]  # together: skipped
    ttfts += [0.2, 0.2]
    lines.append({"t": t + 0.004, "s": 0.1, "seqs": prefill + prefill, "new": 2})
    t += 1.0
    lines.append({"t": t - 0.02, "s": 0.05, "seqs": decode, "new": 0})  # busy at the send: skipped
    sends.append(t)
    ttfts.append(0.2)
    lines.append({"t": t + 0.03, "s": 0.1, "seqs": prefill + decode, "new": 1})
    log = tmp_path / "steps.jsonl"
    log.write_text("".join(json.dumps(line) + "\n" for line in lines))
    result = _bench_result(tmp_path / "run.json", sends[0], sends, ttfts)
    latency = front_latency([str(log)], [result])
    assert latency.requests == 6
    # (unix seconds near 1.7e9 carry ~0.2 us of float resolution)
    assert latency.ingress_s == pytest.approx(0.00425, abs=1e-6) and latency.egress_s == pytest.approx(0.002, abs=1e-6)

    out = tmp_path / "profile.json"
    assert main(["plan", "calibrate", "--step-log", str(log), "--bench-result", result, "--output", str(out)]) == 0
    profile = Profile.load(out)
    assert profile.ingress_s == pytest.approx(0.00425, abs=1e-6) and profile.fit["front_requests"] == 6
    assert main(["plan", "calibrate", "--bench-result", result, "--output", str(out)]) == 2  # needs the step log
