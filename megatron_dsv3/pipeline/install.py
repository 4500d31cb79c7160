"""Make Megatron pick the DualPipe or DualPipeV executor where it picks a pipeline schedule.

Design note
-----------
Megatron-Core has no schedule registry: `megatron.core.pipeline_parallel.schedules.
get_forward_backward_func()` chooses among its three built-ins, the package re-exports it
(`megatron.core.pipeline_parallel.get_forward_backward_func`), and Megatron-LM's
`megatron.training.training` binds that name at import (`from megatron.core.pipeline_parallel
import get_forward_backward_func`). `install("dualpipev")` replaces the function at all three
names with one that returns the registry's executor for it
(`registry.SCHEDULES["dualpipev"].forward_backward_func`) when the pipeline has more than one
rank and otherwise defers to Megatron's; `install("dualpipe")` likewise. `megatron.training.training` is patched only if it is
already imported: if it is imported later, its import binds the already-replaced package name,
so it needs no patch (and installing does not pay for importing Megatron-LM's training stack,
nor need Megatron-LM to be present at all: it is not on PyPI, though some megatron-core wheels
ship it). `uninstall()` puts Megatron's function back at every name that holds ours.
Both are idempotent.

Megatron-LM users: pass `extra_args_provider=add_pipeline_schedule_args` to `pretrain`, and
call `install(args.pipeline_schedule)` before training when it is one of ours
(`registry.OURS`; "1f1b" is Megatron's own).
"""

from __future__ import annotations

import argparse
import sys

from megatron.core import parallel_state
from megatron.core.pipeline_parallel import schedules

from megatron_dsv3.pipeline import registry

_MEGATRON_LM_TRAINING = "megatron.training.training"
_megatron_get_forward_backward_func = schedules.get_forward_backward_func


class _InstalledGetForwardBackwardFunc:
    """Megatron's `get_forward_backward_func` contract; our executor whenever pp_size > 1."""

    def __init__(self, schedule: registry.PipelineSchedule):
        self.schedule = schedule

    def __call__(self, pp_size=None, vp_size=None, schedule_pg_collection=None):
        if isinstance(schedule_pg_collection, schedules.MultiModuleProcessGroupCollection):
            return _megatron_get_forward_backward_func(pp_size, vp_size, schedule_pg_collection)  # cross-grid bridge
        if pp_size is None and vp_size is None:
            pp_size = parallel_state.get_pipeline_model_parallel_world_size()
            vp_size = parallel_state.get_virtual_pipeline_model_parallel_world_size()
        if pp_size <= 1:
            return _megatron_get_forward_backward_func(pp_size, vp_size, schedule_pg_collection)
        if vp_size is not None:
            raise ValueError(
                f"virtual pipeline size {vp_size} with the {self.schedule.name} schedule: its two chunks per rank are "
                f"placed by megatron_dsv3.pipeline.layout.{self.schedule.build_chunks.__name__}, not by Megatron's "
                "interleaving. Fix: leave virtual_pipeline_model_parallel_size / num_layers_per_virtual_pipeline_stage unset."
            )
        return self.schedule.forward_backward_func


def _modules_to_patch() -> list:
    """The modules whose `get_forward_backward_func` name Megatron's callers read."""
    import megatron.core.pipeline_parallel as pipeline_parallel

    modules = [schedules, pipeline_parallel]
    if _MEGATRON_LM_TRAINING in sys.modules:
        modules.append(sys.modules[_MEGATRON_LM_TRAINING])
    return modules


def install(schedule: str) -> None:
    """Make Megatron's `get_forward_backward_func` return `schedule`'s executor when P > 1."""
    if schedule not in registry.OURS:  # (1f1b is Megatron's own; zb1p is simulated only)
        raise ValueError(f"pipeline schedule {schedule!r} is not one this plugin installs; allowed: {registry.OURS}.")
    replacement = _InstalledGetForwardBackwardFunc(registry.SCHEDULES[schedule])
    for module in _modules_to_patch():
        module.get_forward_backward_func = replacement


def uninstall() -> None:
    """Give Megatron its own `get_forward_backward_func` back wherever ours is."""
    for module in _modules_to_patch():
        if isinstance(module.get_forward_backward_func, _InstalledGetForwardBackwardFunc):
            module.get_forward_backward_func = _megatron_get_forward_backward_func


def add_pipeline_schedule_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Megatron-LM `extra_args_provider`: adds `--pipeline-schedule {1f1b,dualpipe,dualpipev}`."""
    group = parser.add_argument_group(title="megatron_dsv3 pipeline schedule")
    group.add_argument(
        "--pipeline-schedule",
        choices=registry.RUNNABLE,
        default=registry.DEFAULT,
        help="1f1b: Megatron's own schedule; dualpipe / dualpipev: DualPipe / DualPipeV (megatron_dsv3.pipeline.install).",
    )
    return parser
