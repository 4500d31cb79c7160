"""Two micro-batches taking turns at their all-to-alls: the overlap of DualPipe's FB step.

Design note
-----------
The report's FB step (§3.2.1, figure 4) runs one micro-batch's forward chunk beside another's
backward chunk, each cut into attention / dispatch / MLP / combine, so that the all-to-all of
one is in flight while the other computes. Megatron's combined 1F1B does it by rebuilding each
layer as schedule-plan nodes and ordering them over two CUDA streams; on a host without a GPU
there are no streams, every operation runs on the calling thread, and gloo's blocking
all-to-all would run inside the node that issued it.

Here the two micro-batches run their own code, unchanged: the forward is Megatron's
`forward_step`, the backward its `backward_step` (autograd over the whole chunk). They are two
tasks on two threads that hold a baton: exactly one runs at any time. The cut points are the
expert-parallel all-to-alls themselves: a task issues one asynchronously
(overlap/dispatch.py), hands the baton to the other task (`hand_over`), and when the baton
comes back waits for its data, most likely there already. So the segments between one
task's all-to-alls alternate with the other's, each exchange in flight during the other's
segment: attention + router, then the experts, forward; the experts' backward, then
attention's, backward. Every other layer (embedding, dense first-k layers, the head and the
MTP block's norms) is computed by its task like any segment.

Because each task runs exactly the operations it runs alone, in the same order, the numbers
are bit for bit those of the forward followed by the backward; only one task touches tensors
at a time, so nothing is shared unsafely. The backward accumulates the gradients, the forward
none. The order of collectives on every process group is the same on every rank: ranks that
exchange (an expert-parallel group) run the same FB with the same hand-over points.

Thread state: the forward runs on the caller's thread (grad mode, autocast, torch function
modes and the CUDA device are the caller's); the backward on a helper thread that takes the
caller's CUDA device and torch function modes. On a GPU, autograd runs the backward on its
device thread; the baton belongs to the task, not the thread, so that thread hands over too.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch

_active: Interleave | None = None


def hand_over(label: str) -> None:
    """Let the other task of the running `Interleave` compute until it hands back, then run
    this task's `before_waiting` work; a no-op outside an Interleave. The caller waits for its
    transfer after it."""
    if _active is not None:
        _active.hand_over(label)


def before_waiting(work: Callable[[], None]) -> None:
    """Have the running task of the active `Interleave` call `work` each time it is about to
    wait for a transfer (work that needs none, such as deferred weight gradients)."""
    _active.before_waiting[_active.holder] = work


class Interleave:
    """Runs `tasks` = (main, side) taking turns: main on the calling thread, side on a helper
    thread, `first` (0 main, 1 side) first. `handovers` lists (task name, label) of every
    hand-over, in order."""

    def __init__(self, names: tuple[str, str]):
        self.names = names
        self.handovers: list[tuple[str, str]] = []
        self.before_waiting: list[Callable[[], None] | None] = [None, None]
        self._turn = threading.Condition()
        self.holder = 0  # the task that runs
        self._running = [True, True]

    def hand_over(self, label: str) -> None:
        with self._turn:
            mine = self.holder
            if self._running[1 - mine]:
                self.handovers.append((self.names[mine], label))
                self.holder = 1 - mine
                self._turn.notify_all()
                self._turn.wait_for(lambda: self.holder == mine)
        if self.before_waiting[mine] is not None:
            self.before_waiting[mine]()

    def _run_task(self, index: int, task: Callable, results: list, errors: list) -> None:
        with self._turn:
            self._turn.wait_for(lambda: self.holder == index)
        try:
            results[index] = task()
        except BaseException as error:  # re-raised by run() on the caller's thread
            errors[index] = error
        finally:
            with self._turn:
                self._running[index] = False
                self.holder = 1 - index
                self._turn.notify_all()

    def run(self, main: Callable, side: Callable, first: int) -> tuple:
        global _active
        if _active is not None:
            raise RuntimeError("an Interleave is already running in this process: FB steps do not nest.")
        results, errors = [None, None], [None, None]
        self.holder = first
        modes = torch.overrides._get_current_function_mode_stack()
        device = torch.cuda.current_device() if torch.cuda.is_available() else None

        def side_thread():
            if device is not None:
                torch.cuda.set_device(device)
            for mode in modes:
                torch._C._push_on_torch_function_stack(mode)
            self._run_task(1, side, results, errors)

        helper = threading.Thread(target=side_thread, name=f"megatron_dsv3 {self.names[1]}", daemon=True)
        _active = self
        try:
            helper.start()
            self._run_task(0, main, results, errors)
            helper.join()
        finally:
            _active = None
        for error in errors:
            if error is not None:
                raise error
        return tuple(results)
