"""`--local N`: children get their share of the threads and are restarted when they die."""

import time

from tokenmill.router.local import LocalFleet


def test_children_split_threads_and_are_restarted_when_killed():
    # A bogus model makes each child exit at once after start-up; the supervisor must keep
    # restarting it (with a delay, not a spin) until stopped.
    fleet = LocalFleet(2, ["--model", "/nonexistent.gguf"], threads=4, restart_delay_s=0.2)
    assert [c.threads for c in fleet.children] == [2, 2]
    assert len(set(fleet.urls)) == 2
    fleet.start()
    try:
        first = [c.proc.pid for c in fleet.children]
        fleet.children[0].proc.kill()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and fleet.children[0].restarts == 0:
            time.sleep(0.1)
        assert fleet.children[0].restarts >= 1 and fleet.children[0].proc.pid != first[0]
    finally:
        fleet.stop(timeout=30)
    assert all(c.proc.poll() is not None for c in fleet.children)
