"""overlap/handover.py: two tasks take turns at their hand-over points, one at a time.

The reference is the order the design note promises: the first task runs until its first
hand-over, then the other until its own, and so on; a task that finishes leaves the other
to run alone; an error in either task reaches the caller once both have stopped.
"""

import threading

import pytest

from megatron_dsv3.overlap import handover
from megatron_dsv3.overlap.handover import Interleave


def _task(name: str, steps: int, log: list, running: list):
    def run():
        for step in range(steps):
            running.append(threading.get_ident())
            assert len(running) == 1, "two tasks ran at once"
            log.append(f"{name}{step}")
            running.pop()
            handover.hand_over(f"{name} after {step}")
        return name
    return run


def test_tasks_alternate_at_their_hand_overs_and_the_longer_finishes_alone():
    log, running = [], []
    interleave = Interleave(names=("forward", "backward"))
    results = interleave.run(_task("f", 2, log, running), _task("b", 4, log, running), first=1)
    assert results == ("f", "b")
    assert log == ["b0", "f0", "b1", "f1", "b2", "b3"]
    # hand-overs while both ran (the forward returns only after its last one); then no-ops
    assert interleave.handovers == [("backward", "b after 0"), ("forward", "f after 0"), ("backward", "b after 1"),
                                    ("forward", "f after 1"), ("backward", "b after 2")]


def test_outside_an_interleave_a_hand_over_does_nothing():
    handover.hand_over("nothing to hand over to")


def test_an_error_in_the_side_task_reaches_the_caller_after_the_main_task_finished():
    log = []

    def side():
        handover.hand_over("first")
        raise ValueError("backward failed")

    def main():
        log.append("main ran")
        handover.hand_over("main")
        log.append("main finished")

    with pytest.raises(ValueError, match="backward failed"):
        Interleave(names=("forward", "backward")).run(main, side, first=1)
    assert log == ["main ran", "main finished"]
    handover.hand_over("the interleave is over")  # and no longer active


def test_interleaves_do_not_nest():
    def nested():
        Interleave(names=("a", "b")).run(lambda: None, lambda: None, first=0)

    with pytest.raises(RuntimeError, match="do not nest"):
        Interleave(names=("forward", "backward")).run(nested, lambda: None, first=0)
