"""Greedy text on the real default model, in its default configuration, does not depend on how
its tokens were computed: with ngram speculation (tokens verified in chunks) or without (decoded
one by one), with the prefix cache on (a shared prefix's KV reused from another request) or off
(prefilled again). Each comparison checks that the other path really ran (drafts accepted,
cached tokens used), so the test cannot pass by never speculating or never hitting."""

from __future__ import annotations

import pytest

from tests.model.real import loaded
from tokenmill.llm import LLM
from tokenmill.sampling import SamplingParams

pytestmark = pytest.mark.slow

PASSAGE = (
    "The old lighthouse keeper climbed the spiral stairs every evening at dusk, carrying a brass lantern "
    "and a thermos of black coffee. From the gallery he watched the fishing boats return, counted them one "
    "by one, and wrote their names in a leather logbook that had belonged to his grandfather. On stormy "
    "nights he stayed awake until dawn, listening to the wind howl against the glass, certain that someone "
    "out there still needed the light."
)
SYSTEM = {"role": "system", "content": "You are a careful assistant. " + PASSAGE}
CONVERSATIONS = [
    [{"role": "user", "content": "Repeat the following passage exactly, word for word:\n\n" + PASSAGE}],
    [SYSTEM, {"role": "user", "content": "Who climbs the stairs, and when?"}],
    [SYSTEM, {"role": "user", "content": "List three objects the keeper carries or uses."}],
]
GREEDY = SamplingParams(temperature=0, max_tokens=96)


def chats(**settings) -> tuple[list, LLM]:
    """Each conversation in turn, on one engine (so later ones may hit what earlier ones cached)."""
    llm = LLM(loaded=loaded("auto"), **settings)
    return [llm.chat(c, GREEDY)[0] for c in CONVERSATIONS], llm


def tokens(outs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outs]


@pytest.fixture(scope="module")
def plain():
    """The default configuration: prefix cache on, no speculation."""
    outs, _ = chats()
    return outs


def first_difference(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


def test_ngram_speculation_keeps_greedy_text(plain):
    spec, llm = chats(speculative_method="ngram", num_speculative_tokens=4)
    assert llm.engine.stats.spec_num_accepted_tokens > 20  # the repeat prompt is ngram's best case
    assert [first_difference(s, p) for s, p in zip(tokens(spec), tokens(plain))] == [None] * len(plain)


def test_prefix_cache_keeps_greedy_text(plain):
    # With the cache on, the third conversation reused the second's system prompt.
    assert plain[2].num_cached_tokens >= 64
    uncached, _ = chats(enable_prefix_caching=False)
    assert all(o.num_cached_tokens == 0 for o in uncached)
    assert [first_difference(u, p) for u, p in zip(tokens(uncached), tokens(plain))] == [None] * len(plain)
