"""tokenmill serve | generate | chat | router | bench: one entry point.

The CLI is (with the server) the only place an EngineConfig is built, from flags; the one
environment variable read anywhere is the API key's (API_KEY_ENV), here.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import logging
import os
import re
import sys
import typing
from functools import partial
from pathlib import Path

from tokenmill.config import EngineConfig

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "ki": 2**10, "mi": 2**20, "gi": 2**30}


def parse_bytes(text: str) -> int:
    """'512MiB', '1.5GiB', '2G', '1000000' -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 512MiB, 2GiB, 1000000)")
    value = int(float(m.group(1)) * _UNITS[unit])
    if value <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive: {text!r}")
    return value


def add_engine_arguments(p: argparse.ArgumentParser) -> None:
    """One flag per EngineConfig setting, named, typed and defaulted by its dataclass field."""
    for group, kind in EngineConfig.groups().items():
        g = p.add_argument_group(group, (kind.__doc__ or "").split("\n")[0])
        hints = typing.get_type_hints(kind)
        for f in dataclasses.fields(kind):
            g.add_argument(engine_flag(f), dest=f.name, help=f.metadata["help"], **_flag_kind(f, hints[f.name]))


def engine_flag(f: dataclasses.Field) -> str:
    """The option spelling of one setting: its metadata's, or --no-<name> for a True-by-default
    switch, or --<name>."""
    if f.metadata.get("flag"):
        return f.metadata["flag"]
    name = f.name.replace("_", "-")
    return f"--no-{name}" if f.default is True else f"--{name}"


def _flag_kind(f: dataclasses.Field, hint) -> dict:
    if hint is bool:  # a switch flips the default, whichever it is
        return {"action": "store_false" if f.default else "store_true", "default": f.default}
    # `int | None` -> int: None is the default's "not set", never typed on the command line
    base = next((t for t in typing.get_args(hint) if t is not type(None)), hint)
    kind = {"type": base, "default": f.default}
    if f.metadata.get("size"):
        kind |= {"type": parse_bytes, "metavar": "SIZE"}
    if f.metadata.get("choices"):
        kind["choices"] = f.metadata["choices"]
    return kind


def engine_config(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig.from_flat(**engine_settings(args))


def engine_settings(args: argparse.Namespace) -> dict:
    """The parsed engine flags, by setting name (each flag's dest is its setting's name)."""
    return {name: getattr(args, name) for name in EngineConfig.settings()}


def add_sampling_arguments(p: argparse.ArgumentParser, max_tokens: int) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=max_tokens)
    g.add_argument("--temperature", type=float, default=0.7)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=-1)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--sampling-seed", type=int, default=None, help="per-request seed (reproducible samples)")
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def sampling_params(args: argparse.Namespace):
    from tokenmill.sampling import SamplingParams

    return SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        min_p=args.min_p, repetition_penalty=args.repetition_penalty, seed=args.sampling_seed, stop=args.stop,
    )


# Secrets given as flags show in `ps` to every user of the machine; a file or the environment don't.
API_KEY_ENV = "TOKENMILL_API_KEY"


def read_api_keys(keys: list[str], key_file: str | None, environ: dict[str, str] | None = None) -> list[str]:
    """Keys from --api-key flags, the TOKENMILL_API_KEY variable (comma-separated) and a file
    (one per line; blank lines and #comments skipped)."""
    environ = os.environ if environ is None else environ
    out = [k for k in keys if k]
    out += [k.strip() for k in environ.get(API_KEY_ENV, "").split(",") if k.strip()]
    if key_file:
        for line in Path(key_file).read_text(encoding="utf-8").splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                out.append(line)
    return out


def build_parser(with_bench: bool = False) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenmill", description="An LLM serving engine.")
    sub = parser.add_subparsers(dest="command", required=True)

    # conflict_handler: serve's own --model (repeatable, NAME=PATH) replaces the engine flag's.
    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server", conflict_handler="resolve")
    add_engine_arguments(s)
    s.add_argument("--model", dest="model", action=_ServeModel, default=EngineConfig().load.model, metavar="[NAME=]MODEL",
                   help="a model to serve (repeatable): 'smollm2', 'minilm' (embeddings), a .gguf file, an HF or "
                        "sentence-transformers directory; NAME= sets the name clients use (default: smollm2)")
    s.add_argument("--model-repository", default=None, metavar="DIR",
                   help="serve every model folder of DIR, each configured by its tokenmill.toml "
                        "(kind, model, load, [engine]); beside any --model given")
    s.add_argument("--model-memory-budget", type=parse_bytes, default=None, metavar="SIZE",
                   help="refuse a /v2/repository load that would take the served models past this (default: no bound)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--served-model-name", default=None, help="the name clients use (default: --model)")
    s.add_argument("--api-key", action="append", default=[],
                   help=f"accepted key (repeatable; visible in ps: prefer --api-key-file or ${API_KEY_ENV})")
    s.add_argument("--api-key-file", default=None, help="file of accepted keys, one per line")
    s.add_argument("--allowed-origins", action="append", default=[], metavar="ORIGIN",
                   help="browser origin allowed by CORS (repeatable or comma-separated; default: CORS off)")
    s.add_argument("--profile-dir", default=None,
                   help="enable POST /start_profile and /stop_profile: torch profiler traces of the steps go here")
    s.add_argument("--log-requests", action="store_true",
                   help="log prompts and completions (off by default: they are user data)")
    s.add_argument("--max-body-bytes", type=parse_bytes, default=None, help="request body limit (default 4MiB)")
    s.add_argument("--drain-timeout", type=float, default=30.0, help="seconds to finish requests on SIGTERM")
    s.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    s.add_argument("--data-dir", default=None,
                   help="the Batch API's files and SQLite records (default: ~/.cache/tokenmill/batches, "
                        "or $XDG_CACHE_HOME/tokenmill/batches)")

    g = sub.add_parser("generate", help="complete one prompt offline and print the text")
    g.add_argument("prompt")
    add_engine_arguments(g)
    add_sampling_arguments(g, max_tokens=64)

    c = sub.add_parser("chat", help="interactive chat in the terminal (/exit or EOF to leave)")
    add_engine_arguments(c)
    add_sampling_arguments(c, max_tokens=256)
    c.add_argument("--system", default=None, help="system prompt")

    rb = sub.add_parser("run-batch", help="run an OpenAI batch file (JSONL) offline; resumable",
                        conflict_handler="resolve")
    add_engine_arguments(rb)
    rb.add_argument("--model", dest="model", action=_ServeModel, default=EngineConfig().load.model,
                    metavar="[NAME=]MODEL", help="a model lines may ask for (repeatable, as serve's): 'smollm2', "
                                                 "'minilm' for /v1/embeddings lines, a .gguf file, a directory")
    rb.add_argument("-i", "--input-file", required=True, help="batch input: one request per line (OpenAI format)")
    rb.add_argument("-o", "--output-file", required=True, help="results (appended to: a rerun skips done custom_ids)")
    rb.add_argument("--served-model-name", default=None, help="the model name lines may give (default: --model)")
    rb.add_argument("--max-concurrency", type=int, default=128,
                    help="lines in flight at once (more than --max-num-seqs keeps every slot busy)")

    r = sub.add_parser("router", help="one OpenAI endpoint over many replicas (tokenmill.router)")
    from tokenmill.router.run import add_router_arguments

    add_router_arguments(r)

    d = sub.add_parser("doctor", help="why a deployment is slow, idle or expensive (tokenmill.doctor)")
    from tokenmill.doctor.run import add_doctor_arguments

    add_doctor_arguments(d)

    pl = sub.add_parser("plan", help="capacity and cost planner on the engine's scheduler (tokenmill.plan)")
    from tokenmill.plan.cli import add_plan_arguments

    add_plan_arguments(pl)

    qz = sub.add_parser("quantize", help="GPTQ / AWQ / RTN weight quantization into a checkpoint (tokenmill.quantize)")
    from tokenmill.quantize.cli import add_quantize_arguments

    add_quantize_arguments(qz)

    b = sub.add_parser("bench", help="benchmark (tokenmill.bench)", add_help=not with_bench)
    if with_bench:
        from tokenmill.bench.cli import add_bench_arguments

        b.add_argument("-h", "--help", action="help")
        add_bench_arguments(b)
    else:
        b.add_argument("bench_args", nargs=argparse.REMAINDER, help="(tokenmill.bench is not installed)")
    return parser


def _bench_available() -> bool:
    try:
        import tokenmill.bench.cli  # noqa: F401
    except ImportError:
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    with_bench = bool(argv) and argv[0] == "bench" and _bench_available()
    if argv and argv[0] == "bench" and not with_bench:
        print("tokenmill bench: the benchmark module (tokenmill.bench.cli) is not available in this install",
              file=sys.stderr)
        return 2
    args = build_parser(with_bench).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "serve":
            return cmd_serve(args)
        if args.command == "generate":
            return cmd_generate(args)
        if args.command == "chat":
            return cmd_chat(args)
        if args.command == "run-batch":
            return cmd_run_batch(args)
        if args.command == "router":
            from tokenmill.router.run import run_router

            return run_router(args)
        if args.command == "doctor":
            from tokenmill.doctor.run import cmd_doctor

            return cmd_doctor(args)
        if args.command == "plan":
            from tokenmill.plan.cli import run_plan

            return run_plan(args)
        if args.command == "quantize":
            from tokenmill.quantize.cli import run_quantize

            return run_quantize(args)
        if args.command == "bench":
            from tokenmill.bench.cli import run_bench

            return int(run_bench(args) or 0)
    except KeyboardInterrupt:
        return 130
    except ValueError as e:  # bad flags (EngineConfig/SamplingParams) or a model that will not load
        print(f"tokenmill {args.command}: {e}", file=sys.stderr)
        return 2
    return 2


class _ServeModel(argparse.Action):
    """serve's --model: every value is kept in `models`; `model` (the engine setting) is the
    first one's model, so that one --model reads as it always did."""

    def __call__(self, parser, namespace, value, option_string=None):
        models = list(getattr(namespace, "models", None) or []) + [value]
        namespace.models = models
        setattr(namespace, self.dest, next(iter(served_models(models[:1], None).values())))


def served_models(values: list[str] | None, served_name: str | None) -> dict[str, str]:
    """serve's --model flags -> {name clients use: model}. `NAME=MODEL`, or a bare MODEL named
    by itself (or by --served-model-name when it is the only one)."""
    from tokenmill.server.repository_dir import NAME_PATTERN  # a repository folder's names are the same

    pairs = []
    for value in values or [EngineConfig().load.model]:
        name, sep, model = value.partition("=")
        if not sep or not re.fullmatch(NAME_PATTERN, name):  # no name given (or '=' inside a path)
            name, model = value, value
        if not model:
            raise ValueError(f"--model {value!r}: no model after '='")
        pairs.append((name, model))
    if served_name is not None:
        if len(pairs) > 1:
            raise ValueError("--served-model-name names the only model; with several, use --model NAME=MODEL")
        pairs = [(served_name, pairs[0][1])]
    names = [n for n, _ in pairs]
    if len(set(names)) != len(names):
        raise ValueError(f"--model: each served name must be unique, got {names}")
    return dict(pairs)


def serve_entries(args: argparse.Namespace) -> list:
    """The served models: each --model flag, then each folder of --model-repository (without
    any --model flag, a repository replaces the default model)."""
    from tokenmill.model.loader import is_encoder
    from tokenmill.server.repository_dir import ModelEntry, read_repository

    flags = getattr(args, "models", None)
    entries = []
    if flags or not args.model_repository:
        entries = [ModelEntry(name, model, "embedding" if is_encoder(model) else "generate", source=f"--model {name}")
                   for name, model in served_models(flags, args.served_model_name).items()]
    if args.model_repository:
        for entry in read_repository(args.model_repository):
            if (entry.kind == "embedding") != is_encoder(entry.model):
                raise ValueError(f"{entry.source}: field 'kind' is {entry.kind!r}, but {entry.model!r} is "
                                 f"{'an embedding' if is_encoder(entry.model) else 'a generative'} model")
            entries.append(entry)
    names = [e.name for e in entries]
    if len(set(names)) != len(names):
        raise ValueError(f"each served name must be unique (--model and --model-repository), got {names}")
    return entries


def cmd_serve(args: argparse.Namespace) -> int:
    # No cyclic collections while the imports and the models' loads make their ~230k objects,
    # which live as long as the server: the full collections they set off, each over every
    # object so far, took 0.22 s of a 2.0 s warm start. serve() turns it back on once the models
    # loaded at start are in.
    gc.disable()
    from tokenmill.build import build_async_embedder, build_async_engine
    from tokenmill.model.loader import model_file_bytes
    from tokenmill.server.run import serve
    from tokenmill.startup import log_since_process_start

    log_since_process_start("interpreter and imports done")
    settings = engine_settings(args)
    if settings["step_log"]:
        _check_appendable(settings["step_log"])
    loaders, sizes, kinds = {}, {}, {}
    entries = serve_entries(args)
    for e in entries:  # every config validated now, before the port opens
        kinds[e.name] = e.kind
        if e.kind == "embedding":
            loaders[e.name] = partial(build_async_embedder, e.model, **{"num_threads": settings["num_threads"],
                                                                      **e.settings})
            sizes[e.name] = model_file_bytes(e.model)
        else:
            config = EngineConfig.from_flat(**{**settings, **e.settings, "model": e.model})
            loaders[e.name] = partial(build_async_engine, config)
            sizes[e.name] = model_file_bytes(e.model) + config.cache.kv_cache_memory_bytes
    at_start = [e.name for e in entries if e.load_at_start]
    if args.model_memory_budget is not None and sum(sizes[n] for n in at_start) > args.model_memory_budget:
        raise ValueError(f"the models need about {sum(sizes[n] for n in at_start) / 2**20:.0f} MiB, over "
                         f"--model-memory-budget {args.model_memory_budget / 2**20:.0f} MiB")
    keys = read_api_keys(args.api_key, args.api_key_file)
    log = logging.getLogger("tokenmill")
    log.info("API keys: %s", f"{len(keys)} configured" if keys else "none (open)")
    if args.api_key:
        log.warning("--api-key is visible to every user in ps; prefer --api-key-file or $%s", API_KEY_ENV)
    origins = [o.strip() for value in args.allowed_origins for o in value.split(",") if o.strip()]
    return serve(
        loaders,
        host=args.host, port=args.port, api_keys=keys, max_body_bytes=args.max_body_bytes,
        drain_timeout=args.drain_timeout, log_level=args.log_level, allowed_origins=origins,
        log_requests=args.log_requests, model_bytes=sizes, memory_budget=args.model_memory_budget,
        model_kinds=kinds, unloaded={e.name: f"not loaded at start ({e.source}: load = false)"
                                     for e in entries if not e.load_at_start},
        profile_dir=args.profile_dir,
        data_dir=args.data_dir or default_data_dir(),
    )


def _check_appendable(path: str) -> None:
    """Before the port opens: the engine opens its step log only when a model loads, and a
    failure there would read as the model's ("could not load the model ...")."""
    try:
        open(path, "a").close()
    except OSError as e:
        raise ValueError(f"--step-log {path}: cannot append to it ({e.strerror})") from None


def default_data_dir() -> Path:
    """Under the user's cache, not a tmp dir: batches must outlive a reboot to be resumable."""
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "tokenmill" / "batches"


def cmd_run_batch(args: argparse.Namespace) -> int:
    from tokenmill.build import build_async_embedder, build_async_engine
    from tokenmill.model.loader import is_encoder
    from tokenmill.server.run_batch import run_batch

    settings = engine_settings(args)
    engines = {}
    for name, model in served_models(getattr(args, "models", None), args.served_model_name).items():
        engines[name] = (build_async_embedder(model, num_threads=settings["num_threads"]) if is_encoder(model)
                         else build_async_engine(EngineConfig.from_flat(**{**settings, "model": model})))
    return run_batch(engines, args.input_file, args.output_file, args.max_concurrency)


def cmd_generate(args: argparse.Namespace) -> int:
    from tokenmill.llm import LLM

    params = sampling_params(args)
    llm = LLM(**engine_settings(args))
    out = llm.generate(args.prompt, params)[0]
    print(out.outputs[0].text)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    import asyncio

    return asyncio.run(run_chat(engine_config(args), sampling_params(args), args.system))


async def run_chat(config: EngineConfig, params, system: str | None, stdin=None, stdout=None) -> int:
    """Read a line, stream the reply token by token, keep the history; /exit or EOF ends it."""
    import asyncio
    import itertools

    import jinja2.ext  # noqa: F401  (the tokenizer's template sandbox needs the submodule)

    from tokenmill.build import build_async_engine

    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    engine = build_async_engine(config)
    tok = engine.tokenizer
    messages = [{"role": "system", "content": system}] if system else []
    try:
        for turn in itertools.count():
            stdout.write("> ")
            stdout.flush()
            line = await asyncio.to_thread(stdin.readline)
            if not line or line.strip() == "/exit":
                break
            if not line.strip():
                continue
            messages.append({"role": "user", "content": line.rstrip("\n")})
            prompt = tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True), False)
            shown = ""
            async for out in engine.generate(prompt, params, f"chat-{turn}"):
                text = out.outputs[0].text
                stdout.write(text[len(shown):])
                stdout.flush()
                shown = text
            stdout.write("\n")
            messages.append({"role": "assistant", "content": shown})
    finally:
        engine.shutdown()
    return 0
