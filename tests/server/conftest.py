"""A real uvicorn server on loopback, in a background thread, over a tiny random model."""

from __future__ import annotations

import dataclasses
import socket
import threading
import time

import httpx
import openai
import pytest
import uvicorn

from tokenmill.config import EngineConfig
from tokenmill.build import build_async_engine
from tokenmill.engine.async_engine import AsyncEngine
from tokenmill.server.app import create_app

MODEL = "tiny"
KEY = "sk-test-key"
# A ChatML-like template over the tiny tokenizer's two special tokens.
CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    def __init__(self, app, make_server=uvicorn.Server):
        self.app = app
        self.port = free_port()
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off",
                                timeout_graceful_shutdown=2)
        self.server = make_server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("server did not start")
            time.sleep(0.01)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, api_key: str = KEY, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, timeout=60, **kw)

    def http(self, api_key: str | None = KEY) -> httpx.Client:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="session")
def tiny_loaded(tiny_models):
    _, loaded = tiny_models("llama")
    tok = dataclasses.replace(loaded.tokenizer, chat_template=CHAT_TEMPLATE)
    return dataclasses.replace(loaded, tokenizer=tok)


def make_engine(loaded, **config) -> AsyncEngine:
    config.setdefault("num_kv_blocks", 64)
    engine = build_async_engine(EngineConfig.from_flat(model=MODEL, **config), loaded)
    engine.start()
    return engine


def wait_pool_whole(engine: AsyncEngine, timeout: float = 5.0) -> None:
    """The pool is whole and the gauges /metrics serves say so: the engine refreshes them on
    every abort too, so an abort that leaves it idle does not leave them stale."""
    kv, stats = engine.engine.kv, engine.stats
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        whole = kv.num_free_blocks == kv.num_blocks and not engine.has_unfinished
        if whole and stats.kv_blocks_used == 0 and stats.num_running == 0 and stats.num_waiting == 0:
            return
        time.sleep(0.01)
    raise AssertionError(f"KV pool not whole: {kv.num_free_blocks}/{kv.num_blocks} free, "
                         f"{len(engine.engine.outputs.groups)} requests left; gauges: {stats}")


@pytest.fixture(scope="session")
def engine(tiny_loaded):
    engine = make_engine(tiny_loaded)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="session")
def server(engine):
    live = LiveServer(create_app({MODEL: engine}, api_keys=[KEY, "sk-other"], max_body_bytes=64 * 1024))
    yield live
    live.stop()


@pytest.fixture(scope="session")
def roomy_server(engine, tmp_path_factory):
    """The shared engine behind a second app whose body limit (1 MiB) lets 200 kB strings and
    large schemas reach validation instead of the 413 at the door; with a data directory, so
    the fuzz tests reach the Batch API's routes too."""
    live = LiveServer(create_app({MODEL: engine}, api_keys=[KEY], max_body_bytes=1024 * 1024,
                                 data_dir=tmp_path_factory.mktemp("batch-data")))
    yield live
    live.stop()


@pytest.fixture(autouse=True)
def pool_whole_after(request):
    yield
    if "engine" in request.fixturenames:
        wait_pool_whole(request.getfixturevalue("engine"))
