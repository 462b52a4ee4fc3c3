"""`tokenmill router` flags -> the fleet it builds (no server started)."""

import pytest

from tokenmill.cli import build_parser
from tokenmill.router.run import build_fleet


def _args(*argv):
    return build_parser().parse_args(["router", *argv])


def test_flags_build_replicas_versions_policy_and_canary():
    fleet = build_fleet(_args("--replica", "http://a:1/", "--replica", "http://b:2@v2", "--policy", "least-load",
                              "--stable-version", "default", "--canary-version", "v2", "--canary-percent", "20",
                              "--imbalance-abs", "3"))
    assert [(r.url, r.version) for r in fleet.replicas] == [("http://a:1", "default"), ("http://b:2", "v2")]
    assert fleet.policy.config.policy == "least-load" and fleet.policy.config.imbalance_abs == 3
    assert (fleet.rollout.canary, fleet.rollout.percent, fleet.rollout.auto) == ("v2", 20, False)
    assert build_fleet(_args("--replica", "http://a:1", "--canary-version", "v2")).rollout.auto


def test_replica_file_and_flags_do_not_mix(tmp_path):
    path = tmp_path / "fleet.txt"
    path.write_text("http://a:1 version=v3 draining\n")
    fleet = build_fleet(_args("--replica-file", str(path)))
    specs = fleet.replica_file.read_if_changed()
    assert [(s.url, s.version, s.draining) for s in specs] == [("http://a:1", "v3", True)]
    with pytest.raises(ValueError):
        build_fleet(_args("--replica-file", str(path), "--replica", "http://b:2"))
    path.write_text("http://a:1 weight=2\n")
    with pytest.raises(ValueError):
        build_fleet(_args("--replica-file", str(path))).replica_file.read_if_changed()
