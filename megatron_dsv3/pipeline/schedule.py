"""Pipeline schedules as orders: for each rank, the actions it performs in one global batch.

Design note
-----------
An *order* is `list[list[Action]]`: `order[rank]` is what that rank computes, in sequence,
during one global batch. It says nothing about time: a rank runs its next action as soon as
the inputs that action needs have arrived (`simulate.py` replays an order with costs;
`dualpipe.py` runs it with real Megatron model chunks and P2P).

Placement. A *direction* is one pipeline of `num_stages` stages that micro-batches go
through, forward from stage 0 to the last stage (where the loss is), backward in reverse.
A rank holds one or two *chunks*; `Placement.stage_of[rank][chunk] = (direction, stage)`.
With P = `pipeline_model_parallel_size` ranks:
  1F1B, ZB1P  one direction of P stages; rank r holds stage r as chunk 0.
  DualPipeV   one direction of 2P half-size stages in a V: rank r holds stage r as chunk 0
              (the way down) and stage 2P-1-r as chunk 1 (the way up); the loss is on rank
              0 after chunk 1, and rank P-1 turns the V (its chunk 0 feeds its chunk 1).
  DualPipe    two directions of P stages, each its own copy of the model: rank r holds
              stage r of direction 0 as chunk 0 and stage P-1-r of direction 1 as chunk 1.
              Micro-batches 0..M/2-1 enter direction 0 on rank 0, M/2..M-1 enter
              direction 1 on rank P-1.

Actions (`Action.kind`):
  F   forward of (chunk, microbatch).
  B   backward for inputs only (zero-bubble split): sends the input gradient on; the
      weight gradient is deferred to a later W.
  W   backward for weights of an earlier B of (chunk, microbatch).
  BW  full backward: B and W fused, nothing deferred.
  FB  one forward, of (chunk, microbatch), overlapped with one full backward, of
      (backward_chunk, backward_microbatch): two micro-batches, so the all-to-all of one
      hides behind the compute of the other (report §3.2.1). An executor that cannot
      overlap runs the forward, then the backward.
Every (chunk, microbatch) of a rank gets one F, one backward (B, BW or the backward of an
FB) and one weight gradient (W after its B, or inside BW / FB); `check_order` checks it.
A rank runs its deferred W's first in, first out (DualPipe's WeightGradStore).

Set-ups each schedule can run (checked before anything is built, ValueError with the rule):
  1F1B, ZB1P  P >= 1, M >= 1.
  DualPipeV   P >= 1, M >= 2P - 1: the main step runs M - 2P + r + 1 times on rank r.
  DualPipe    P even, M even (half enter each direction), M >= 2P - 2: each direction's
              M/2 micro-batches run as a DualPipeV on P/2 ranks (see below).
The public DualPipe / DualPipeV ask for M >= 2P; one fewer (two for DualPipe) already gives
every rank all its steps, a valid order and the paper's bubble.

DualPipe's figure (report §3.2.1, public deepseek-ai/DualPipe) is eight named steps per rank,
written below as `_nF0` .. `_nW`; "0" is the rank's chunk on the way down the V, "1" its
chunk on the way up. DualPipeV is DualPipe cut in half; conversely, ranks r and P-1-r of
DualPipe both run the steps of rank min(r, P-1-r) of a DualPipeV on P/2 ranks with M/2
micro-batches per chunk, the way down being direction 0 for r < P/2 and direction 1 for
r >= P/2 (the V turns between the two middle ranks). Both are built by `_dual_steps`.
DualPipe's losses are on rank P-1 (direction 0) and rank 0 (direction 1).

How the executor runs an order, and the placements in full: docs/pipeline.md.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

KINDS = ("F", "B", "W", "BW", "FB")


@dataclass(frozen=True)
class Action:
    """One step of a rank's order; `backward_*` is set for FB (its overlapped backward) only."""

    kind: str
    chunk: int
    microbatch: int
    backward_chunk: int | None = None
    backward_microbatch: int | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"Action kind {self.kind!r} is not one of {KINDS}")
        has_backward = self.backward_chunk is not None and self.backward_microbatch is not None
        if (self.kind == "FB") != has_backward:
            raise ValueError(f"backward_chunk and backward_microbatch are set for FB and only FB: {self}")

    def computations(self) -> tuple[tuple[str, int, int], ...]:
        """The (F | B | W, chunk, microbatch) computations inside, in the order they complete:
        BW is a B and its W; FB is an F and a B and W."""
        if self.kind == "FB":
            backward = (self.backward_chunk, self.backward_microbatch)
            return (("F", self.chunk, self.microbatch), ("B", *backward), ("W", *backward))
        if self.kind == "BW":
            return (("B", self.chunk, self.microbatch), ("W", self.chunk, self.microbatch))
        return ((self.kind, self.chunk, self.microbatch),)

    def __str__(self) -> str:
        if self.kind == "FB":
            return f"F{self.chunk}.{self.microbatch}&B{self.backward_chunk}.{self.backward_microbatch}"
        return f"{self.kind}{self.chunk}.{self.microbatch}"


@dataclass(frozen=True)
class Placement:
    """Where stages live: `stage_of[rank][chunk] = (direction, stage)`; `microbatches[direction]`
    are the micro-batch ids fed into that direction, in feed order."""

    stage_of: tuple[tuple[tuple[int, int], ...], ...]
    microbatches: tuple[tuple[int, ...], ...]

    @property
    def num_ranks(self) -> int:
        return len(self.stage_of)

    @property
    def num_stages(self) -> int:
        """Stages per direction."""
        return num_stages(self.stage_of)

    @property
    def parameter_multiplier(self) -> float:
        """Parameters per rank over those of a 1F1B rank with the same model on as many ranks.

        A stage holds 1/num_stages of the model; each direction is a whole copy of it."""
        return len(self.stage_of[0]) * self.num_ranks / self.num_stages

    @property
    def activation_unit(self) -> float:
        """One stage's activations (one micro-batch) in units of a 1F1B stage's on as many ranks."""
        return self.num_ranks / self.num_stages

    def microbatches_of(self, rank: int, chunk: int) -> tuple[int, ...]:
        return self.microbatches[self.stage_of[rank][chunk][0]]


# ----------------------------------------------------------------------------- validation


def _check_positive(name: str, value: int) -> None:
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def validate_one_f_one_b(num_stages: int, num_microbatches: int) -> None:
    """1F1B and ZB1P: any number of stages >= 1 and of micro-batches >= 1."""
    _check_positive("num_stages", num_stages)
    _check_positive("num_microbatches", num_microbatches)


def validate_dualpipev(num_ranks: int, num_microbatches: int) -> None:
    """DualPipeV: num_ranks >= 1 and num_microbatches >= 2 * num_ranks - 1.

    The main step nF0B1F1B0 runs M - 2P + r + 1 times on rank r, so rank 0 needs
    M >= 2P - 1 (the public DualPipeV asks for M >= 2P, one more than needed)."""
    _check_positive("num_ranks", num_ranks)
    _check_positive("num_microbatches", num_microbatches)
    if num_microbatches < 2 * num_ranks - 1:
        raise ValueError(
            f"DualPipeV needs num_microbatches >= 2 * num_ranks - 1 (its main step runs M - 2P + 1 times "
            f"on rank 0): got num_microbatches={num_microbatches}, num_ranks={num_ranks}"
        )


def validate_dualpipe(num_ranks: int, num_microbatches: int) -> None:
    """DualPipe: an even num_ranks >= 2 and an even num_microbatches >= 2 * num_ranks - 2.

    Each direction gets M/2 micro-batches and runs as a DualPipeV on P/2 ranks, which needs
    M/2 >= 2 * (P/2) - 1 (the public DualPipe asks for M >= 2P)."""
    _check_dualpipe_ranks(num_ranks)
    _check_positive("num_microbatches", num_microbatches)
    if num_microbatches % 2:
        raise ValueError(
            f"DualPipe needs an even number of micro-batches (half enter each direction): got num_microbatches={num_microbatches}"
        )
    if num_microbatches < 2 * num_ranks - 2:
        raise ValueError(
            f"DualPipe needs num_microbatches >= 2 * num_ranks - 2 (M/2 per direction, each a DualPipeV on P/2 ranks): "
            f"got num_microbatches={num_microbatches}, num_ranks={num_ranks}"
        )


def _check_dualpipe_ranks(num_ranks: int) -> None:
    _check_positive("num_ranks", num_ranks)
    if num_ranks % 2:
        raise ValueError(
            f"DualPipe needs an even number of ranks (two directions meet in the middle): got num_ranks={num_ranks}. "
            "Fix: use an even pipeline size (--pp / pipeline_model_parallel_size), or DualPipeV."
        )


# ----------------------------------------------------------------------------- placements


# A rank's stages: `stages[rank][chunk] = (direction, stage)`, as `Placement.stage_of`.
StageMap = tuple[tuple[tuple[int, int], ...], ...]


def num_stages(stage_map: StageMap) -> int:
    """Stages per direction of a stage map."""
    return 1 + max(stage for chunks in stage_map for _, stage in chunks)


def one_f_one_b_stages(num_ranks: int) -> StageMap:
    """1F1B and ZB1P: rank r holds stage r."""
    _check_positive("num_stages", num_ranks)
    return tuple(((0, r),) for r in range(num_ranks))


def dualpipev_stages(num_ranks: int) -> StageMap:
    """2P stages in a V: rank r holds stage r (chunk 0) and stage 2P-1-r (chunk 1)."""
    _check_positive("num_ranks", num_ranks)
    return tuple(((0, r), (0, 2 * num_ranks - 1 - r)) for r in range(num_ranks))


def dualpipe_stages(num_ranks: int) -> StageMap:
    """Two directions of P stages: rank r holds stage r of direction 0 and stage P-1-r of direction 1."""
    _check_dualpipe_ranks(num_ranks)
    return tuple(((0, r), (1, num_ranks - 1 - r)) for r in range(num_ranks))


def one_f_one_b_placement(num_stages: int, num_microbatches: int) -> Placement:
    """1F1B and ZB1P: rank r holds stage r; one direction takes every micro-batch."""
    validate_one_f_one_b(num_stages, num_microbatches)
    return Placement(stage_of=one_f_one_b_stages(num_stages), microbatches=(tuple(range(num_microbatches)),))


def dualpipev_placement(num_ranks: int, num_microbatches: int) -> Placement:
    """The V of `dualpipev_stages`; one direction takes every micro-batch."""
    validate_dualpipev(num_ranks, num_microbatches)
    return Placement(stage_of=dualpipev_stages(num_ranks), microbatches=(tuple(range(num_microbatches)),))


def dualpipe_placement(num_ranks: int, num_microbatches: int) -> Placement:
    """The two directions of `dualpipe_stages`; the first half of the micro-batches enters
    direction 0, the second half direction 1."""
    validate_dualpipe(num_ranks, num_microbatches)
    half = num_microbatches // 2
    return Placement(stage_of=dualpipe_stages(num_ranks), microbatches=(tuple(range(half)), tuple(range(half, num_microbatches))))


# ----------------------------------------------------------------------------- building orders


class _RankOrder:
    """One rank's actions as they are appended; hands out each chunk's micro-batches in feed
    order and queues the B's whose W is deferred (first in, first out)."""

    def __init__(self, microbatches_of_chunk: tuple[tuple[int, ...], ...]):
        self.actions: list[Action] = []
        self._microbatches = microbatches_of_chunk
        self._forwarded = [0] * len(microbatches_of_chunk)
        self._backwarded = [0] * len(microbatches_of_chunk)
        self._deferred_w: deque[tuple[int, int]] = deque()

    def _next_forward(self, chunk: int) -> int:
        self._forwarded[chunk] += 1
        return self._microbatches[chunk][self._forwarded[chunk] - 1]

    def _next_backward(self, chunk: int) -> int:
        self._backwarded[chunk] += 1
        return self._microbatches[chunk][self._backwarded[chunk] - 1]

    def forward(self, chunk: int) -> None:
        self.actions.append(Action("F", chunk, self._next_forward(chunk)))

    def backward(self, chunk: int, defer_w: bool = False) -> None:
        microbatch = self._next_backward(chunk)
        if defer_w:
            self._deferred_w.append((chunk, microbatch))
        self.actions.append(Action("B" if defer_w else "BW", chunk, microbatch))

    @property
    def num_deferred_w(self) -> int:
        return len(self._deferred_w)

    def weight(self) -> None:
        self.actions.append(Action("W", *self._deferred_w.popleft()))

    def forward_backward(self, forward_chunk: int, backward_chunk: int) -> None:
        forward_microbatch = self._next_forward(forward_chunk)
        self.actions.append(Action("FB", forward_chunk, forward_microbatch, backward_chunk, self._next_backward(backward_chunk)))


def one_f_one_b_order(num_stages: int, num_microbatches: int) -> list[list[Action]]:
    """1F1B: rank r runs P-1-r warm-up forwards, then a forward and a full backward in turn,
    then the remaining backwards."""
    validate_one_f_one_b(num_stages, num_microbatches)
    return [_one_f_one_b_rank(num_stages, num_microbatches, rank, zero_bubble=False) for rank in range(num_stages)]


def zb1p_order(num_stages: int, num_microbatches: int) -> list[list[Action]]:
    """ZB1P (zero-bubble ZB-H1): 1F1B with backwards for inputs only; rank r runs the W of a
    micro-batch r backwards later, so the W's of the last ranks fill their cool-down, and
    the ones still deferred at the end. Activations are those of 1F1B."""
    validate_one_f_one_b(num_stages, num_microbatches)
    return [_one_f_one_b_rank(num_stages, num_microbatches, rank, zero_bubble=True) for rank in range(num_stages)]


def _one_f_one_b_rank(num_stages: int, num_microbatches: int, rank: int, zero_bubble: bool) -> list[Action]:
    order = _RankOrder((tuple(range(num_microbatches)),))
    warmup = min(num_stages - 1 - rank, num_microbatches)
    for _ in range(warmup):
        order.forward(0)
    for i in range(num_microbatches):
        if warmup + i < num_microbatches:
            order.forward(0)
        order.backward(0, defer_w=zero_bubble)
        if zero_bubble and i >= rank:
            order.weight()
    _nW(order, order.num_deferred_w)
    return order.actions


def dualpipev_order(num_ranks: int, num_microbatches: int) -> list[list[Action]]:
    """DualPipeV on P ranks, 2P stages (see the design note); M >= 2P - 1."""
    validate_dualpipev(num_ranks, num_microbatches)
    orders = []
    for rank in range(num_ranks):
        order = _RankOrder((tuple(range(num_microbatches)),) * 2)
        _dual_steps(order, num_ranks, rank, num_microbatches, down=0, up=1)
        orders.append(order.actions)
    return orders


def dualpipe_order(num_ranks: int, num_microbatches: int) -> list[list[Action]]:
    """DualPipe on P ranks, two directions of P stages (see the design note); P even, M even,
    M >= 2P - 2."""
    validate_dualpipe(num_ranks, num_microbatches)
    placement = dualpipe_placement(num_ranks, num_microbatches)
    half_ranks = num_ranks // 2
    orders = []
    for rank in range(num_ranks):
        order = _RankOrder(tuple(placement.microbatches_of(rank, chunk) for chunk in (0, 1)))
        down, up = (0, 1) if rank < half_ranks else (1, 0)
        _dual_steps(order, half_ranks, min(rank, num_ranks - 1 - rank), num_microbatches // 2, down, up)
        orders.append(order.actions)
    return orders


def _dual_steps(order: _RankOrder, num_ranks: int, rank: int, num_microbatches: int, down: int, up: int) -> None:
    """DualPipe's eight steps for `rank` of a V of `num_ranks` ranks with `num_microbatches`
    micro-batches per chunk; `down` / `up` are the rank's chunks on the way down / up."""
    below = num_ranks - 1 - rank  # ranks further down the V
    _nF0(order, 2 * below, down)
    _nF0F1(order, rank + 1, down, up)
    _nB1W1F1(order, below, up)
    _nF0B1F1B0(order, num_microbatches - 2 * num_ranks + rank + 1, down, up, turns_the_v=below == 0)
    _nB1F1B0(order, below, down, up)
    _nB1B0(order, rank + 1, down, up)
    _nWB0(order, below, down)
    _nW(order, rank + 1)


def _nF0(order: _RankOrder, n: int, down: int) -> None:
    """Warm-up: n forwards on the way down."""
    for _ in range(n):
        order.forward(down)


def _nF0F1(order: _RankOrder, n: int, down: int, up: int) -> None:
    """n pairs: a forward down, a forward up."""
    for _ in range(n):
        order.forward(down)
        order.forward(up)


def _nB1W1F1(order: _RankOrder, n: int, up: int) -> None:
    """n times: a backward up for inputs only, its W right after, a forward up."""
    for _ in range(n):
        order.backward(up, defer_w=True)
        order.weight()
        order.forward(up)


def _nF0B1F1B0(order: _RankOrder, n: int, down: int, up: int, turns_the_v: bool) -> None:
    """Main step, n times: forward down & backward up overlapped, then forward up & backward
    down overlapped. Where the V turns, the first pair runs apart, as in DualPipe's figure
    and code ("to further reduce bubble size"): the forward need not wait for the
    backward's gradient."""
    for i in range(n):
        if i == 0 and turns_the_v:
            order.forward(down)
            order.backward(up)
        else:
            order.forward_backward(down, up)
        order.forward_backward(up, down)


def _nB1F1B0(order: _RankOrder, n: int, down: int, up: int) -> None:
    """n times: a full backward up, then forward up & backward down overlapped."""
    for _ in range(n):
        order.backward(up)
        order.forward_backward(up, down)


def _nB1B0(order: _RankOrder, n: int, down: int, up: int) -> None:
    """n pairs: a backward up, a backward down; the last n of these 2n backwards defer their W."""
    for i in range(2 * n):
        order.backward(up if i % 2 == 0 else down, defer_w=i >= n)


def _nWB0(order: _RankOrder, n: int, down: int) -> None:
    """n times: the oldest deferred W, then a backward down for inputs only."""
    for _ in range(n):
        order.weight()
        order.backward(down, defer_w=True)


def _nW(order: _RankOrder, n: int) -> None:
    """The n W's still deferred."""
    for _ in range(n):
        order.weight()


# ----------------------------------------------------------------------------- checking


def check_order(order: list[list[Action]], placement: Placement) -> None:
    """Raise ValueError unless every rank, for each of its (chunk, microbatch), runs exactly one
    forward, one backward (B, BW or an FB's) after it and one weight gradient (W after its B, or
    inside BW / FB), and no other micro-batch; and, where a rank holds two stages of one
    direction (DualPipeV), the lower stage's forward comes first and its backward last.

    Cross-rank deadlock-freedom is what `simulate.simulate` checks by replaying the order."""
    if len(order) != placement.num_ranks:
        raise ValueError(f"order has {len(order)} ranks, the placement {placement.num_ranks}")
    for rank, actions in enumerate(order):
        done: dict[tuple[str, int, int], int] = {}  # (F | B | W, chunk, microbatch) -> position
        for position, action in enumerate(actions):
            for kind, chunk, microbatch in action.computations():
                if not 0 <= chunk < len(placement.stage_of[rank]):
                    raise ValueError(f"rank {rank}: {action} names chunk {chunk}, which the rank does not hold")
                if microbatch not in placement.microbatches_of(rank, chunk):
                    raise ValueError(f"rank {rank}: {action} runs micro-batch {microbatch}, not fed to chunk {chunk}")
                if (kind, chunk, microbatch) in done:
                    raise ValueError(f"rank {rank}: {action} repeats the {kind} of chunk {chunk}, micro-batch {microbatch}")
                needed = {"F": None, "B": "F", "W": "B"}[kind]
                if needed and (needed, chunk, microbatch) not in done:
                    raise ValueError(f"rank {rank}: {action} comes before the {needed} of chunk {chunk}, micro-batch {microbatch}")
                done[kind, chunk, microbatch] = position
        for chunk in range(len(placement.stage_of[rank])):
            for microbatch in placement.microbatches_of(rank, chunk):
                missing = [part for part in "FBW" if (part, chunk, microbatch) not in done]
                if missing:
                    raise ValueError(f"rank {rank}: chunk {chunk}, micro-batch {microbatch} has no {'/'.join(missing)}")
        _check_stages_of_one_direction(rank, placement, done)


def _check_stages_of_one_direction(rank: int, placement: Placement, done: dict[tuple[str, int, int], int]) -> None:
    """Two stages of one direction on a rank: the lower one's forward first, its backward last."""
    chunks = placement.stage_of[rank]
    for lower in range(len(chunks)):
        for upper in range(len(chunks)):
            (direction, stage), (other_direction, other_stage) = chunks[lower], chunks[upper]
            if direction != other_direction or stage >= other_stage:
                continue
            for microbatch in placement.microbatches_of(rank, lower):
                if done["F", lower, microbatch] > done["F", upper, microbatch]:
                    raise ValueError(f"rank {rank}: micro-batch {microbatch} runs stage {other_stage} forward before stage {stage}")
                if done["B", lower, microbatch] < done["B", upper, microbatch]:
                    raise ValueError(f"rank {rank}: micro-batch {microbatch} runs stage {stage} backward before stage {other_stage}")
