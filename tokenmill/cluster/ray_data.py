"""tokenmill over a Ray Data dataset: `map_batches` with one offline LLM per actor.

    import ray
    from tokenmill.cluster.ray_data import LLMPredictor

    ds = ray.data.read_json("prompts.jsonl")            # rows with a "prompt" column
    out = ds.map_batches(LLMPredictor, fn_constructor_kwargs={"model": "smollm2", "max_tokens": 64},
                         concurrency=2, batch_size=64)   # an actor pool: two actors, two engines
    out.write_json("results/")

Each actor builds its LLM once (the model loads once per actor, not per batch) and runs every
block it is given through LLM.generate, which batches the block's rows in the engine. Ray
handles the rest: splitting the dataset, scheduling blocks on actors across the cluster,
retrying a lost actor's blocks, streaming results to the sink.
"""

from __future__ import annotations

import numpy as np

from tokenmill.llm import LLM
from tokenmill.sampling import SamplingParams


class LLMPredictor:
    """A callable class for `Dataset.map_batches`: rows with `prompt_column` (text) in, the
    same rows with `generated_text` and `num_generated_tokens` out.

    `max_tokens`, `temperature`, `seed`, `ignore_eos`: the sampling of every row; `settings`:
    any EngineConfig setting by its flat name (max_num_seqs=64, num_threads=2, ...)."""

    def __init__(self, model: str = "smollm2", prompt_column: str = "prompt", max_tokens: int = 64,
                 temperature: float = 0.0, seed: int | None = None, ignore_eos: bool = False, **settings):
        self.llm = LLM(model, **settings)
        self.prompt_column = prompt_column
        self.params = SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed, ignore_eos=ignore_eos)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        prompts = [str(p) for p in batch[self.prompt_column]]
        outputs = self.llm.generate(prompts, self.params)
        return {**batch,
                "generated_text": np.array([o.outputs[0].text for o in outputs], dtype=object),
                "num_generated_tokens": np.array([len(o.outputs[0].token_ids) for o in outputs], dtype=np.int64)}
