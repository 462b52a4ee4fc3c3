"""Structured output in the engine, on the default model (SmolLM2-135M-Instruct, bf16)."""

from __future__ import annotations

import json
import re
import time

import jsonschema
import pytest

from tokenmill.sampling import SamplingParams, StructuredOutput

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 10}, "minItems": 1, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 20}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "role", "tags", "address"],
    "additionalProperties": False,
}


def chat_prompt(llm, text: str) -> list[int]:
    tok = llm.tokenizer
    return tok.encode(tok.apply_chat_template([{"role": "user", "content": text}]), False)


def _schema_runs(llm, n: int) -> None:
    prompt = chat_prompt(llm, "Describe a user of our website as JSON.")
    params = [SamplingParams(max_tokens=150, temperature=0.8, seed=s, structured=StructuredOutput(json=SCHEMA))
              for s in range(n)]
    outs = llm.generate([prompt] * n, params)
    for o in outs:
        c = o.outputs[0]
        assert c.finish_reason == "stop", c.text
        value = json.loads(c.text)
        jsonschema.validate(value, SCHEMA)
        assert list(value) == list(SCHEMA["properties"])  # the schema's key order


def test_json_schema_8(llm):
    _schema_runs(llm, 8)


@pytest.mark.slow
def test_json_schema_50(llm):
    _schema_runs(llm, 50)


def test_regex_and_choice(llm):
    date = r"(19|20)\d{2}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])"
    choices = ["red", "green", "blue", "dark purple"]
    prompts, params = [], []
    for s in range(6):
        prompts.append(chat_prompt(llm, "When was the last time you went out?"))
        params.append(SamplingParams(max_tokens=20, temperature=1.0, seed=s, structured=StructuredOutput(regex=date)))
        prompts.append(chat_prompt(llm, "Name a color."))
        params.append(SamplingParams(max_tokens=20, temperature=1.0, seed=s, structured=StructuredOutput(choice=choices)))
    outs = llm.generate(prompts, params)
    for k, o in enumerate(outs):
        c = o.outputs[0]
        assert c.finish_reason == "stop"
        if k % 2 == 0:
            assert re.fullmatch(date, c.text), c.text
        else:
            assert c.text in choices


def test_grammar_and_json_object_and_n(llm):
    lark = 'start: "The answer is " NUM "."\nNUM: /[0-9]{1,3}/'
    out = llm.generate("Question: 6*7?", SamplingParams(n=3, max_tokens=20, temperature=1.0, seed=3,
                                                         structured=StructuredOutput(grammar=lark)))[0]
    for c in out.outputs:
        assert re.fullmatch(r"The answer is [0-9]{1,3}\.", c.text) and c.finish_reason == "stop"
    out = llm.generate(chat_prompt(llm, "Give me a JSON object."),
                       SamplingParams(max_tokens=60, temperature=0.7, seed=1,
                                      structured=StructuredOutput(json_object=True)))[0].outputs[0]
    if out.finish_reason == "stop":
        assert isinstance(json.loads(out.text), dict)
    else:
        assert out.finish_reason == "length" and out.text.startswith("{")


@pytest.mark.parametrize("spec, words", [
    (StructuredOutput(regex="a(b"), ["regex", "unclosed group"]),
    (StructuredOutput(json={"type": "nope"}), ["JSON schema", "nope"]),
    (StructuredOutput(json={"type": "object", "properties": {"a": {"minLength": "x"}}}), ["JSON schema"]),
    (StructuredOutput(grammar="start: foo"), ["grammar", "foo"]),
])
def test_invalid_constraint_is_value_error(llm, spec, words):
    with pytest.raises(ValueError) as e:
        llm.generate("hi", SamplingParams(structured=spec))
    assert all(w in str(e.value) for w in words), str(e.value)
    assert not llm.engine.has_unfinished
    # Once compiled (and cached), the engine itself refuses it without waiting for anything.
    with pytest.raises(ValueError):
        llm.engine.add_request("bad", "hi", SamplingParams(structured=spec))
    assert not llm.engine.has_unfinished


def test_structured_output_validation():
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutput()
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutput(regex="a", choice=["a"])
    with pytest.raises(ValueError, match="not valid JSON"):
        StructuredOutput(json="{nope")
    with pytest.raises(ValueError, match="choice"):
        StructuredOutput(choice=[])


def test_unconstrained_rows_token_identical(llm):
    """Free requests sharing a batch with constrained ones get exactly the tokens they get alone."""
    free = [("The history of Rome", SamplingParams(max_tokens=24, temperature=0)),
            ("Once upon a time", SamplingParams(max_tokens=24, temperature=0.9, seed=11)),
            ("def fib(n):", SamplingParams(max_tokens=24, temperature=1.0, top_p=0.9, seed=5))]
    alone = [o.outputs[0].token_ids for o in llm.generate([p for p, _ in free], [s for _, s in free])]
    constrained = [SamplingParams(max_tokens=40, temperature=0.8, seed=s, structured=StructuredOutput(json=SCHEMA))
                   for s in range(3)]
    prompts = [p for p, _ in free] + ["User JSON:"] * 3
    mixed = llm.generate(prompts, [s for _, s in free] + constrained)
    assert [o.outputs[0].token_ids for o in mixed[:3]] == alone


def test_eos_allowed_once_grammar_accepts(llm):
    from tokenmill.structured.compiler import allocate_bitmask

    compiler = llm.engine.grammars
    eos = llm.tokenizer.eos_token_ids[0]
    m = compiler.matcher(compiler.compile(StructuredOutput(regex=r"[0-9]+")))
    tok = llm.tokenizer
    bitmask = allocate_bitmask(1, compiler.vocab_size)
    m.fill_bitmask(bitmask, 0)
    assert not (int(bitmask[0, eos // 32]) >> (eos % 32)) & 1  # nothing yet: no EOS
    for t in tok.encode("42", False):
        assert m.advance(t)
    m.fill_bitmask(bitmask, 0)
    assert (int(bitmask[0, eos // 32]) >> (eos % 32)) & 1  # complete: EOS allowed, more digits too
    assert m.is_accepting and not m.is_stopped
    # A complete JSON object: the grammar is at its end, EOS is allowed and the engine stops there.
    m = compiler.matcher(compiler.compile(StructuredOutput(json={"type": "object", "properties": {"a": {"type": "integer"}},
                                                                 "required": ["a"], "additionalProperties": False})))
    for t in tok.encode('{"a": 7}', False):
        assert m.advance(t)
    m.fill_bitmask(bitmask, 0)
    assert (int(bitmask[0, eos // 32]) >> (eos % 32)) & 1
    assert m.is_accepting


def test_compile_in_background_then_admitted(llm, monkeypatch):
    engine = llm.engine
    slow_compile = engine.grammars._compile

    def compile_later(spec):
        time.sleep(0.2)
        return slow_compile(spec)

    monkeypatch.setattr(engine.grammars, "_compile", compile_later)
    fut_schema = {"type": "object", "properties": {"k": {"type": "string", "enum": ["x", "y"]}}, "required": ["k"],
                  "additionalProperties": False}
    engine.add_request("bg", "JSON:", SamplingParams(max_tokens=20, temperature=0,
                                                     structured=StructuredOutput(json=fut_schema)))
    engine.add_request("bgbad", "JSON:", SamplingParams(structured=StructuredOutput(regex="(unclosed")))
    done = {}
    while engine.has_unfinished:
        for o in engine.step():
            if o.finished:
                done[o.request_id] = o
    assert json.loads(done["bg"].outputs[0].text)["k"] in ("x", "y")
    bad = done["bgbad"].outputs[0]
    assert bad.finish_reason == "abort" and "regex" in bad.stop_reason


def test_compile_cache(llm):
    compiler = llm.engine.grammars
    spec = StructuredOutput(json={"type": "object", "properties": {"z": {"type": "boolean"}}})
    a = compiler.compile(spec)
    before = compiler.num_compiled
    assert compiler.compile(StructuredOutput(json=json.dumps(spec.json))) is a
    assert compiler.num_compiled == before


def test_client_gone_mid_compile_does_not_poison_the_cache(llm, monkeypatch):
    """A request cancelled while its grammar compiles must not cancel the compile that the
    cache shares with every later request for the same constraint."""
    import asyncio

    from tokenmill.engine.async_engine import AsyncEngine

    compiler = llm.engine.grammars
    slow_compile = compiler._compile

    def compile_later(spec):
        time.sleep(0.3)
        return slow_compile(spec)

    monkeypatch.setattr(compiler, "_compile", compile_later)
    engine = AsyncEngine(llm.engine)  # check_structured needs no engine thread
    spec = StructuredOutput(regex=r"[a-c]{3}x")

    async def main():
        # Two other compiles take the pool's threads, so this one waits in its queue: the only
        # state in which cancelling an awaiter could cancel the shared future itself.
        for other in ("[d-f]{3}x", "[g-i]{3}x"):
            compiler.submit(StructuredOutput(regex=other))
        task = asyncio.create_task(engine.check_structured(spec))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await engine.check_structured(spec)  # the shared compile finishes for the next caller

    asyncio.run(main())
    assert not compiler.submit(spec).cancelled()
