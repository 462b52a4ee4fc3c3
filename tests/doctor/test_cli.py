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


def test_the_fix_comes_with_the_planners_prediction(tmp_path):
    """--plan-model: the suggested cap, simulated by `tokenmill plan` on the window's workload
    (11 clients, 40-token prompts, 16-token answers) against the cap as it is."""
    def busy(at: float, done: int) -> Scrape:
        s = scrape(at, 2, 9)
        s.samples.update(parse_exposition(
            f'# TYPE vllm:request_success counter\nvllm:request_success_total{{model_name="m",finished_reason="length"}} {done}\n'
            f'# TYPE vllm:prompt_tokens counter\nvllm:prompt_tokens_total{{model_name="m"}} {done * 40}\n'
            f'# TYPE vllm:generation_tokens counter\nvllm:generation_tokens_total{{model_name="m"}} {done * 16}\n'))
        return s

    recording = Recording([ReplicaRecording("http://a", [busy(t, 3 * t) for t in range(6)], {"m": LIMITS})])
    (tmp_path / "r.json").write_text(recording.to_json())
    run = subprocess.run([sys.executable, "-m", "tokenmill", "doctor", "--load", str(tmp_path / "r.json"),
                          "--plan-model", "smollm2-135m", "--format", "markdown"], capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 1, run.stderr
    line = next(x for x in run.stdout.splitlines() if x.startswith("**Predicted**"))
    ttft = line.split("TTFT p50 ")[1].split(" ms")[0]
    before, after = (float(x) for x in ttft.split(" -> "))
    assert after < before, line  # 11 seats instead of 2: the queue goes
