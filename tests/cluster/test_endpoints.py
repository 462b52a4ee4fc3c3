"""The EndpointSlice sidecar: slices -> replica file lines, and a sync against an API server
over real HTTP (a stand-in serving the discovery.k8s.io list route, checking the bearer token)."""

from __future__ import annotations

import pytest
from fastapi import FastAPI, Header, HTTPException

from tests.server.conftest import LiveServer
from tokenmill.cluster import endpoints
from tokenmill.cluster.endpoints import Followed, replica_lines
from tokenmill.router.replicas import parse_replica_line


def slice_of(*endpoints, port=8000, port_name="http"):
    return {"ports": [{"name": port_name, "port": port}], "endpoints": list(endpoints)}


def ep(address, ready=None, serving=None, terminating=None):
    cond = {k: v for k, v in {"ready": ready, "serving": serving, "terminating": terminating}.items() if v is not None}
    return {"addresses": [address], "conditions": cond}


def test_ready_terminating_and_starting_pods():
    s = slice_of(ep("10.0.0.1", ready=True), ep("10.0.0.2", ready=False, serving=True, terminating=True),
                 ep("10.0.0.3", ready=False), ep("10.0.0.4"), ep("fd00::5", ready=True))
    lines = replica_lines([s], "http", version="v2")
    assert lines == ["http://10.0.0.1:8000 version=v2", "http://10.0.0.2:8000 version=v2 draining",
                     "http://10.0.0.4:8000 version=v2", "http://[fd00::5]:8000 version=v2"]
    # every line is one the router's replica file parser takes, with the meaning intended
    specs = [parse_replica_line(line) for line in lines]
    assert [(sp.version, sp.draining) for sp in specs] == [("v2", False), ("v2", True), ("v2", False), ("v2", False)]


def test_other_ports_and_duplicates_are_ignored():
    a = slice_of(ep("10.0.0.1", ready=True), port_name="grpc")
    b = slice_of(ep("10.0.0.2", ready=True), ep("10.0.0.2", ready=True), port=9000)
    assert replica_lines([a, b], "http") == ["http://10.0.0.2:9000"]
    assert Followed.parse("svc=canary") == Followed("svc", "canary")


@pytest.fixture
def api_server():
    app = FastAPI()
    app.state.items = []

    @app.get("/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices")
    def list_slices(ns: str, labelSelector: str, authorization: str = Header(None)):
        if authorization != "Bearer t0ken":
            raise HTTPException(401)
        assert ns == "tm" and labelSelector == "kubernetes.io/service-name=tokenmill-model"
        return {"kind": "EndpointSliceList", "items": app.state.items}

    server = LiveServer(app)
    yield server
    server.stop()


def _sync(api_server, tmp_path, token="t0ken") -> int:
    """One pass of the sidecar's own entry point (its flags as the manifest gives them)."""
    (tmp_path / "token").write_text(token)
    return endpoints.main(["--service", "tokenmill-model", "--namespace", "tm", "--api", api_server.url,
                           "--token-file", str(tmp_path / "token"), "--ca-file", "none",
                           "--out", str(tmp_path / "replicas.txt"), "--once"])


def test_sync_writes_the_file_and_keeps_it_when_the_api_fails(api_server, tmp_path, caplog):
    api_server.app.state.items = [slice_of(ep("10.1.0.7", ready=True), ep("10.1.0.8", terminating=True))]
    assert _sync(api_server, tmp_path) == 0
    out = tmp_path / "replicas.txt"
    assert out.read_text() == "http://10.1.0.7:8000\nhttp://10.1.0.8:8000 draining\n"
    # a refused call (bad token) fails the run but leaves the last good file in place
    assert _sync(api_server, tmp_path, token="wrong") == 1 and "401" in caplog.text
    assert out.read_text() == "http://10.1.0.7:8000\nhttp://10.1.0.8:8000 draining\n"
    api_server.app.state.items = []  # every pod gone
    assert _sync(api_server, tmp_path) == 0 and out.read_text() == ""
