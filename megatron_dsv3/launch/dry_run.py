"""A dry run: the launch checked as on the report's cluster, without a GPU, a process group or a model.

`as_on_cluster()` makes Megatron's checks see an H800 (Hopper, compute capability 9.0) and
Transformer Engine 2.6 (the oldest with the blockwise FP8 recipe and FP8-aware norm
recompute that the scripts use) where TE is missing, and keeps Megatron's listing of every
argument out of the output; `dry_run(args)` returns the layout as text (`describe`).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os

import torch
from megatron.core import utils as megatron_utils
from packaging.version import Version as PkgVersion

from megatron_dsv3.config import DeepSeekV3Config
from megatron_dsv3.launch.flags import model_config
from megatron_dsv3.launch.layout import PipelineLayout, num_microbatches, pipeline_layout
from megatron_dsv3.pipeline import registry
from megatron_dsv3.specs import HAVE_TE

DRY_RUN_DEVICE_CAPABILITY = (9, 0)
DRY_RUN_TE_VERSION = "2.6.0"


@contextlib.contextmanager
def as_on_cluster():
    """No GPU asked, TE's version assumed where TE is missing, Megatron's listing of every
    argument (rank 0's `validate_args`) kept out of the output."""
    saved = torch.cuda.get_device_capability, megatron_utils._te_version
    torch.cuda.get_device_capability = lambda device=None: DRY_RUN_DEVICE_CAPABILITY
    if not HAVE_TE:
        megatron_utils._te_version = PkgVersion(DRY_RUN_TE_VERSION)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        torch.cuda.get_device_capability, megatron_utils._te_version = saved


def dry_run(args: argparse.Namespace) -> str:
    """The layout of a parsed launch, checked as on the cluster; builds no model."""
    with as_on_cluster():
        config = model_config(args)
        return describe(args, config, pipeline_layout(args, config))


def _nodes(count: float) -> str:
    return f"{count:g} node{'' if count == 1 else 's'}"


def describe(args: argparse.Namespace, config: DeepSeekV3Config, pipeline: PipelineLayout) -> str:
    """The layout as a dry run prints it."""
    world, per_node = args.world_size, int(os.environ.get("LOCAL_WORLD_SIZE", "8"))
    pp, ep, dp = args.pipeline_model_parallel_size, args.expert_model_parallel_size, args.data_parallel_size
    etp = args.expert_tensor_parallel_size or args.tensor_model_parallel_size
    p, layers = pipeline.placement, pipeline.layers
    mirrored = registry.SCHEDULES[args.pipeline_schedule].mirrored  # two directions, each a copy of the model
    lines = [
        f"{config.preset_name}: {world} GPUs = {_nodes(world / per_node)} x {per_node}",
        f"  parallelism  TP {args.tensor_model_parallel_size}, PP {pp}, CP {args.context_parallel_size}, DP {dp}"
        + (" (ZeRO-1: distributed optimizer)" if args.use_distributed_optimizer else ""),
        f"  pipeline     {pp} ranks of {world // pp} GPUs ({_nodes(world // pp / per_node)}); {args.pipeline_schedule}: "
        f"{p.num_stages} stages{' per direction' if mirrored else ''}, {len(p.stage_of[0])} per rank",
    ]
    if config.num_moe_experts:
        dispatcher = config.moe_token_dispatcher_type
        if dispatcher == "flex":
            dispatcher += f" ({args.moe_flex_dispatcher_backend}, {args.moe_flex_dispatcher_num_sms or 'default'} SMs)"
        lines.append(
            f"  experts      {config.num_moe_experts} routed, EP {ep} x ETP {etp}: {config.num_moe_experts // ep} per GPU, "
            f"an EP group spans {_nodes(ep * etp / per_node)}; expert DP {world // pp // (ep * etp)}; {dispatcher} dispatcher"
        )
    lines += [
        f"  batch        {args.global_batch_size} = micro {args.micro_batch_size} x DP {dp} x {num_microbatches(args)} micro-batches",
        f"  layers       {config.num_layers}{f' + {config.mtp_num_layers} MTP' if config.mtp_num_layers else ''}; "
        f"per stage {layers}",
        f"  precision    {'BF16' if args.bf16 else 'FP32'}, FP8 {args.dsv3_fp8}; recompute "
        + (f"{args.recompute_granularity} {' '.join(args.recompute_modules or [])}" if args.recompute_granularity else "none"),
        "  pp rank  its stages: decoder layers (1-based)",
    ]
    first_layer = [sum(layers[:stage]) + 1 for stage in range(len(layers))]
    rows = []
    for chunks in p.stage_of:
        rows.append([])
        for direction, stage in chunks:
            first, last = first_layer[stage], first_layer[stage] + layers[stage] - 1
            cell = f"{f'direction {direction} ' if mirrored else ''}stage {stage}: "
            cell += f"{first}-{last}" if last > first else f"{first}"
            cell += " +embedding" if stage == 0 else ""
            cell += (" +head" + (" +MTP" if config.mtp_num_layers else "")) if stage == len(layers) - 1 else ""
            rows[-1].append(cell)
    width = max(len(cells[0]) for cells in rows) + 3
    for rank, cells in enumerate(rows):
        lines.append(f"  {rank:>7}  " + "".join(f"{cell:<{width}}" for cell in cells).rstrip())
    if not HAVE_TE:
        lines.append(f"  (checked as on compute capability {DRY_RUN_DEVICE_CAPABILITY} with Transformer Engine "
                     f"{DRY_RUN_TE_VERSION}, not installed here)")
    return "\n".join(lines)
