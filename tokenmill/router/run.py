"""`tokenmill router`: wire flags into a Fleet, optionally start a local fleet, serve."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from tokenmill.router.policy import POLICIES, Policy, PolicyConfig
from tokenmill.router.rollout import Rollout, RolloutConfig
from tokenmill.router.settings import DEFAULT_VERSION, RouterSettings

# The HTTP stack (aiohttp, tokenizers) is imported only when a router is built: the CLI
# builds every subcommand's parser, and `tokenmill generate` should not pay ~1 s.

log = logging.getLogger("tokenmill.router")


def add_router_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--replica", action="append", default=[], metavar="URL[@VERSION]",
                   help="a replica (repeatable); @VERSION puts it in a version group")
    p.add_argument("--replica-file", default=None,
                   help="replica list re-read when it changes: 'URL [version=V] [draining]' per line")
    p.add_argument("--local", type=int, default=0, metavar="N", help="start N `tokenmill serve` replicas here")
    p.add_argument("--local-threads", type=int, default=None, help="CPU threads split among --local replicas")
    p.add_argument("--serve-arg", action="append", default=[],
                   help="argument passed to every --local replica (repeatable, e.g. --serve-arg=--model=X)")
    p.add_argument("--api-key", action="append", default=[], help="key clients must send (repeatable)")
    p.add_argument("--replica-api-key", default=None, help="key sent to the replicas")
    p.add_argument("--policy", choices=POLICIES, default="prefix")
    p.add_argument("--session-header", default="x-session-id", help="header naming a session (else `user`)")
    p.add_argument("--stable-version", default=DEFAULT_VERSION)
    p.add_argument("--canary-version", default=None, help="start a canary rollout of this version group")
    p.add_argument("--canary-percent", type=float, default=None, help="fixed split (no automatic plan)")
    p.add_argument("--rollout-min-samples", type=int, default=RolloutConfig.min_samples)
    p.add_argument("--rollout-min-step-s", type=float, default=RolloutConfig.min_step_s)
    for f in ("stale_after_s", "max_waiting", "max_kv_usage", "imbalance_abs", "imbalance_rel",
              "affinity_share", "w_hit", "w_queue", "w_kv"):
        default = getattr(PolicyConfig, f)
        p.add_argument("--" + f.replace("_", "-"), dest=f, type=type(default), default=default)
    p.add_argument("--health-interval", type=float, default=RouterSettings.health_interval_s)
    p.add_argument("--max-attempts", type=int, default=RouterSettings.max_attempts)
    p.add_argument("--max-body-bytes", type=int, default=RouterSettings.max_body_bytes,
                   help="larger request bodies are refused with 413")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def build_fleet(args: argparse.Namespace, local_urls: list[str] = ()):
    from tokenmill.router.proxy import Fleet
    from tokenmill.router.replicas import ReplicaFile, ReplicaSet, parse_replica_flag

    config = PolicyConfig(args.policy, args.stale_after_s, args.max_waiting, args.max_kv_usage,
                          args.imbalance_abs, args.imbalance_rel, args.affinity_share, args.w_hit, args.w_queue,
                          args.w_kv)
    replicas = ReplicaSet()
    specs = [parse_replica_flag(u) for u in [*args.replica, *local_urls]]
    replicas.sync(specs)
    rollout = Rollout(args.stable_version, RolloutConfig(min_samples=args.rollout_min_samples,
                                                         min_step_s=args.rollout_min_step_s))
    if args.canary_version:
        rollout.start(args.canary_version, 0.0, auto=args.canary_percent is None, percent=args.canary_percent)
    settings = RouterSettings(max_attempts=args.max_attempts, health_interval_s=args.health_interval,
                              session_header=args.session_header.lower(), replica_api_key=args.replica_api_key,
                              max_body_bytes=args.max_body_bytes)
    replica_file = ReplicaFile(Path(args.replica_file)) if args.replica_file else None
    if replica_file is not None and specs:
        raise ValueError("--replica-file replaces the replica list: use it without --replica/--local")
    return Fleet(replicas, Policy(config), rollout, settings, replica_file)


def run_router(args: argparse.Namespace) -> int:
    from aiohttp import web

    from tokenmill.router.app import create_app
    from tokenmill.router.local import LocalFleet

    if not (args.replica or args.replica_file or args.local):
        raise ValueError("no replicas: give --replica URL, --replica-file PATH or --local N")
    logging.getLogger("tokenmill.router").setLevel(args.log_level.upper())
    local = LocalFleet(args.local, args.serve_arg, args.local_threads) if args.local else None
    fleet = build_fleet(args, local.urls if local else [])
    if local is not None:
        local.start()
    try:
        # SIGINT/SIGTERM stop it gracefully: streams get shutdown_timeout to finish, then the
        # app's cleanup stops the --local children. handler_cancellation: a client that hangs
        # up cancels its request, which closes the replica connection and so aborts it there.
        web.run_app(create_app(fleet, args.api_key, on_shutdown=local.stop if local else None),
                    host=args.host, port=args.port, access_log=None,  # a log line per request costs more than routing
                    print=None, handler_cancellation=True, shutdown_timeout=30, loop=_event_loop())
    finally:
        if local is not None:  # a start-up failure (port taken): the cleanup never ran
            local.stop()
    return 0


def _event_loop():
    """uvloop where installed (as uvicorn chose before): its transports cost less per write."""
    try:
        import uvloop
    except ImportError:
        import asyncio
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()
