"""POST /start_profile and /stop_profile (server --profile-dir): a real torch profiler trace of
the engine's steps, which `tokenmill doctor --profile` reads."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.server.checks import assert_openai_error
from tests.server.conftest import MODEL, LiveServer
from tokenmill.doctor.rules import trace_findings
from tokenmill.doctor.trace import read_trace
from tokenmill.server.app import create_app


def test_profiling_is_off_without_a_directory(server):
    assert_openai_error(server.http().post("/start_profile"), 400)
    assert_openai_error(server.http().post("/stop_profile"), 400)


def test_a_profile_of_real_steps_reaches_the_doctor(engine, tmp_path):
    live = LiveServer(create_app({MODEL: engine}, profile_dir=str(tmp_path)))
    try:
        http = live.http(api_key=None)
        assert_openai_error(http.post("/stop_profile"), 409)  # nothing started
        assert http.post("/start_profile").json() == {"profiling": True}
        assert_openai_error(http.post("/start_profile"), 409)  # already recording
        for i in range(3):
            r = http.post("/v1/completions", json={"model": MODEL, "prompt": f"hello {i}", "max_tokens": 4,
                                                   "ignore_eos": True})
            assert r.status_code == 200
        stopped = http.post("/stop_profile").json()
    finally:
        live.stop()
    (trace,) = stopped["traces"]
    assert stopped["profiling"] is False and Path(trace).parent == tmp_path and Path(trace).stat().st_size > 0

    summary = read_trace(trace)
    assert summary.steps >= 3 * 4  # three requests of four tokens, one step at least per token
    assert 0 < summary.cpu_op_us <= summary.step_us and summary.gpu_kernel_us is None
    assert any(name.startswith("aten::") for name, _ in summary.top_ops)
    assert trace_findings(summary)[0].rule == "step_time"

    run = subprocess.run([sys.executable, "-m", "tokenmill", "doctor", "--profile", trace, "--format", "markdown"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "Where the step time goes" in run.stdout, run.stderr
