"""`tokenmill doctor`: record (or load) a window, diagnose it, report."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tokenmill.doctor.evidence import windows
from tokenmill.doctor.gpu import read_dcgm_scrapes, read_nvidia_smi_csv
from tokenmill.doctor.predict import PlanTarget, predict
from tokenmill.doctor.prometheus import read_prometheus
from tokenmill.doctor.recording import Recording, record, replicas_of_router
from tokenmill.doctor.report import markdown, plot, print_terminal
from tokenmill.doctor.rules import Evidence, diagnose
from tokenmill.doctor.trace import read_trace


def add_doctor_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", action="append", default=[], help="a replica's base URL to scrape (repeatable)")
    p.add_argument("--router", default=None, help="a `tokenmill router`: watch every replica it routes to")
    p.add_argument("--seconds", type=float, default=30.0, help="how long to watch")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between scrapes")
    p.add_argument("--api-key", default=None)
    p.add_argument("--prometheus", default=None, metavar="URL",
                   help="read the last --seconds from a Prometheus server's query API instead of scraping")
    p.add_argument("--prometheus-match", default="", metavar="MATCHERS",
                   help='extra label matchers for --prometheus, e.g. job="tokenmill"')
    p.add_argument("--load", default=None, metavar="FILE", help="diagnose a recording saved with --save")
    p.add_argument("--save", default=None, metavar="FILE", help="keep the recording (JSON)")
    p.add_argument("--nvidia-smi-csv", default=None, metavar="FILE",
                   help="output of nvidia-smi --query-gpu=timestamp,utilization.gpu,power.draw,clocks.sm,"
                        "clocks.max.sm,clocks_event_reasons.active --format=csv -l 1")
    p.add_argument("--dcgm", action="append", default=[], metavar="FILE", help="a DCGM exporter scrape (repeatable)")
    p.add_argument("--profile", default=None, metavar="TRACE",
                   help="a torch profiler trace from `tokenmill serve --profile-dir` (/start_profile, /stop_profile)")
    p.add_argument("--plan-model", default=None, metavar="NAME",
                   help="predict each fix with `tokenmill plan simulate` for this catalog model (e.g. smollm2-135m)")
    p.add_argument("--plan-hardware", default="cpu-2core", metavar="NAME", help="the planner's hardware (catalog name)")
    p.add_argument("--format", choices=("terminal", "markdown"), default="terminal")
    p.add_argument("--output", default=None, metavar="FILE", help="write the markdown report here (and a PNG beside it)")


def cmd_doctor(args: argparse.Namespace) -> int:
    if args.load:
        recording = Recording.from_json(Path(args.load).read_text())
    elif args.prometheus:
        recording = read_prometheus(args.prometheus, args.seconds, args.interval, match=args.prometheus_match)
    elif args.profile and not (args.url or args.router):
        recording = Recording([])  # a trace alone
    elif args.url or args.router:
        urls = list(args.url) + (replicas_of_router(args.router, args.api_key) if args.router else [])
        print(f"watching {len(urls)} replica(s) for {args.seconds:.0f} s ...", file=sys.stderr)
        recording = record(urls, args.seconds, args.interval, args.api_key)
    else:
        print("tokenmill doctor: give --url (repeatable), --router URL, --load FILE or --profile TRACE", file=sys.stderr)
        return 2
    if args.save:
        Path(args.save).write_text(recording.to_json())
    gpu = None
    if args.nvidia_smi_csv:
        gpu = read_nvidia_smi_csv(Path(args.nvidia_smi_csv).read_text())
    elif args.dcgm:
        gpu = read_dcgm_scrapes([Path(f).read_text() for f in args.dcgm])
    ws = windows(recording)
    findings = diagnose(Evidence(ws, gpu, read_trace(args.profile) if args.profile else None))
    if args.plan_model:
        predict(findings, ws, PlanTarget(args.plan_model, args.plan_hardware))
    if args.output:
        out = Path(args.output)
        picture = plot(ws, out.with_suffix(".png")) if ws else None
        out.write_text(markdown(findings, ws, recording.seconds, picture.name if picture else None))
        print(f"report: {out}", file=sys.stderr)
    if args.format == "markdown" and not args.output:
        print(markdown(findings, ws, recording.seconds))
    elif args.format == "terminal":
        print_terminal(findings, ws, recording.seconds)
    return 1 if any(f.severity == "critical" for f in findings) else 0
