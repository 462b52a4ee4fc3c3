"""Ray Data over tokenmill on a real local Ray: `map_batches` with LLMPredictor on an actor pool
of two, each with its own engine, a few hundred rows in, one result per row out, each the
text the offline LLM gives for that prompt."""

from __future__ import annotations

import os
import tempfile

import pytest

from tests.server.process import write_tiny_checkpoint

ray = pytest.importorskip("ray")

ROWS = 240
MAX_TOKENS = 4


@pytest.mark.slow
def test_map_batches_on_two_actors_answers_each_row_once(tmp_path):
    from tokenmill import LLM, SamplingParams
    from tokenmill.cluster.ray_data import LLMPredictor

    model = str(write_tiny_checkpoint(tmp_path / "tiny"))
    prompts = [f"row {i}: once upon a time" for i in range(ROWS)]
    # A private local cluster (its own temp dir): other Ray users on the machine are left alone.
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=tempfile.mkdtemp(prefix="tm-ray-"), log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.environ.get("PYTHONPATH", "")}})
    try:
        ds = ray.data.from_items([{"id": i, "prompt": p} for i, p in enumerate(prompts)])
        out = ds.map_batches(LLMPredictor, batch_size=32, concurrency=2, num_cpus=1,
                             fn_constructor_kwargs={"model": model, "max_tokens": MAX_TOKENS, "ignore_eos": True,
                                                    "num_threads": 1})
        rows = out.take_all()
    finally:
        ray.shutdown()
    assert sorted(r["id"] for r in rows) == list(range(ROWS))  # each row exactly once
    by_id = {r["id"]: r for r in rows}
    assert all(by_id[i]["prompt"] == p and by_id[i]["num_generated_tokens"] == MAX_TOKENS for i, p in enumerate(prompts))
    # Greedy: the actors answer what the offline LLM answers, row by row.
    sample = [0, 1, ROWS // 2, ROWS - 1]
    expected = LLM(model).generate([prompts[i] for i in sample], SamplingParams(max_tokens=MAX_TOKENS,
                                                                                 ignore_eos=True, temperature=0))
    assert [by_id[i]["generated_text"] for i in sample] == [o.outputs[0].text for o in expected]
