"""Point-to-point transfers between neighbouring pipeline ranks, for the two-chunk executors.

Every tensor exchanged is one stage boundary of one micro-batch: shape
(sequence, micro-batch, hidden), known to both sides, so nothing but the data travels.
Sends are non-blocking (`isend`, kept until done). Receives are posted ahead: the executor
announces at the start of a step how many tensors it will take from each (neighbour,
stream) (`expect`), the first of each is posted at once and each next one as soon as the one
before it has been taken, so a boundary tensor travels while the rank computes (gloo moves
a message only once its receive is posted). `recv` waits for the posted one: a rank waits
only for what its next action needs, and at most one receive per (neighbour, stream) is
outstanding, one boundary tensor of memory each. Both go through overlap/link.py, which
counts the time blocked and, with an emulated link, delays the data as the link would.

Between two neighbours, each direction carries two streams: activations of one chunk and
gradients of the other (e.g. rank r sends rank r+1 its chunk 0 outputs and its chunk 1
input gradients). Each stream is sent in micro-batch order and received in the same order,
but the two interleave differently on the two sides (DualPipeV, P=4: rank 0's 7th send to
rank 1 is activation 6, rank 1's 7th receive from rank 0 is gradient 0). NCCL matches a
link's messages in issue order, ignoring tags, and runs a pair of ranks' sends and receives
of one group one after another on one CUDA stream: a receive posted ahead would hold up a
later send to the same neighbour, whose receiver may be waiting for just that send. So every
(stream, direction of travel) has its own process group with the pipeline group's ranks and
timeout (`stream_groups`: up, to a lower pipeline rank, or down): within one, a pair of
ranks only sends one way, both sides agree on the order (tests/unit/test_pipeline_schedule.py
checks every order), and a posted receive waits for nothing but its own message. The groups
are made on first use, by every rank of the world at once (`new_group` is collective over the
default group), which the executors' calls are: all ranks run the step.

Failures. A receive whose sender has died fails at once (gloo: "Connection closed by
peer"); one whose sender is alive but never sends (stuck, or in its own error handling)
fails after the pipeline group's timeout: gloo's wait on a receive honours it (measured with
torch 2.14). That timeout is the one the group was created with: Megatron's
`initialize_model_parallel(distributed_timeout_minutes=...)` (Megatron-LM
`--distributed-timeout-minutes`, default 30), not `init_process_group(timeout=...)`, which
only sets the default group's; a launcher wanting a short bound must set the former (and
the latter for the default group's collectives). `recv` re-raises either error naming both
pipeline ranks and the stream (tests/distributed/test_pipeline_failure.py), and so do a send
and the posting of a receive (gloo fails them at once when the peer's process has exited). A
step that fails with receives posted leaves them in the groups, where they would take a later
step's messages: the process then refuses another step over that pipeline (`abandon`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_dsv3.overlap import link

ACTIVATION = 0
GRADIENT = 1
_STREAMS = {ACTIVATION: "an activation", GRADIENT: "a gradient"}
_DIRECTIONS = (False, True)  # does the message go down, to a higher pipeline rank
_stream_groups: dict[tuple[int, ...], dict[tuple[int, bool], dist.ProcessGroup]] = {}  # pipeline's global ranks -> groups
_abandoned: set[tuple[int, ...]] = set()  # pipelines whose step failed with receives posted (NeighbourP2P.abandon)


def stream_groups(group: dist.ProcessGroup, device: torch.device) -> dict[tuple[int, bool], dist.ProcessGroup]:
    """One process group per (stream, direction of travel: down to a higher rank or not), with
    `group`'s ranks, backend and timeout (module note). The first call is a collective over the
    whole world."""
    ranks = tuple(dist.get_process_group_ranks(group))
    if ranks not in _stream_groups:
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, ranks)
        timeout = group._get_backend(device).options._timeout  # the pipeline group's (module note)
        for pipeline in sorted(set(every)):  # the same new_group calls, in the same order, on every rank
            groups = {(stream, down): dist.new_group(list(pipeline), timeout=timeout, backend=dist.get_backend(group))
                      for stream in _STREAMS for down in _DIRECTIONS}
            if pipeline == ranks:
                _stream_groups[ranks] = groups
    return _stream_groups[ranks]


class NeighbourP2P:
    """Sends and receives boundary tensors to pipeline ranks of `group` (group ranks, not
    global ones), each (stream, direction) over its own group; receives posted ahead (module note)."""

    def __init__(self, group: dist.ProcessGroup, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device):
        self.group = group
        self.shape = shape
        self.dtype = dtype
        self.device = device
        self._global_ranks = dist.get_process_group_ranks(group)
        if tuple(self._global_ranks) in _abandoned:
            raise RuntimeError(
                f"pipeline rank {group.rank()}: an earlier step of this process failed with pipeline receives posted; "
                "their messages would be taken by this step's receives. Fix: restart the job (e.g. from its last checkpoint)."
            )
        self._streams = stream_groups(group, device)
        self._in_flight: list[link.Transfer] = []
        self._to_post: dict[tuple[int, int], int] = {}  # (from rank, stream) -> receives not yet posted
        self._posted: dict[tuple[int, int], tuple[torch.Tensor, link.Receive]] = {}

    def _named(self, error: RuntimeError, doing: str, other: int, stream: int) -> RuntimeError:
        """torch's error of a transfer (a dead peer fails at posting, a hung one at the wait),
        naming both pipeline ranks and the stream."""
        return RuntimeError(
            f"pipeline rank {self.group.rank()}: {doing} {_STREAMS[stream]} {'from' if doing == 'receiving' else 'to'} "
            f"pipeline rank {other} failed: {error}. That rank failed, hangs, or is unreachable (see its own error); "
            f"one that hangs is detected only after the pipeline group's timeout. {link.TIMEOUT_FIX}"
        )

    def expect(self, receives: dict[tuple[int, int], int]) -> None:
        """The step's receives, as counts per (from rank, stream); posts the first of each."""
        self._to_post = {key: count for key, count in receives.items() if count > 0}
        for key in list(self._to_post):
            self._post(key)

    def _post(self, key: tuple[int, int]) -> None:
        if not self._to_post.get(key):
            self._to_post.pop(key, None)
            return
        self._to_post[key] -= 1
        from_rank, stream = key
        tensor = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        group = self._streams[stream, self.group.rank() > from_rank]
        try:
            self._posted[key] = (tensor, link.irecv(tensor, src=self._global_ranks[from_rank], group=group))
        except RuntimeError as error:  # torch's DistBackendError is one
            raise self._named(error, "receiving", from_rank, stream) from error

    def send(self, tensor: torch.Tensor, to_rank: int, stream: int) -> None:
        if tuple(tensor.shape) != self.shape or tensor.dtype != self.dtype:
            raise ValueError(
                f"sending a {tuple(tensor.shape)} {tensor.dtype} tensor to pipeline rank {to_rank}; the boundary is "
                f"{self.shape} {self.dtype}. Fix: seq_length / micro_batch_size / config.pipeline_dtype must match the data."
            )
        self._in_flight = [t for t in self._in_flight if not t.is_completed()]  # any order: their payloads go
        group = self._streams[stream, to_rank > self.group.rank()]
        try:  # the transfer holds the payload until it is sent
            self._in_flight.append(link.isend(tensor.detach().contiguous(), dst=self._global_ranks[to_rank], group=group))
        except RuntimeError as error:
            raise self._named(error, "sending", to_rank, stream) from error

    def recv(self, from_rank: int, stream: int) -> torch.Tensor:
        """The next tensor of `stream` from `from_rank` (announced by `expect`), once it is here."""
        key = (from_rank, stream)
        if key not in self._posted:
            raise RuntimeError(f"pipeline rank {self.group.rank()}: receiving {_STREAMS[stream]} from pipeline rank "
                               f"{from_rank} that the step did not announce (expect): the executor's count is wrong.")
        tensor, receive = self._posted.pop(key)
        try:
            receive.wait()
        except RuntimeError as error:
            raise self._named(error, "receiving", from_rank, stream) from error
        self._post(key)
        return tensor

    def wait_all(self) -> None:
        """The end of a step: every send done, every announced receive taken."""
        for transfer in self._in_flight:
            transfer.wait()
        self._in_flight = []
        left = sorted(set(self._to_post) | set(self._posted))
        if left:
            raise RuntimeError(f"pipeline rank {self.group.rank()}: the step ended with receives announced but not taken: "
                               + ", ".join(f"{_STREAMS[stream]} from pipeline rank {rank}" for rank, stream in left))

    def abandon(self) -> None:
        """A step failed: receives it posted would take the messages of a later step's, so this
        process runs no more steps over this pipeline (a later NeighbourP2P refuses, naming the fix)."""
        if self._posted:
            _abandoned.add(tuple(self._global_ranks))
