"""deploy/k8s renders, validates and agrees with the server it runs.

- `kubectl kustomize` renders every overlay;
- kubernetes-validate checks the core resources against the Kubernetes schemas (strict: an
  unknown field fails); custom resources (KEDA, Prometheus Operator, Gateway API) are not in
  those schemas and are checked by the assertions below instead;
- yamllint is clean;
- the model container's args parse with the real `tokenmill serve` parser, and the probes,
  grace period and resource requests agree with what those flags say; the KEDA thresholds
  and HPA behaviour equal the autoscaling policy's defaults; the Dockerfiles' commands parse too.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tokenmill.cli import build_parser, parse_bytes
from tokenmill.cluster.autoscale import AutoscaleConfig
from tokenmill.router.run import add_router_arguments
from tokenmill.server.run import DrainingServer

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
OVERLAYS = ["cpu", "gpu", "cpu-gateway"]
KUBECTL = shutil.which("kubectl")
PRESTOP_SLEEP_S = 5  # what the preStop hook waits (asserted from the manifest below)


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request) -> tuple[str, list[dict]]:
    if KUBECTL is None:
        pytest.skip("kubectl is not installed: the manifests cannot be rendered here")
    out = subprocess.run([KUBECTL, "kustomize", str(K8S / "overlays" / request.param)],
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    return request.param, [d for d in yaml.safe_load_all(out.stdout) if d]


def find(docs: list[dict], kind: str, name: str) -> dict:
    matches = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} found"
    return matches[0]


def container(deployment: dict, name: str) -> dict:
    return next(c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == name)


def cpu_cores(q: str) -> float:
    return float(q[:-1]) / 1000 if q.endswith("m") else float(q)


def mem_bytes(q: str) -> int:
    return parse_bytes(q)  # the server's own parser: Gi, Mi, G, M ...


def exact_flags(parser: argparse.ArgumentParser, args: list[str]) -> None:
    """argparse takes an unambiguous prefix (--num-thread for --num-threads): a manifest must
    spell each flag in full, so a rename cannot hide behind a prefix."""
    known = {o for a in parser._actions for o in a.option_strings}
    for a in args:
        if a.startswith("--"):
            assert a.split("=", 1)[0] in known, f"{a} is not a flag of {parser.prog}"


def serve_args(c: dict):
    args = c["args"]
    assert args[0] == "serve"
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    exact_flags(sub.choices["serve"], args[1:])
    return parser.parse_args(args)  # the real CLI: a renamed or removed flag fails here


def test_core_resources_match_the_kubernetes_schemas(rendered):
    kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    _, docs = rendered
    core = [d for d in docs if "/" not in d["apiVersion"] or d["apiVersion"].split("/")[0].endswith("k8s.io")
            or d["apiVersion"].split("/")[0] in ("apps", "policy", "batch", "autoscaling")]
    core = [d for d in core if not d["apiVersion"].startswith(("inference.networking", "gateway.networking"))]
    assert {d["kind"] for d in core} >= {"Deployment", "Service", "PodDisruptionBudget", "Role", "RoleBinding",
                                        "ServiceAccount"}
    for d in core:
        kv.validate(d, kv.latest_version(), strict=True)


def test_model_pod_probes_grace_and_resources_agree_with_its_flags(rendered):
    overlay, docs = rendered
    dep = find(docs, "Deployment", "tokenmill-model")
    pod = dep["spec"]["template"]["spec"]
    c = container(dep, "tokenmill")
    args = serve_args(c)
    port = next(p for p in c["ports"] if p["name"] == "http")
    assert port["containerPort"] == args.port and args.host == "0.0.0.0"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = c[probe]["httpGet"]
        assert get["path"] == "/health" and get["port"] in ("http", args.port), probe
    # the service and the monitor reach the same port
    svc = find(docs, "Service", "tokenmill-model")
    assert svc["spec"]["ports"][0]["targetPort"] in ("http", args.port)
    assert find(docs, "PodMonitor", "tokenmill-model")["spec"]["podMetricsEndpoints"][0]["port"] == "http"

    # SIGKILL must never cut a drain short: preStop sleep + --drain-timeout + the server's abort grace
    assert c["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", str(PRESTOP_SLEEP_S)]
    needed = PRESTOP_SLEEP_S + args.drain_timeout + DrainingServer.ABORT_GRACE_SECONDS
    assert pod["terminationGracePeriodSeconds"] > needed

    req, lim = c["resources"]["requests"], c["resources"]["limits"]
    # torch threads = the CPUs asked for (more threads than CPUs only thrash)
    assert args.num_threads is not None and cpu_cores(req["cpu"]) == args.num_threads
    assert mem_bytes(lim["memory"]) >= mem_bytes(req["memory"])
    if overlay == "gpu":
        assert args.device == "cuda" and req["nvidia.com/gpu"] == lim["nvidia.com/gpu"] == 1
        assert args.model.startswith("/models/")
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["models"]["persistentVolumeClaim"]["claimName"] == "tokenmill-models"
        assert "emptyDir" not in volumes["models"]
    else:
        assert args.device in ("auto", "cpu") and "nvidia.com/gpu" not in req
        # the KV pool plus room for the model, activations and the Python process
        assert mem_bytes(req["memory"]) >= args.kv_cache_memory_bytes + 2**30
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert mounts["shm"] == "/dev/shm" and mounts["models"] == "/models"
    shm = next(v for v in pod["volumes"] if v["name"] == "shm")
    assert shm["emptyDir"]["medium"] == "Memory"
    assert pod["securityContext"]["runAsNonRoot"] is True
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert labels["kueue.x-k8s.io/queue-name"] == dep["metadata"]["labels"]["kueue.x-k8s.io/queue-name"]


def test_router_follows_the_model_service_endpointslices(rendered):
    _, docs = rendered
    dep = find(docs, "Deployment", "tokenmill-router")
    router, sidecar = container(dep, "router"), container(dep, "endpoints")
    p = argparse.ArgumentParser(prog="tokenmill router")
    add_router_arguments(p)
    exact_flags(p, router["args"][1:])
    rargs = p.parse_args(router["args"][1:])
    assert router["args"][0] == "router"
    from tokenmill.cluster.endpoints import build_parser as endpoints_parser

    exact_flags(endpoints_parser(), sidecar["args"])
    sargs = endpoints_parser().parse_args(sidecar["args"])
    assert sidecar["command"] == ["python", "-m", "tokenmill.cluster.endpoints"]
    assert str(sargs.out) == rargs.replica_file  # the file the sidecar writes is the one the router reads
    assert [f.service for f in sargs.service] == ["tokenmill-model"]
    find(docs, "Service", "tokenmill-model")
    model_svc = find(docs, "Service", "tokenmill-model")
    assert sargs.port_name in [p["name"] for p in model_svc["spec"]["ports"]]
    # RBAC: the router's service account may list EndpointSlices
    assert dep["spec"]["template"]["spec"]["serviceAccountName"] == "tokenmill-router"
    role = find(docs, "Role", "tokenmill-router-endpoints")
    assert {"get", "list", "watch"} <= set(role["rules"][0]["verbs"])
    assert role["rules"][0]["resources"] == ["endpointslices"]
    binding = find(docs, "RoleBinding", "tokenmill-router-endpoints")
    assert binding["subjects"][0]["name"] == "tokenmill-router"
    pdb = find(docs, "PodDisruptionBudget", "tokenmill-router")
    assert pdb["spec"]["minAvailable"] < dep["spec"]["replicas"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()


def test_keda_thresholds_are_the_policy_defaults(rendered):
    _, docs = rendered
    so = find(docs, "ScaledObject", "tokenmill-model")
    policy = AutoscaleConfig()
    triggers = {t["name"]: t for t in so["spec"]["triggers"]}
    assert float(triggers["ongoing-requests"]["metadata"]["threshold"]) == policy.target_ongoing_requests
    assert float(triggers["waiting-requests"]["metadata"]["threshold"]) == policy.max_waiting
    assert float(triggers["kv-cache-usage"]["metadata"]["threshold"]) == policy.max_kv_usage
    assert float(triggers["ttft-p99"]["metadata"]["threshold"]) == policy.ttft_p99_slo_s
    for t in triggers.values():
        assert "vllm:" in t["metadata"]["query"]  # the server's metric names (tokenmill/server/metrics.py)
    assert (so["spec"]["minReplicaCount"], so["spec"]["maxReplicaCount"]) == (policy.min_replicas, policy.max_replicas)
    behavior = so["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert behavior["scaleUp"]["stabilizationWindowSeconds"] == policy.upscale_delay_s
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] == policy.downscale_delay_s
    up = next(p for p in behavior["scaleUp"]["policies"] if p["type"] == "Percent")
    assert up["value"] == round(100 * (policy.max_step_factor - 1))
    assert so["spec"]["cooldownPeriod"] == policy.scale_to_zero_delay_s
    assert so["spec"]["scaleTargetRef"]["name"] == "tokenmill-model"


def test_metric_names_in_queries_exist_in_the_server():
    source = (REPO / "tokenmill" / "server" / "metrics.py").read_text()
    exported = set(re.findall(r'"(vllm:[a-z0-9_]+)"', source))
    texts = [(K8S / "base" / "keda-scaledobject.yaml").read_text()]
    texts += [p.read_text() for p in (REPO / "deploy" / "grafana").glob("*.json")]
    used = {re.sub(r"_(bucket|sum|count|total)$", "", m) for t in texts for m in re.findall(r"vllm:[a-z0-9_]+", t)}
    assert used and used <= exported, used - exported


@pytest.mark.skipif(shutil.which("yamllint") is None, reason="pip install yamllint")
def test_yamllint_is_clean():
    out = subprocess.run(["yamllint", "-s", "-c", str(REPO / "deploy" / ".yamllint"), str(REPO / "deploy")],
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.cuda"])
def test_dockerfiles_run_as_non_root_with_a_health_check(name):
    text = (REPO / "deploy" / "docker" / name).read_text()
    final = text.split("\nFROM ")[-1]  # the last stage is the image
    users = re.findall(r"^USER\s+(\S+)", final, re.MULTILINE)
    assert users and users[-1] not in ("root", "0")
    assert re.search(r"^HEALTHCHECK .*?/health", final, re.MULTILINE | re.DOTALL)
    entry = re.search(r'^ENTRYPOINT\s+(\[.*\])', final, re.MULTILINE)
    cmd = re.search(r'^CMD\s+(\[.*\])', final, re.MULTILINE)
    assert entry and yaml.safe_load(entry.group(1)) == ["tokenmill"]
    args = build_parser().parse_args(yaml.safe_load(cmd.group(1)))  # the image's default command parses
    assert args.command == "serve" and args.host == "0.0.0.0"
    port = re.search(r"^EXPOSE\s+(\d+)", final, re.MULTILINE)
    assert port and int(port.group(1)) == args.port
    assert f":{args.port}/health" in final
    assert (REPO / ".dockerignore").exists()


def test_ray_manifests_parse_and_use_the_builder():
    docs = [d for p in (REPO / "deploy" / "ray").glob("*.yaml") for d in yaml.safe_load_all(p.read_text()) if d]
    imports = [a["import_path"] for d in docs for a in _applications(d)]
    assert imports and set(imports) == {"tokenmill.cluster.ray_serve:build_app"}


def _applications(doc: dict) -> list[dict]:
    if "applications" in doc:
        return doc["applications"]
    if doc.get("kind") == "RayService":
        return yaml.safe_load(doc["spec"]["serveConfigV2"])["applications"]
    return []

