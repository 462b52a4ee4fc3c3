"""CoreTurns: a waiting engine gets the next turn before a busy one asking again; an engine
alone never waits. turn_units: the encoder's batches cut into bounded turns."""

from __future__ import annotations

import threading

from tokenmill.engine.async_embedder import turn_units
from tokenmill.engine.core_turns import CoreTurns


def test_a_waiting_engine_goes_before_a_busy_one_asking_again():
    turns = CoreTurns()
    order: list[str] = []
    holding, other_waits = threading.Event(), threading.Event()

    def busy():  # an LLM stepping nonstop: asks again as soon as its turn ends
        for step in range(3):
            with turns.turn():
                order.append(f"llm{step}")
                if step == 0:
                    holding.set()
                    # until the encoder has asked: then it must come next, before llm1
                    while turns.waiting == 0:
                        pass

    def encoder():
        holding.wait(10)
        with turns.turn():
            order.append("enc")

    threads = [threading.Thread(target=busy), threading.Thread(target=encoder)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert order == ["llm0", "enc", "llm1", "llm2"]
    assert turns.waiting == 0


def test_alone_no_wait_and_disabled_is_a_no_op():
    turns = CoreTurns()
    for _ in range(1000):
        with turns.turn():
            pass
    assert turns.waiting == 0
    turns.enabled = False
    with turns.turn(), turns.turn():  # nested: would deadlock if it took a ticket
        pass


def test_turn_units_bound_the_tokens_and_never_split_an_input():
    assert turn_units([100] * 5, 250) == [(0, 2), (2, 4), (4, 5)]
    assert turn_units([300, 10, 10], 250) == [(0, 1), (1, 3)]  # a long input is a unit of its own
    assert turn_units([], 250) == []
    lengths = [7, 130, 64, 1, 250, 99, 3]
    units = turn_units(lengths, 256)
    assert [i for a, b in units for i in range(a, b)] == list(range(len(lengths)))
    assert all(sum(lengths[a:b]) <= 256 or b - a == 1 for a, b in units)
