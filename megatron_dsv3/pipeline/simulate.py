"""Replay a pipeline order with per-stage costs: its timeline, bubble and activations.

The replay is event-driven, with P2P taking no time: a rank starts its next action as soon
as it is free and the action's inputs exist (the forward of stage s+1 needs the forward of
stage s of the same micro-batch; the backward of stage s needs its own forward and the
backward of stage s+1; a W needs its B). Every computation inside an FB completes when the
FB does.

Definitions, chosen so that the report's table in §3.2.1 is what this replay measures:
  bubble of a rank   makespan of the global batch (first start to last end, over all ranks)
                     minus the time the rank computes. Ranks do unequal work once forwards
                     and backwards overlap (a rank with more FB's computes for less time).
  bubble             the largest bubble of a rank: the pipeline bubble per global batch.
                     1F1B and ZB1P ranks all have the same; in DualPipe(V) the two ranks
                     nearest the turn of the V have it (they run the most FB's, so compute
                     least when F&B < F + B).
  activations        a rank holds one (chunk, microbatch)'s activations from the start of
                     its forward to the end of its backward for inputs (B, BW, or an FB's
                     backward): what W needs (the layer inputs and output gradients) is not
                     counted, as in DualPipe's accounting. Inside an FB the forward's
                     activations count before the backward frees its own. Counts are in
                     chunk activations (one micro-batch through one of the rank's stages);
                     `Placement.activation_unit` converts them to a 1F1B stage's on as many
                     ranks (DualPipeV's stages are half-size: 1/2).

Where the paper's bubble formulas are exactly the replayed bubble (found by sweeping costs
in quarter units on up to 8 ranks; the tests check sample points). The paper's figure draws
forward = backward for inputs = W, which is inside all four:
  1F1B       (P-1)(F+B)           always.
  ZB1P       (P-1)(F+B-2W)        M >= P and W <= min(F, B-W).
  DualPipe   (P/2-1)(F&B+B-3W)    F = B-W and W <= F.
  DualPipeV  (P-1)(F&B+B-3W)      F = B-W and W <= F   (F, B, W of one half-size stage).
Outside these, the replay gives the bubble of the same order, which the formula can miss
(e.g. DualPipeV, P=4, F=1 B=2 W=0 F&B=3: 14, formula 15).
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict, deque
from dataclasses import dataclass

from megatron_dsv3.pipeline import schedule
from megatron_dsv3.pipeline.schedule import Action, Placement


@dataclass(frozen=True)
class Costs:
    """Times of one stage's computations, in one unit: F a forward, B a *full* backward (input
    and weight gradients, as report §3.2.1), W the backward for weights alone (so a backward for
    inputs takes B - W), FB a forward and a full backward overlapped (the paper's F&B)."""

    F: float
    B: float
    W: float
    FB: float

    def __post_init__(self):
        if not (self.F > 0 and self.B >= self.W >= 0 and self.B > 0):
            raise ValueError(f"costs need F > 0 and B >= W >= 0 with B > 0 (a stage that computes nothing has no bubble "
                             f"to compare): got {self}. Fix: pass positive --F and --B")
        if not max(self.F, self.B) <= self.FB <= self.F + self.B:
            raise ValueError(
                f"an overlapped forward and backward takes at least the longer of the two and at most both "
                f"back to back: need max(F, B) = {max(self.F, self.B)} <= FB <= F + B = {self.F + self.B}, got FB={self.FB}"
            )

    def of(self, kind: str) -> float:
        """Time of one action of `kind` (see `schedule.KINDS`)."""
        return {"F": self.F, "B": self.B - self.W, "W": self.W, "BW": self.B, "FB": self.FB}[kind]

    def duration(self, rank: int, action: Action) -> float:
        """Time of `action` on `rank`: every stage costs the same."""
        return self.of(action.kind)


@dataclass(frozen=True)
class MeasuredCosts:
    """Time of each action by where it runs: `seconds[(rank, kind, chunk)]`, an FB keyed by its
    forward chunk (a rank's FBs pair the same two chunks). From recorded steps
    (`from_timelines`): the median over the recorded actions of each key of the time an action
    computed, its wall time less its time blocked on pipeline receives and all-to-alls. So a
    replay with these costs predicts a step of the same chunks with P2P free, stage by stage
    (the embedding and the head make the end stages dearer than the others)."""

    seconds: dict[tuple[int, str, int], float]

    @classmethod
    def from_timelines(cls, timelines: list[Timeline]) -> MeasuredCosts:
        samples: dict[tuple[int, str, int], list[float]] = defaultdict(list)
        for timeline in timelines:
            for r in timeline.records:
                samples[r.rank, r.action.kind, r.action.chunk].append(r.computing)
        return cls({key: statistics.median(values) for key, values in samples.items()})

    def of(self, rank: int, kind: str, chunk: int) -> float:
        try:
            return self.seconds[rank, kind, chunk]
        except KeyError:
            raise ValueError(f"no measured cost for {kind} of chunk {chunk} on rank {rank}: the recorded steps ran no "
                             f"such action (measured: {sorted(self.seconds)}).") from None

    def duration(self, rank: int, action: Action) -> float:
        return self.of(rank, action.kind, action.chunk)


@dataclass(frozen=True)
class TimedAction:
    """One action of a rank and when it ran. A recorded one (`dualpipe.TimelineRecorder`) also
    has, in seconds, the time it spent blocked on expert-parallel all-to-alls (`a2a_blocked`)
    and on pipeline receives (`p2p_blocked`), the communication time of the all-to-alls it
    issued (`a2a_comm`, issue to done), and for an overlapped FB its hand-overs in order, as
    "task: label" (overlap/handover.py)."""

    rank: int
    action: Action
    start: float
    end: float
    a2a_blocked: float = 0.0
    p2p_blocked: float = 0.0
    a2a_comm: float = 0.0
    handovers: tuple[str, ...] = ()

    @property
    def computing(self) -> float:
        """The time it computed: its wall time less its time blocked (all of it, replayed)."""
        return self.end - self.start - self.p2p_blocked - self.a2a_blocked


@dataclass(frozen=True)
class Timeline:
    """Every action of every rank with its start and end: replayed by `simulate` (with its
    costs), or recorded by a real run (`dualpipe.TimelineRecorder`, seconds, costs None)."""

    records: tuple[TimedAction, ...]  # by rank, each rank's in its order
    placement: Placement
    costs: Costs | MeasuredCosts | None

    def of_rank(self, rank: int) -> list[TimedAction]:
        return [record for record in self.records if record.rank == rank]

    def makespan(self) -> float:
        return max(r.end for r in self.records) - min(r.start for r in self.records)

    def rank_bubbles(self) -> list[float]:
        """Per rank: makespan minus the time it computes (a recorded action's time blocked is idle)."""
        makespan = self.makespan()
        return [makespan - sum(r.computing for r in self.of_rank(rank)) for rank in range(self.placement.num_ranks)]

    def bubble(self) -> float:
        """The pipeline bubble per global batch: the largest bubble of a rank."""
        return max(self.rank_bubbles())

    def rank_activation_peaks(self) -> list[int]:
        """Per rank: the most (chunk, microbatch) activations held at once, in chunk activations."""
        peaks = []
        for rank in range(self.placement.num_ranks):
            held = peak = 0
            for record in self.of_rank(rank):
                for kind, _, _ in record.action.computations():
                    held += {"F": 1, "B": -1, "W": 0}[kind]
                    peak = max(peak, held)
            peaks.append(peak)
        return peaks

    def activation_peak(self) -> int:
        return max(self.rank_activation_peaks())


def simulate(order: list[list[Action]], placement: Placement, costs: Costs | MeasuredCosts) -> Timeline:
    """Replay `order` (see the module docstring) with uniform or measured costs; raises
    ValueError if the ranks deadlock."""
    num_stages = placement.num_stages
    ends: dict[tuple[str, int, int, int], float] = {}  # (F | B | W, direction, stage, microbatch) -> end
    waiting: dict[tuple[str, int, int, int], list[int]] = defaultdict(list)  # missing input -> ranks
    clock = [0.0] * placement.num_ranks
    position = [0] * placement.num_ranks
    records: list[list[TimedAction]] = [[] for _ in order]
    runnable = deque(range(placement.num_ranks))
    while runnable:
        rank = runnable.popleft()
        while position[rank] < len(order[rank]):
            action = order[rank][position[rank]]
            produced = [(kind, *placement.stage_of[rank][chunk], microbatch) for kind, chunk, microbatch in action.computations()]
            needed = [key for made in produced for key in _inputs(made, num_stages) if key not in produced]
            missing = next((key for key in needed if key not in ends), None)
            if missing is not None:
                waiting[missing].append(rank)
                break
            start = max([clock[rank]] + [ends[key] for key in needed])
            clock[rank] = start + costs.duration(rank, action)
            records[rank].append(TimedAction(rank, action, start, clock[rank]))
            for key in produced:
                ends[key] = clock[rank]
                runnable.extend(waiting.pop(key, ()))
            position[rank] += 1
    stuck = {rank: str(order[rank][position[rank]]) for rank in range(len(order)) if position[rank] < len(order[rank])}
    if stuck:
        raise ValueError(f"the order deadlocks: each stuck rank's next action is {stuck}")
    return Timeline(tuple(record for rank_records in records for record in rank_records), placement, costs)


def _inputs(computation: tuple[str, int, int, int], num_stages: int) -> list[tuple[str, int, int, int]]:
    """The computations whose results `computation` (kind, direction, stage, microbatch) needs."""
    kind, direction, stage, microbatch = computation
    if kind == "F":
        return [("F", direction, stage - 1, microbatch)] if stage > 0 else []
    if kind == "B":
        inputs = [("F", direction, stage, microbatch)]
        return inputs + ([("B", direction, stage + 1, microbatch)] if stage < num_stages - 1 else [])
    return [("B", direction, stage, microbatch)]


# ----------------------------------------------------------------------------- the paper's table


def bubble_1f1b(num_ranks: int, costs: Costs) -> float:
    return (num_ranks - 1) * (costs.F + costs.B)


def bubble_zb1p(num_ranks: int, costs: Costs) -> float:
    return (num_ranks - 1) * (costs.F + costs.B - 2 * costs.W)


def bubble_dualpipe(num_ranks: int, costs: Costs) -> float:
    """P ranks, P stages per direction: (PP/2 - 1)(F&B + B - 3W) with PP = P."""
    return (num_ranks // 2 - 1) * (costs.FB + costs.B - 3 * costs.W)


def bubble_dualpipev(num_ranks: int, costs: Costs) -> float:
    """P ranks, 2P half-size stages: (PP/2 - 1)(F&B + B - 3W) with PP = 2P."""
    return (num_ranks - 1) * (costs.FB + costs.B - 3 * costs.W)


def always(num_ranks: int, num_microbatches: int, costs: Costs) -> bool:
    return True


def zb1p_formula_holds(num_ranks: int, num_microbatches: int, costs: Costs) -> bool:
    return num_microbatches >= num_ranks and costs.W <= min(costs.F, costs.B - costs.W)


def dualpipe_formula_holds(num_ranks: int, num_microbatches: int, costs: Costs) -> bool:
    return math.isclose(costs.F, costs.B - costs.W) and costs.W <= costs.F


def simulate_schedule(spec, num_ranks: int, num_microbatches: int, costs: Costs | MeasuredCosts) -> Timeline:
    """Build the order of `spec` (a `registry.PipelineSchedule`) on P ranks, check it, and replay it."""
    order = spec.order(num_ranks, num_microbatches)
    placement = spec.placement(num_ranks, num_microbatches)
    schedule.check_order(order, placement)
    return simulate(order, placement, costs)


# ----------------------------------------------------------------------------- plot

_COLORS = {"F": "#f2a93b", "B": "#a8e07a", "W": "#6fb7f0", "BW": "#5cc94a", "FB": "#c9a0dc"}
_BLOCKED = "#d62728"


def plot_timeline(timeline: Timeline, path, title: str = "") -> None:
    """A PNG like the report's Figure 5: one row per rank, a box per action with its
    micro-batch inside (white for chunk 1, black for chunk 0); an FB is a forward box and a
    full-backward box inside one black frame, split by the costs (a recorded timeline has
    none: one F&B box labelled "forward/backward" micro-batch). A recorded action's time
    blocked on communication is a red strip along its bottom, from its start."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    num_ranks = timeline.placement.num_ranks
    makespan = timeline.makespan()
    width = min(max(8.0, len(timeline.records) / num_ranks * 0.25), 40.0)
    figure, axes = plt.subplots(figsize=(width, 0.5 * num_ranks + 1.6))
    costs = timeline.costs if isinstance(timeline.costs, Costs) else None  # an FB split by uniform costs only
    for record in timeline.records:
        y = num_ranks - 1 - record.rank
        if record.action.kind == "FB" and costs is None:
            label = f"{record.action.microbatch}/{record.action.backward_microbatch}"
            parts = [("FB", record.start, record.end, record.action.chunk, label)]
        elif record.action.kind == "FB":
            split = record.start + (record.end - record.start) * costs.F / (costs.F + costs.B)
            parts = [("F", record.start, split, record.action.chunk, record.action.microbatch),
                     ("BW", split, record.end, record.action.backward_chunk, record.action.backward_microbatch)]
        else:
            parts = [(record.action.kind, record.start, record.end, record.action.chunk, record.action.microbatch)]
        for kind, start, end, chunk, microbatch in parts:
            axes.add_patch(Rectangle((start, y), end - start, 1, facecolor=_COLORS[kind], edgecolor="grey", linewidth=0.5))
            axes.text((start + end) / 2, y + 0.5, str(microbatch), ha="center", va="center", fontsize=6,
                      color="white" if chunk == 1 else "black")
        axes.add_patch(Rectangle((record.start, y), record.end - record.start, 1, fill=False, edgecolor="black", linewidth=0.8))
        if record.a2a_blocked + record.p2p_blocked > 0:  # recorded: its time blocked on communication, from its start
            axes.add_patch(Rectangle((record.start, y), record.a2a_blocked + record.p2p_blocked, 0.15, facecolor=_BLOCKED, linewidth=0))
    axes.set_xlim(0, makespan)
    axes.set_ylim(0, num_ranks)
    axes.set_yticks([num_ranks - 0.5 - rank for rank in range(num_ranks)], [f"rank {rank}" for rank in range(num_ranks)])
    axes.set_xlabel("time" if costs is not None else "seconds")
    legend = {"F": "forward", "B": "backward for inputs", "W": "backward for weights", "BW": "full backward"}
    colors = dict(_COLORS)
    if costs is None:
        legend["FB"] = "forward & backward"
        legend["blocked"], colors["blocked"] = "blocked on communication (its length)", _BLOCKED
    axes.legend(handles=[Rectangle((0, 0), 1, 1, facecolor=colors[k], label=v) for k, v in legend.items()],
                loc="upper center", bbox_to_anchor=(0.5, -0.4), ncol=len(legend), fontsize=7, frameon=False)
    axes.set_title(title or f"bubble {timeline.bubble():g}, makespan {timeline.makespan():g}", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
