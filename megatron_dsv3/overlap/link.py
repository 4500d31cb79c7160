"""The transport of expert-parallel all-to-alls and pipeline sends: torch.distributed as it is,
or through an emulated link; and the clock of the time spent blocked on them.

Design note
-----------
Every expert-parallel all-to-all (overlap/dispatch.py) and every pipeline boundary tensor
(pipeline/comm.py) goes through this module. An all-to-all or a send is issued at once and
asynchronously (`async_op=True`: gloo runs it on its own threads, NCCL on its communication
stream) and returns a `Transfer`; the consumer calls `wait()` when it needs the data, and may
compute something else in between (the FB overlap, overlap/handover.py). A receive is posted
(`irecv`) and waited for (`Receive.wait()`) when its data is needed: pipeline/comm.py posts
each one as soon as the one before it from the same neighbour and stream has been taken.

Emulated link (opt-in, process-wide; every rank of a job must set the same one: `emulate`,
`--emulate-link GBPS,LATENCY_US` in the training CLI and `bench overlap`). GBPS is in 10^9
bytes per second. It models one network port per process, full duplex, shared by all-to-alls
and sends in issue order:
    start = max(issue time, the end of the previous transfer on the port)
    end   = start + bytes / bandwidth;   done = end + latency
An all-to-all's bytes are the larger of what it sends to and receives from the other ranks
(its own rows do not travel); a send's are its tensor's. `Transfer.wait()` returns no earlier
than `done`. A send first carries its `done` time to the receiver (an 8-byte message ahead of
the data, on the same group: one host shares one clock), and the receive returns no earlier
than that. All waiting is sleeping, on whichever thread waits: a transfer in flight uses no
CPU, as a NIC would not, and costs the computing thread only what it waits for at the end.
gloo still makes an all-to-all wait for its last peer to issue, as a real one would.

The clock (`totals()`) keeps, per label ("dispatch", "combine", their backwards, "p2p"):
operations, bytes sent to other ranks, rows sent, bytes on the (emulated) wire, communication
time and time blocked (what callers spent in `wait()`, of transfers and receives). A transfer's
communication time is, emulated, its own time on the link (bytes / bandwidth + latency; not
the time it queued behind another), else from issue to completion as seen by its waiter. The executor reads it around each
action: the timeline's compute versus blocked time (pipeline/dualpipe.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import threading
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

P2P = "p2p"
# What a failed or timed-out transfer's error tells the user to do (here and pipeline/comm.py).
TIMEOUT_FIX = ("Fix: pass --distributed-timeout-minutes N (python -m megatron_dsv3.training: default 10; Megatron-LM: "
               "default 30), or initialize_model_parallel(distributed_timeout_minutes=N) in your own launcher.")


@dataclass(frozen=True)
class LinkSpec:
    """An emulated link: bandwidth in 10^9 bytes per second, latency in microseconds."""

    gbps: float
    latency_us: float

    def __post_init__(self):
        if not self.gbps > 0:
            raise ValueError(f"emulated link bandwidth {self.gbps} GB/s: must be positive. Fix: pass e.g. --emulate-link 0.05,20.")
        if not self.latency_us >= 0:
            raise ValueError(f"emulated link latency {self.latency_us} us: must be >= 0. Fix: pass e.g. --emulate-link 0.05,20.")

    @classmethod
    def parse(cls, text: str) -> LinkSpec:
        """'GBPS,LATENCY_US', e.g. '0.05,20' (50 MB/s, 20 us)."""
        parts = text.split(",")
        try:
            if len(parts) != 2:
                raise ValueError
            gbps, latency_us = float(parts[0]), float(parts[1])
        except ValueError:
            raise ValueError(
                f"--emulate-link {text!r}: expected GBPS,LATENCY_US (10^9 bytes per second, microseconds). "
                "Fix: pass e.g. --emulate-link 0.05,20."
            ) from None
        return cls(gbps, latency_us)

    def transfer_s(self, nbytes: int) -> float:
        return nbytes / (self.gbps * 1e9)


def link_flag(text: str) -> LinkSpec:
    """The argparse type of an `--emulate-link GBPS,LATENCY_US` flag: argparse prints the reason of a bad value."""
    try:
        return LinkSpec.parse(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


@dataclass
class Totals:
    """One label's operations since the process started (or `reset()`)."""

    operations: int = 0
    bytes_sent: int = 0  # to other ranks
    rows_sent: int = 0  # all-to-all rows (token copies) sent to other ranks
    wire_bytes: int = 0  # what an emulated link carries: an all-to-all's larger direction, a send's tensor
    comm_s: float = 0.0  # emulated: bytes / bandwidth + latency (queueing excluded); real: issue to done
    blocked_s: float = 0.0  # callers' time in wait() and in receives


class _Port:
    """The emulated port of this process: transfers occupy it one after another."""

    def __init__(self, spec: LinkSpec):
        self.spec = spec
        self._free_at = 0.0
        self._lock = threading.Lock()

    def done_time(self, nbytes: int, issued: float) -> float:
        with self._lock:
            start = max(issued, self._free_at)
            self._free_at = start + self.spec.transfer_s(nbytes)
            return self._free_at + self.spec.latency_us * 1e-6

    def service_s(self, nbytes: int) -> float:
        """A transfer's own time on the link: bytes / bandwidth + latency, queueing excluded."""
        return self.spec.transfer_s(nbytes) + self.spec.latency_us * 1e-6


_port: _Port | None = None
_totals: dict[str, Totals] = {}
_totals_lock = threading.Lock()


def emulate(spec: LinkSpec | None) -> None:
    """Route every later transfer of this process through an emulated link (None: the real one)."""
    global _port
    _port = _Port(spec) if spec is not None else None


def totals() -> dict[str, Totals]:
    """A copy of the clock, per label."""
    with _totals_lock:
        return {label: dataclasses.replace(t) for label, t in _totals.items()}


def reset() -> None:
    with _totals_lock:
        _totals.clear()


def _add(label: str, operations: int = 0, bytes_sent: int = 0, rows_sent: int = 0, wire_bytes: int = 0,
         comm_s: float = 0.0, blocked_s: float = 0.0) -> None:
    """Count an operation, or a wait, on the clock (once per transfer: kept cheap)."""
    with _totals_lock:
        totals_ = _totals.get(label) or _totals.setdefault(label, Totals())
        totals_.operations += operations
        totals_.bytes_sent += bytes_sent
        totals_.rows_sent += rows_sent
        totals_.wire_bytes += wire_bytes
        totals_.comm_s += comm_s
        totals_.blocked_s += blocked_s


def _sleep_until(moment: float | None) -> None:
    if moment is not None:
        remaining = moment - time.time()
        if remaining > 0:
            time.sleep(remaining)


class Transfer:
    """An issued all-to-all or send; `wait()` returns once its data has arrived (and, on an
    emulated link, no earlier than its modelled `done` time)."""

    def __init__(self, works: list, label: str, what: str, issued: float, done_at: float | None, service_s: float | None, keep=()):
        self._works = works
        self._label = label
        self._what = what
        self._issued = issued
        self._done_at = done_at
        self._service_s = service_s
        self._keep = keep  # tensors that must live until the transfer is done
        self._waited = False

    def is_completed(self) -> bool:
        return all(work.is_completed() for work in self._works) and (self._done_at is None or time.time() >= self._done_at)

    def wait(self) -> None:
        if self._waited:
            return
        entered = time.time()
        already_done = all(work.is_completed() for work in self._works)
        try:
            for work in self._works:
                work.wait()
        except RuntimeError as error:  # torch's DistBackendError is one
            raise RuntimeError(
                f"{self._what} failed: {error}. A peer failed, hangs, or is unreachable (see its own error); one that "
                f"hangs is detected only after the group's timeout. {TIMEOUT_FIX}"
            ) from error
        real_done = entered if already_done else time.time()  # at the latest
        _sleep_until(self._done_at)
        comm = self._service_s if self._service_s is not None else real_done - self._issued
        _add(self._label, comm_s=comm, blocked_s=time.time() - entered)
        self._waited = True
        self._keep = ()


def _rows_to_others(split_sizes: list[int], rank: int) -> int:
    return sum(split_sizes) - split_sizes[rank]


def all_to_all(output: torch.Tensor, input: torch.Tensor, output_split_sizes: list[int], input_split_sizes: list[int],
               group: dist.ProcessGroup, label: str) -> Transfer:
    """`all_to_all_single` of rows (dim 0), issued now; `wait()` before reading `output`."""
    issued = time.time()
    row_bytes = input.element_size() * math.prod(input.shape[1:])
    rank = group.rank()
    rows_out = _rows_to_others(input_split_sizes, rank)
    nbytes = row_bytes * max(rows_out, _rows_to_others(output_split_sizes, rank))
    work = dist.all_to_all_single(output, input, output_split_sizes, input_split_sizes, group=group, async_op=True)
    done_at, service_s = (_port.done_time(nbytes, issued), _port.service_s(nbytes)) if _port is not None else (None, None)
    _add(label, operations=1, bytes_sent=row_bytes * rows_out, rows_sent=rows_out, wire_bytes=nbytes)
    what = f"the expert-parallel all-to-all '{label}' among global ranks {dist.get_process_group_ranks(group)}"
    return Transfer([work], label, what, issued, done_at, service_s, keep=(input, output))


def isend(tensor: torch.Tensor, dst: int, group: dist.ProcessGroup) -> Transfer:
    """Send `tensor` (contiguous) to global rank `dst` over `group`, issued now."""
    issued = time.time()
    works, keep, done_at, service_s = [], [tensor], None, None
    if _port is not None:  # the receiver learns when the data is done arriving (module note)
        done_at, service_s = _port.done_time(tensor.nbytes, issued), _port.service_s(tensor.nbytes)
        stamp = torch.tensor([done_at], dtype=torch.float64, device=tensor.device)
        works.append(dist.isend(stamp, dst=dst, group=group))
        keep.append(stamp)
    works.append(dist.isend(tensor, dst=dst, group=group))
    _add(P2P, operations=1, bytes_sent=tensor.nbytes, wire_bytes=tensor.nbytes)
    return Transfer(works, P2P, f"the pipeline send to global rank {dst}", issued, done_at, service_s, keep=keep)


class Receive:
    """A posted receive (`irecv`); `wait()` returns once the data is in its tensor (on an emulated
    link, no earlier than the `done` time its sender stamped), counting the time blocked."""

    def __init__(self, works: list, stamp: torch.Tensor | None):
        self._works = works
        self._stamp = stamp

    def wait(self) -> None:
        """Raises torch's error unchanged when the transfer fails (the caller names the peers)."""
        entered = time.time()
        for work in self._works:
            work.wait()
        _sleep_until(float(self._stamp) if self._stamp is not None else None)
        _add(P2P, blocked_s=time.time() - entered)


def irecv(tensor: torch.Tensor, src: int, group: dist.ProcessGroup) -> Receive:
    """Post a receive into `tensor` from global rank `src` over `group`; the data may arrive
    while the caller computes. `wait()` before reading `tensor`."""
    stamp, works = None, []
    if _port is not None:  # the sender's stamp travels ahead of the data (module note)
        stamp = torch.empty(1, dtype=torch.float64, device=tensor.device)
        works.append(dist.irecv(stamp, src=src, group=group))
    works.append(dist.irecv(tensor, src=src, group=group))
    return Receive(works, stamp)
