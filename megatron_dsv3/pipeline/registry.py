"""The pipeline schedules: one record per schedule, read by every caller.

A record says everything the rest of the package needs to know about a schedule: how many
micro-batches it can run on how many ranks (`validate`), what each rank computes (`order`,
schedule.py), where the stages live (`stages`, `placement`), how a rank's model chunks are
built (`build_chunks`, layout.py) and which pipeline ranks hold the embedding
(`get_embedding_ranks`), how Megatron-LM's per-rank layer counts become per-stage
counts (`stage_layers`), whether every stage exists twice (`mirrored`), who runs it
(`executor`), and the DeepSeek-V3 report's bubble and activation figures for it (§3.2, the
simulator's reference: simulate.py). The names are the one spelling used by every command
line and API: "1f1b", "zb1p", "dualpipe", "dualpipev".

Who runs a schedule:
  - ours (`executor` set): the two-chunk executor of dualpipe.py; `forward_backward_func`
    is the callable with Megatron's `forward_backward_func` contract (docs/schedule-contract.md);
  - Megatron's own (`megatron_builtin`): 1F1B is what Megatron's `get_forward_backward_func`
    returns for one chunk per rank (no pipelining at P = 1);
  - nobody: ZB1P is simulated only.
Adding a schedule (e.g. ZB-V) is one record here plus its order function in schedule.py.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

from megatron_dsv3.pipeline import dualpipe, layout, schedule, simulate


def _per_rank_layers(rank_layers: list[int]) -> list[int]:
    """One stage per rank (1F1B), or per rank and direction (DualPipe): stage s has rank s's layers."""
    return list(rank_layers)


def _v_split(rank_layers: list[int]) -> list[int]:
    """DualPipeV's 2P stages from each rank's layers: the odd layer on the way down."""
    return [(n + 1) // 2 for n in rank_layers] + [n // 2 for n in reversed(rank_layers)]


@dataclass(frozen=True)
class PipelineSchedule:
    """One pipeline schedule (module note). P = pipeline ranks, M = micro-batches per global batch."""

    name: str
    validate: Callable[[int, int], None]  # (P, M): ValueError with the rule when it cannot run
    order: Callable[[int, int], list[list[schedule.Action]]]  # (P, M) -> order[rank]
    stages: Callable[[int], schedule.StageMap]  # P -> stages[rank][chunk] = (direction, stage)
    placement: Callable[[int, int], schedule.Placement]  # (P, M) -> stages and each direction's micro-batches
    stage_layers: Callable[[list[int]], list[int]]  # Megatron-LM's layers per rank -> layers per stage
    build_chunks: Callable[..., list] | None  # (config, pp_rank, pp_size, layers_per_stage, init_as_single_process);
    #   None: one chunk per rank, as Megatron builds it (specs.gpt_model)
    get_embedding_ranks: Callable[[list[int]], list[int]] | None  # Megatron's embedding-group hook; None: its default
    mirrored: bool  # every stage is held twice (DualPipe's two directions)
    executor: Callable[..., list] | None  # dualpipe.forward_backward(schedule, **megatron_kwargs), or None
    megatron_builtin: bool  # Megatron's own get_forward_backward_func runs it
    # the report's table (§3.2), in P ranks: the simulator's reference
    bubble_formula: Callable[[int, simulate.Costs], float]
    formula_holds: Callable[[int, int, simulate.Costs], bool]  # (P, M, costs): the formula is exact there
    activation_bound: Callable[[int], int]  # P -> chunk activations per rank

    def num_stages(self, num_ranks: int) -> int:
        """Stages per direction on `num_ranks` ranks."""
        return schedule.num_stages(self.stages(num_ranks))

    @property
    def ours(self) -> bool:
        """Run by our two-chunk executor (and built by our chunk builders)."""
        return self.executor is not None

    @functools.cached_property
    def forward_backward_func(self) -> Callable[..., list]:
        """Our executor with Megatron's `forward_backward_func` contract (one object per schedule)."""
        if not self.ours:
            raise ValueError(f"pipeline schedule {self.name!r} has no executor of ours. Fix: use one of {OURS}.")
        return functools.update_wrapper(functools.partial(self.executor, self), self.executor)


SCHEDULES: dict[str, PipelineSchedule] = {
    record.name: record
    for record in (
        PipelineSchedule(
            name="1f1b",
            validate=schedule.validate_one_f_one_b,
            order=schedule.one_f_one_b_order,
            stages=schedule.one_f_one_b_stages,
            placement=schedule.one_f_one_b_placement,
            stage_layers=_per_rank_layers,
            build_chunks=None,
            get_embedding_ranks=None,
            mirrored=False,
            executor=None,
            megatron_builtin=True,
            bubble_formula=simulate.bubble_1f1b,
            formula_holds=simulate.always,
            activation_bound=lambda p: p,
        ),
        PipelineSchedule(
            name="zb1p",
            validate=schedule.validate_one_f_one_b,
            order=schedule.zb1p_order,
            stages=schedule.one_f_one_b_stages,
            placement=schedule.one_f_one_b_placement,
            stage_layers=_per_rank_layers,
            build_chunks=None,
            get_embedding_ranks=None,
            mirrored=False,
            executor=None,
            megatron_builtin=False,
            bubble_formula=simulate.bubble_zb1p,
            formula_holds=simulate.zb1p_formula_holds,
            activation_bound=lambda p: p,
        ),
        PipelineSchedule(
            name="dualpipe",
            validate=schedule.validate_dualpipe,
            order=schedule.dualpipe_order,
            stages=schedule.dualpipe_stages,
            placement=schedule.dualpipe_placement,
            stage_layers=_per_rank_layers,
            build_chunks=layout.dualpipe_chunks,
            get_embedding_ranks=layout.embedding_on_first_rank,
            mirrored=True,
            executor=dualpipe.forward_backward,
            megatron_builtin=False,
            bubble_formula=simulate.bubble_dualpipe,
            formula_holds=simulate.dualpipe_formula_holds,
            activation_bound=lambda p: p + 1,  # PP + 1 with PP = P full-size stages
        ),
        PipelineSchedule(
            name="dualpipev",
            validate=schedule.validate_dualpipev,
            order=schedule.dualpipev_order,
            stages=schedule.dualpipev_stages,
            placement=schedule.dualpipev_placement,
            stage_layers=_v_split,
            build_chunks=layout.dualpipev_chunks,
            get_embedding_ranks=layout.embedding_on_first_rank,
            mirrored=False,
            executor=dualpipe.forward_backward,
            megatron_builtin=False,
            bubble_formula=simulate.bubble_dualpipev,
            formula_holds=simulate.dualpipe_formula_holds,
            activation_bound=lambda p: 2 * p + 1,  # PP + 1 with PP = 2P half-size stages, i.e. P + 1/2 full-size ones
        ),
    )
}
OURS = tuple(name for name, record in SCHEDULES.items() if record.ours)  # two chunks per rank
RUNNABLE = tuple(name for name, record in SCHEDULES.items() if record.ours or record.megatron_builtin)
DEFAULT = "1f1b"


def get(name: str, runnable: bool = False) -> PipelineSchedule:
    """The record of `name`; with `runnable`, only a schedule something can run (not ZB1P)."""
    allowed = RUNNABLE if runnable else tuple(SCHEDULES)
    if name not in allowed:
        simulated_only = " (simulated only: no executor runs it)" if name in SCHEDULES else ""
        raise ValueError(f"pipeline schedule {name!r}{simulated_only}: allowed {allowed}.")
    return SCHEDULES[name]
