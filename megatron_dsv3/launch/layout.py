"""The parallel layout of a Megatron-LM launch: its checks, and where stages and layers go.

`check_parallelism` rejects, naming the flags, what Megatron's `validate_args` would reject
tersely or not at all. The rules that are the model's or the schedule's run through their own
validators (config.validate_parallelism, weight_grad.check_deferrable, the schedule record's
placement, pipeline.layout.check_layers_per_stage); this module adds only the rules of the
launch itself (world size, nodes, global batch) and names the flag.

Design note: layers per pipeline stage
--------------------------------------
Megatron-LM gives each of the P pipeline ranks its decoder layers: an even split, or
`--decoder-first-pipeline-num-layers` / `--decoder-last-pipeline-num-layers` for the first and
last rank and an even split of the rest (Megatron validates these and `get_num_layers_to_build`
reads them). The schedule's record turns them into per-stage counts (`stage_layers`,
pipeline/registry.py): 1F1B and DualPipe give stage s rank s's layers (a DualPipe rank holds
both directions' copies of its stage); DualPipeV splits rank r's layers over its two stages,
the odd one on the way down (stage r). So DeepSeek-V3's 61 layers on PP16 with first 2 and
last 3 (Megatron: 2 + 14 x 4 + 3) are, in the V, one layer on stages 0, 16 and 31 and two on
the other 29: rank 0, which also holds the embedding, the output head and the MTP block, has
two decoder layers; rank 15 has three.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from types import SimpleNamespace

from megatron.core.transformer.transformer_block import get_num_layers_to_build

from megatron_dsv3.config import ConfigError, DeepSeekV3Config, validate_parallelism
from megatron_dsv3.launch.errors import LaunchError, require
from megatron_dsv3.launch.flags import FLAG_OF_FIELD
from megatron_dsv3.pipeline import layout, registry, schedule
from megatron_dsv3.weight_grad import check_deferrable

# Megatron-LM flags that lay layers out some other way than the module note says.
OTHER_LAYOUT_FLAGS = {
    "pipeline_model_parallel_layout": "--pipeline-model-parallel-layout",
    "num_layers_per_virtual_pipeline_stage": "--num-layers-per-virtual-pipeline-stage",
    "num_virtual_stages_per_pipeline_rank": "--num-virtual-stages-per-pipeline-rank",
    "account_for_embedding_in_pipeline_split": "--account-for-embedding-in-pipeline-split",
    "account_for_loss_in_pipeline_split": "--account-for-loss-in-pipeline-split",
}


def flagged(error: ConfigError, context: str = "") -> LaunchError:
    """A config rule broken by the command line: the rule's message, led by the flag that sets the field."""
    return LaunchError(f"{context}{FLAG_OF_FIELD.get(error.field_name, error.field_name)}: {error}")


def check_parallelism(args: argparse.Namespace) -> None:
    """What Megatron's `validate_args` would reject tersely (or not at all), naming the flags."""
    tp, pp, cp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.context_parallel_size
    ep, etp = args.expert_model_parallel_size, args.expert_tensor_parallel_size or tp
    world = args.world_size
    require(
        cp == 1,
        f"--context-parallel-size={cp}: examples/pretrain_dsv3.py gives every rank whole sequences (the report "
        "uses no context parallelism, §3.2)",
        "use 1",
    )
    require(
        world % (tp * pp * cp) == 0,
        f"WORLD_SIZE={world} is not divisible by --tensor-model-parallel-size={tp} x "
        f"--pipeline-model-parallel-size={pp} x --context-parallel-size={cp}",
        "change the node count or the pipeline size",
    )
    if args.num_attention_heads is not None:  # else Megatron's validate_args says it is missing
        try:  # the config's own rules, on the parsed flags (field names, as the config reads them)
            validate_parallelism(SimpleNamespace(
                tensor_model_parallel_size=tp, num_attention_heads=args.num_attention_heads,
                num_moe_experts=args.num_experts, expert_model_parallel_size=ep,
                fb_overlap=args.dsv3_fb_overlap, moe_token_dispatcher_type=args.moe_token_dispatcher_type,
            ))
        except ConfigError as error:
            raise flagged(error) from None
    if args.num_experts:
        require(
            (world // pp) % (ep * etp) == 0,
            f"--expert-model-parallel-size={ep} x --expert-tensor-parallel-size={etp} does not divide the "
            f"{world // pp} GPUs of a pipeline stage (WORLD_SIZE={world} / --pipeline-model-parallel-size={pp})",
            "choose EP x ETP dividing the GPUs of a stage",
        )
    if args.global_batch_size and args.micro_batch_size:  # else Megatron's validate_args says
        dp = world // (tp * pp * cp)
        require(
            args.global_batch_size % (args.micro_batch_size * dp) == 0,
            f"--global-batch-size={args.global_batch_size} is not divisible by --micro-batch-size={args.micro_batch_size} "
            f"x data-parallel size {dp} (WORLD_SIZE / (TP x PP x CP))",
            f"use a multiple of {args.micro_batch_size * dp}",
        )
        placement(args, args.global_batch_size // (args.micro_batch_size * dp))
    if registry.SCHEDULES[args.pipeline_schedule].ours:
        try:
            check_deferrable(args)  # Megatron-LM's args carry the config's field name
        except ConfigError as error:
            raise flagged(error, f"--pipeline-schedule={args.pipeline_schedule} needs ") from None
    else:
        require(
            not args.dsv3_fb_overlap,
            f"--dsv3-fb-overlap with --pipeline-schedule={args.pipeline_schedule}: FB steps are DualPipe's and DualPipeV's",
            f"pass --pipeline-schedule one of {registry.OURS}, or drop --dsv3-fb-overlap",
        )
    for name, flag in OTHER_LAYOUT_FLAGS.items():
        require(
            not getattr(args, name),
            f"{flag}={getattr(args, name)}: layers are laid out per pipeline rank by --decoder-first-pipeline-num-layers / "
            "--decoder-last-pipeline-num-layers (megatron_dsv3.launch.layout)",
            f"drop {flag}",
        )


def num_microbatches(args: argparse.Namespace) -> int:
    return args.global_batch_size // (args.micro_batch_size * args.data_parallel_size)


def stage_layers(args: argparse.Namespace, config: DeepSeekV3Config) -> list[int]:
    """Decoder layers of each pipeline stage under `--pipeline-schedule` (module note)."""
    pp = args.pipeline_model_parallel_size
    rank_layers = [get_num_layers_to_build(config, pp_rank=r) for r in range(pp)]
    record = registry.SCHEDULES[args.pipeline_schedule]
    counts = record.stage_layers(rank_layers)
    if record.ours:
        try:
            layout.check_layers_per_stage(config.num_layers, len(counts), counts)
        except ValueError as error:
            raise LaunchError(
                f"--pipeline-schedule={args.pipeline_schedule} with --pipeline-model-parallel-size={pp} and layers per "
                f"rank {rank_layers} gives stages of {counts} layers: {error} Fix: give every stage a layer through "
                "--num-layers, --decoder-first-pipeline-num-layers and --decoder-last-pipeline-num-layers."
            ) from None
    return counts


@dataclass(frozen=True)
class PipelineLayout:
    placement: schedule.Placement  # stage_of[rank][chunk] = (direction, stage)
    layers: list[int]  # decoder layers of each stage of one direction


def placement(args: argparse.Namespace, microbatches: int) -> schedule.Placement:
    """The stages of `--pipeline-schedule` on the pipeline ranks, for `microbatches` a step."""
    pp = args.pipeline_model_parallel_size
    try:
        return registry.SCHEDULES[args.pipeline_schedule].placement(pp, microbatches)
    except ValueError as error:
        raise LaunchError(
            f"--pipeline-schedule={args.pipeline_schedule} with --pipeline-model-parallel-size={pp} and {microbatches} "
            f"micro-batches (--global-batch-size / (--micro-batch-size x data-parallel size)): {error}. Fix: change the "
            "global batch or the micro-batch size."
        ) from None


def pipeline_layout(args: argparse.Namespace, config: DeepSeekV3Config) -> PipelineLayout:
    """Where each stage and its layers live."""
    return PipelineLayout(placement(args, num_microbatches(args)), stage_layers(args, config))
