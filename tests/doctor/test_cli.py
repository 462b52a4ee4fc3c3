"""`tokenmill doctor --load`: a saved recording in, a report out, the exit status says critical."""

from __future__ import annotations

import subprocess
import sys

from tokenmill.doctor.recording import Recording, ReplicaRecording, Scrape, parse_exposition

LIMITS = {"max_num_seqs": 2, "max_num_batched_tokens": 512, "num_kv_blocks": 100, "enable_prefix_caching": True}


def scrape(at: float, running: int, waiting: int) -> Scrape:
    return Scrape(at, parse_exposition(
        f'vllm:num_requests_running{{model_name="m"}} {running}\n'
        f'vllm:num_requests_waiting{{model_name="m"}} {waiting}\n'
        'vllm:kv_cache_usage_perc{model_name="m"} 0.05\n'))


def test_a_saved_recording_gives_a_report_and_a_failing_status(tmp_path):
    queued = Recording([ReplicaRecording("http://a", [scrape(t, 2, 9) for t in range(6)], {"m": LIMITS})])
    (tmp_path / "queued.json").write_text(queued.to_json())
    out = tmp_path / "report.md"
    run = subprocess.run([sys.executable, "-m", "tokenmill", "doctor", "--load", str(tmp_path / "queued.json"),
                          "--format", "markdown", "--output", str(out)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 1, run.stderr  # critical
    report = out.read_text()
    assert "batch cap" in report and "`--max-num-seqs 11`" in report and "report.png" in report
    assert (tmp_path / "report.png").stat().st_size > 1000

    calm = Recording([ReplicaRecording("http://a", [scrape(t, 1, 0) for t in range(6)], {"m": LIMITS})])
    (tmp_path / "calm.json").write_text(calm.to_json())
    run = subprocess.run([sys.executable, "-m", "tokenmill", "doctor", "--load", str(tmp_path / "calm.json"),
                          "--format", "markdown"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "batch cap" not in run.stdout and "tokenmill doctor" in run.stdout
