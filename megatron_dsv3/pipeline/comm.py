"""Point-to-point transfers between neighbouring pipeline ranks, for the DualPipeV executor.

Every tensor exchanged is one stage boundary of one micro-batch: shape
(sequence, micro-batch, hidden), known to both sides, so nothing but the data travels.
Sends are non-blocking (`isend`, kept until done); receives block until the data is there,
so a rank waits only for what its next action needs.

Between two neighbours, each direction carries two streams: activations of one chunk and
gradients of the other (e.g. rank r sends rank r+1 its chunk 0 outputs and its chunk 1
input gradients). Each stream is sent and received in micro-batch order, and the two are
told apart by their tag, so a message always meets the receive meant for it.
Tags are honoured by gloo (CPU); NCCL ignores them and matches sends to receives in issue
order, which this executor does not guarantee yet (see dualpipe.py, next steps).

Failures. A receive whose sender has died fails at once (gloo: "Connection closed by
peer"); one whose sender is alive but never sends (stuck, or in its own error handling)
fails after the pipeline group's timeout: gloo's blocking `recv` honours it (measured with
torch 2.14). That timeout is the one the group was created with: Megatron's
`initialize_model_parallel(distributed_timeout_minutes=...)` (Megatron-LM
`--distributed-timeout-minutes`, default 30), not `init_process_group(timeout=...)`, which
only sets the default group's; a launcher wanting a short bound must set the former (and
the latter for the default group's collectives). `recv` re-raises either error naming both
pipeline ranks and the stream (tests/distributed/test_pipeline_failure.py).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

ACTIVATION = 0
GRADIENT = 1
_STREAMS = {ACTIVATION: "an activation", GRADIENT: "a gradient"}


class NeighbourP2P:
    """Sends and receives boundary tensors over `group` (group ranks, not global ones)."""

    def __init__(self, group: dist.ProcessGroup, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device):
        self.group = group
        self.shape = shape
        self.dtype = dtype
        self.device = device
        self._in_flight: list[tuple[dist.Work, torch.Tensor]] = []

    def send(self, tensor: torch.Tensor, to_rank: int, tag: int) -> None:
        if tuple(tensor.shape) != self.shape or tensor.dtype != self.dtype:
            raise ValueError(
                f"sending a {tuple(tensor.shape)} {tensor.dtype} tensor to pipeline rank {to_rank}; the boundary is "
                f"{self.shape} {self.dtype}. Fix: seq_length / micro_batch_size / config.pipeline_dtype must match the data."
            )
        payload = tensor.detach().contiguous()
        work = dist.isend(payload, group=self.group, group_dst=to_rank, tag=tag)
        self._in_flight = [(w, t) for w, t in self._in_flight if not w.is_completed()]
        self._in_flight.append((work, payload))  # the payload must live until sent

    def recv(self, from_rank: int, tag: int) -> torch.Tensor:
        tensor = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        try:
            dist.recv(tensor, group=self.group, group_src=from_rank, tag=tag)
        except RuntimeError as error:  # torch's DistBackendError is one
            raise RuntimeError(
                f"pipeline rank {self.group.rank()}: receiving {_STREAMS[tag]} from pipeline rank {from_rank} failed: "
                f"{error}. That rank failed, hangs, or is unreachable (see its own error); one that hangs is detected "
                "only after the pipeline group's timeout. Fix: set it with initialize_model_parallel("
                "distributed_timeout_minutes=...) (Megatron-LM: --distributed-timeout-minutes; default 30)."
            ) from error
        return tensor

    def wait_all(self) -> None:
        for work, _ in self._in_flight:
            work.wait()
        self._in_flight = []
