"""`tokenmill doctor --prometheus`: a real Prometheus server scrapes a real tokenmill server; the
doctor reads the window back through Prometheus's query API and sees what happened in it."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time

import httpx
import pytest

from tests.server.conftest import MODEL, LiveServer
from tokenmill.doctor.evidence import windows
from tokenmill.doctor.prometheus import read_prometheus
from tokenmill.server.app import create_app

PROMETHEUS = shutil.which("prometheus")
# scripts/install.sh installs Debian's prometheus where apt is usable (CI's machines); a dev box
# without it skips here rather than fake one.
pytestmark = pytest.mark.skipif(PROMETHEUS is None, reason="no prometheus binary (Debian package `prometheus`)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def prometheus_over(tmp_path):
    procs = []

    def start(target: str) -> str:
        port = free_port()
        (tmp_path / "prometheus.yml").write_text(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: tokenmill\n"
            f"    static_configs:\n      - targets: ['{target}']\n")
        proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(proc)
        url = f"http://127.0.0.1:{port}"
        # Ready, and the target scraped: Prometheus hands new targets to its scrapers a few
        # seconds after start (its discovery updates are throttled), so "ready" is not enough.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                up = httpx.get(url + "/api/v1/query", params={"query": 'up{job="tokenmill"}'}, timeout=1).json()
                if up["data"]["result"] and up["data"]["result"][0]["value"][1] == "1":
                    return url
            except (httpx.TransportError, ValueError, KeyError):
                pass
            time.sleep(0.2)
        raise RuntimeError("prometheus did not scrape the server")

    yield start
    for proc in procs:
        proc.terminate()
        proc.wait(30)


def test_the_doctor_reads_a_window_back_from_prometheus(engine, prometheus_over):
    live = LiveServer(create_app({MODEL: engine}))
    try:
        prom = prometheus_over(live.url.removeprefix("http://"))
        started = time.time()
        time.sleep(2.5)  # a couple of scrapes before the requests
        http = live.http(api_key=None)
        for i in range(6):
            r = http.post("/v1/completions", json={"model": MODEL, "prompt": f"count {i}", "max_tokens": 8,
                                                   "ignore_eos": True})
            assert r.status_code == 200
        time.sleep(2.5)  # and after
        seconds = time.time() - started
        recording = read_prometheus(prom, seconds, step=0.5)
        (window,) = windows(recording)
        assert window.model == MODEL and window.replica == live.url
        assert window.deltas["vllm:generation_tokens"] == 6 * 8
        assert window.deltas["vllm:request_success"] == 6
        assert window.ttft.count == 6 and window.ttft.p50 is not None
        assert window.max_num_seqs == engine.engine.config.scheduler.max_num_seqs  # limits from the replica

        run = subprocess.run([sys.executable, "-m", "tokenmill", "doctor", "--prometheus", prom, "--seconds",
                              str(seconds + 1), "--format", "markdown"], capture_output=True, text=True, timeout=120)
        assert run.returncode == 0 and "1 replica(s)" in run.stdout, run.stdout + run.stderr
    finally:
        live.stop()
