"""Follow Kubernetes EndpointSlices into `tokenmill router`'s replica file (a sidecar).

    python -m tokenmill.cluster.endpoints --service tokenmill-model --out /fleet/replicas.txt

The router already re-reads `--replica-file` when it changes; this process keeps that file
equal to what the model Service's EndpointSlices say, so the router follows pods as they come
and go without knowing Kubernetes. Per endpoint:
- ready: a replica (`URL [version=V]`);
- terminating (scale-down, rollout, node drain): `draining`, so its streams finish and it takes
  nothing new, until it leaves the slice;
- neither (starting, failing readiness): absent; the router's own health checks would mark it
  down anyway, but a pod still loading its model should not even be tried.

It lists the slices every `--interval` seconds with the pod's service account (RBAC:
deploy/k8s/base/router-rbac.yaml) and writes the file atomically, only when it changes.
Polling rather than a watch: one small list a second costs the API server little, needs no
resume-on-expiry logic, and bounds the lag at one interval. No Kubernetes client library:
two HTTP GETs and a JSON walk.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from tokenmill.files import write_atomic

log = logging.getLogger("tokenmill.cluster.endpoints")

SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")
IN_CLUSTER_API = "https://kubernetes.default.svc"


@dataclass(frozen=True)
class Followed:
    service: str
    version: str | None = None  # the router's version group for this Service's pods

    @classmethod
    def parse(cls, text: str) -> Followed:
        """`NAME` or `NAME=VERSION` (a canary is a second Deployment behind a second Service)."""
        name, _, version = text.partition("=")
        if not name:
            raise argparse.ArgumentTypeError(f"not a service: {text!r}")
        return cls(name, version or None)


def replica_lines(slices: list[dict], port_name: str, version: str | None = None) -> list[str]:
    """EndpointSlice objects -> replica file lines (sorted, one per address)."""
    lines = set()
    for s in slices:
        ports = [p.get("port") for p in s.get("ports") or [] if p.get("name", "") == port_name]
        if not ports or ports[0] is None:
            continue
        for e in s.get("endpoints") or []:
            cond = e.get("conditions") or {}
            terminating = cond.get("terminating") is True
            # `ready` unset means ready (the API's own rule for a nil condition)
            if not terminating and cond.get("ready") is False:
                continue
            for address in e.get("addresses") or []:
                host = f"[{address}]" if ":" in address else address
                words = [f"http://{host}:{ports[0]}"]
                if version:
                    words.append(f"version={version}")
                if terminating:
                    words.append("draining")
                lines.add(" ".join(words))
    return sorted(lines)


@dataclass
class SliceReader:
    """Lists one namespace's EndpointSlices of a Service through the API server."""

    client: httpx.Client
    namespace: str

    def slices(self, service: str) -> list[dict]:
        r = self.client.get(f"/apis/discovery.k8s.io/v1/namespaces/{self.namespace}/endpointslices",
                            params={"labelSelector": f"kubernetes.io/service-name={service}"})
        r.raise_for_status()
        return r.json().get("items") or []


def write_if_changed(path: Path, lines: list[str]) -> bool:
    text = "".join(line + "\n" for line in lines)
    try:
        if path.read_text(encoding="utf-8") == text:
            return False
    except FileNotFoundError:
        pass
    write_atomic(path, text)  # the router never reads half a file
    return True


def sync_once(reader: SliceReader, followed: list[Followed], port_name: str, out: Path) -> bool:
    lines = []
    for f in followed:
        lines += replica_lines(reader.slices(f.service), port_name, f.version)
    changed = write_if_changed(out, lines)
    if changed:
        log.info("replicas: %d (%s)", len(lines), ", ".join(lines) or "none")
    return changed


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tokenmill.cluster.endpoints", description=__doc__.split("\n")[0])
    p.add_argument("--service", action="append", type=Followed.parse, required=True,
                   metavar="NAME[=VERSION]", help="a Service whose pods are replicas (repeatable)")
    p.add_argument("--port-name", default="http", help="the Service port that serves HTTP")
    p.add_argument("--out", type=Path, required=True, help="the router's --replica-file")
    p.add_argument("--interval", type=float, default=1.0)
    p.add_argument("--namespace", default=None, help="default: the pod's own")
    p.add_argument("--api", default=IN_CLUSTER_API)
    p.add_argument("--token-file", type=Path, default=SERVICE_ACCOUNT / "token")
    p.add_argument("--ca-file", default=str(SERVICE_ACCOUNT / "ca.crt"), help="'none': do not verify TLS")
    p.add_argument("--once", action="store_true", help="sync once and exit")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    namespace = args.namespace or (SERVICE_ACCOUNT / "namespace").read_text().strip()
    verify = False if args.ca_file == "none" else args.ca_file
    failures = 0
    with httpx.Client(base_url=args.api, verify=verify, timeout=10) as client:
        reader = SliceReader(client, namespace)
        while True:
            # The token is re-read each time: projected service account tokens rotate.
            client.headers["Authorization"] = f"Bearer {args.token_file.read_text().strip()}"
            try:
                sync_once(reader, args.service, args.port_name, args.out)
                failures = 0
            except (httpx.HTTPError, ValueError) as e:
                # Keep the last good file: a flaky API server must not empty the fleet.
                failures += 1
                log.warning("listing EndpointSlices failed (%d in a row): %s", failures, e)
                if args.once:
                    return 1
            if args.once:
                return 0
            time.sleep(args.interval)


if __name__ == "__main__":
    sys.exit(main())
