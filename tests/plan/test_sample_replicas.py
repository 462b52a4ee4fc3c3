"""`plan simulate --sample-replicas`: an explicitly approximate fleet, M replicas with their
share of the traffic. It says so in its output, scales throughput to the fleet, and lands near
the whole fleet's simulation on a balanced load."""

import json

from tokenmill.cli import main
from tokenmill.plan.workload import synthetic, thin

FLEET = ["plan", "simulate", "--hardware", "H100", "--model", "llama-3.1-8b", "--replicas", "8",
         "--request-rate", "40", "--duration", "10", "--random-input-len", "500", "--random-output-len", "100",
         "--random-range-ratio", "0.5", "--max-num-seqs", "64"]


def test_thinning_keeps_a_share_of_the_requests_and_their_rate():
    trace = synthetic(4000, rate=100, input_len=100, output_len=10, range_ratio=0.5, seed=1)
    kept = thin(trace, 0.25, seed=1)
    assert 900 < len(kept) < 1100
    assert abs(len(kept) / kept[-1].arrival - 25) < 2.5  # requests/s: a quarter of 100
    assert kept == thin(trace, 0.25, seed=1) and set(kept) <= set(trace)


def test_sampled_fleet_is_labelled_scaled_and_close_to_the_whole(tmp_path, capsys):
    whole, sample = tmp_path / "whole.json", tmp_path / "sample.json"
    assert main(FLEET + ["--result-json", str(whole)]) == 0
    capsys.readouterr()
    assert main(FLEET + ["--sample-replicas", "2", "--result-json", str(sample)]) == 0
    assert "APPROXIMATE" in capsys.readouterr().out
    w, s = json.loads(whole.read_text()), json.loads(sample.read_text())
    assert not w["approximate"] and s["approximate"] and (s["simulated_replicas"], s["fleet_replicas"]) == (2, 8)
    assert s["completed"] < 0.4 * w["completed"]  # a quarter of the requests, give or take
    assert abs(s["fleet_output_throughput"] / w["fleet_output_throughput"] - 1) < 0.15
    for key in ("median_ttft_ms", "median_tpot_ms"):
        assert abs(s[key] / w[key] - 1) < 0.25, key
