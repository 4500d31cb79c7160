"""Launch DeepSeek-V3 runs through Megatron-LM: presets as flags, our extra flags, layout checks.

Used by `examples/pretrain_dsv3.py`, and through its `--dry-run` by `examples/slurm/*.sbatch`:
  - `expand_argv` puts the Megatron-LM flags of `--dsv3-preset` (the table `PRESET_FLAGS`) and
    of `--dsv3-fp8 te` before the command line's own, so a later flag overrides a preset's;
  - `add_args` is the extra-args provider: `--pipeline-schedule` (`pipeline.install`) and ours;
  - `parse_args` runs Megatron-LM's own parser, then `check_parallelism` (errors name the flags
    and the fix), then Megatron's `validate_args`;
  - `model_config` is the `DeepSeekV3Config` of the parsed flags (validated when built);
  - `pipeline_layout` places the decoder layers on pipeline stages and ranks;
  - `dry_run` does all of it as on the paper's cluster, without a GPU or a model, and returns
    the layout as text (`describe`).

Design note: layers per pipeline stage
--------------------------------------
Megatron-LM gives each of the P pipeline ranks its decoder layers: an even split, or
`--decoder-first-pipeline-num-layers` / `--decoder-last-pipeline-num-layers` for the first and
last rank and an even split of the rest (Megatron validates these and `get_num_layers_to_build`
reads them). The schedule then places stages on ranks (`pipeline.schedule` placements):
  default    P stages, stage r on rank r: stage r has rank r's layers;
  dualpipe   P stages in each of two directions, rank r holds stage r of one and stage P-1-r
             of the other: stage s has rank s's layers (a rank holds both directions' copies);
  dualpipev  2P stages in a V, rank r holds stage r and stage 2P-1-r: rank r's layers are split
             over its two stages, the odd one on the way down (stage r).
So DeepSeek-V3's 61 layers on PP16 with first 2 and last 3 (Megatron: 2 + 14 x 4 + 3) are, in
the V, one layer on stages 0, 16 and 31 and two on the other 29: rank 0, which also holds the
embedding, the output head and the MTP block, has two decoder layers; rank 15 has three.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import os
import re
from dataclasses import dataclass

import torch
from megatron.core import utils as megatron_utils
from megatron.core.transformer.transformer_block import get_num_layers_to_build
from megatron.core.transformer.transformer_config import MLATransformerConfig
from megatron.training.arguments import core_transformer_config_from_args, validate_args
from megatron.training.arguments import parse_args as megatron_parse_args
from packaging.version import Version as PkgVersion

from megatron_dsv3.config import PRESETS, DeepSeekV3Config, StepSchedule, preset
from megatron_dsv3.pipeline import install, layout, schedule
from megatron_dsv3.specs import HAVE_TE


class LaunchError(ValueError):
    """A launch that cannot work: names the flags, their values and the fix."""


def _require(ok: bool, message: str, fix: str) -> None:
    if not ok:
        raise LaunchError(f"{message}. Fix: {fix}.")


# --- Presets as Megatron-LM flags ------------------------------------------------------------

# DeepSeekV3Config field -> the Megatron-LM flag(s) taking its value.
PRESET_FLAGS = {
    "num_layers": ("--num-layers",),
    "hidden_size": ("--hidden-size",),
    "ffn_hidden_size": ("--ffn-hidden-size",),
    "num_attention_heads": ("--num-attention-heads",),
    "normalization": ("--normalization",),
    "layernorm_epsilon": ("--norm-epsilon",),
    "rope_type": ("--rope-type",),
    "rotary_base": ("--rotary-base",),
    "attention_dropout": ("--attention-dropout",),
    "hidden_dropout": ("--hidden-dropout",),
    "init_method_std": ("--init-method-std",),
    "q_lora_rank": ("--q-lora-rank",),
    "kv_lora_rank": ("--kv-lora-rank",),
    "qk_head_dim": ("--qk-head-dim",),
    "qk_pos_emb_head_dim": ("--qk-pos-emb-head-dim",),
    "v_head_dim": ("--v-head-dim",),
    "num_moe_experts": ("--num-experts",),
    "moe_layer_freq": ("--moe-layer-freq",),
    "moe_ffn_hidden_size": ("--moe-ffn-hidden-size",),
    "moe_shared_expert_intermediate_size": ("--moe-shared-expert-intermediate-size",),
    "moe_router_topk": ("--moe-router-topk",),
    "moe_router_num_groups": ("--moe-router-num-groups",),
    "moe_router_group_topk": ("--moe-router-group-topk",),
    "moe_router_score_function": ("--moe-router-score-function",),
    "moe_router_bias_update_rate": ("--moe-router-bias-update-rate",),
    "moe_router_load_balancing_type": ("--moe-router-load-balancing-type",),
    "moe_aux_loss_coeff": ("--moe-aux-loss-coeff",),
    "moe_router_topk_scaling_factor": ("--moe-router-topk-scaling-factor",),
    "moe_router_dtype": ("--moe-router-dtype",),
    "moe_token_dispatcher_type": ("--moe-token-dispatcher-type",),
    "mtp_num_layers": ("--mtp-num-layers",),
    "mtp_loss_scaling_factor": ("--mtp-loss-scaling-factor",),
    "transformer_impl": ("--transformer-impl",),
    "seq_length": ("--seq-length", "--max-position-embeddings"),
    "vocab_size": ("--padded-vocab-size",),  # the embedding's rows, whatever the tokenizer
    "bias_update_rate_schedule": ("--dsv3-gamma-schedule",),
    "mtp_loss_scaling_schedule": ("--dsv3-lambda-schedule",),
    "fp8_blockwise": ("--dsv3-fp8",),  # a preset's own FP8 (tiny-fp8: emulate); "te" needs --dsv3-fp8 te given
}
# Bool fields Megatron-LM spells as a switch: (switch, the value the switch means). The
# field's other value is Megatron-LM's default, and gives no flag.
PRESET_SWITCHES = {
    "qk_layernorm": ("--qk-layernorm", True),
    "moe_router_pre_softmax": ("--moe-router-pre-softmax", True),
    "moe_router_enable_expert_bias": ("--moe-router-enable-expert-bias", True),
    "moe_grouped_gemm": ("--moe-grouped-gemm", True),
    "use_cpu_initialization": ("--use-cpu-initialization", True),
    "attention_softmax_in_fp32": ("--attention-softmax-in-fp32", True),
    "bf16": ("--bf16", True),
    "gated_linear_unit": ("--swiglu", True),  # --swiglu also sets activation_func=silu
    "add_bias_linear": ("--disable-bias-linear", False),
    "share_embeddings_and_output_weights": ("--untie-embeddings-and-output-weights", False),
}
# Preset fields that follow from another flag above.
PRESET_IMPLIED = {"activation_func": "--swiglu", "params_dtype": "--bf16"}
# What our specs build, whatever the preset: MLA, with MLA's own RoPE, unfused (the config's
# default; Megatron-LM's fuses, which MLA allows with YaRN only).
MODEL_FLAGS = ("--multi-latent-attention", "--position-embedding-type", "rope", "--no-rope-fusion")
# By the preset's transformer_impl: without Apex, the local backend's norms and linears have no
# fused kernels (Megatron-LM's defaults ask for them); TE brings its own.
BACKEND_FLAGS = {
    "local": ("--no-persist-layer-norm", "--no-gradient-accumulation-fusion"),
    "transformer_engine": (),
}


def _flag_value(value) -> str:
    if isinstance(value, StepSchedule):
        return ",".join(f"{start!r}:{v!r}" for start, v in value.steps)
    if isinstance(value, list):
        return "[" + ",".join(map(str, value)) + "]"
    return str(value)


def preset_argv(name: str) -> list[str]:
    """The Megatron-LM flags of preset `name`: its config's values (the preset's row of
    PRESETS, and DeepSeekV3Config's defaults for the rest) of every field in the tables."""
    _require(name in PRESETS, f"--dsv3-preset={name}: no such preset", f"use one of {sorted(PRESETS)}")
    unmapped = set(PRESETS[name]) - set(PRESET_FLAGS) - set(PRESET_SWITCHES) - set(PRESET_IMPLIED)
    _require(not unmapped, f"--dsv3-preset={name}: fields {sorted(unmapped)} have no Megatron-LM flag", "add them to megatron_dsv3.launch.PRESET_FLAGS")
    config = preset(name)
    argv = [*MODEL_FLAGS, *BACKEND_FLAGS[config.transformer_impl]]
    for field_name, flags in PRESET_FLAGS.items():
        value = getattr(config, field_name)
        if value is not None:
            for flag in flags:
                argv += [flag, _flag_value(value)]
    for field_name, (switch, meaning) in PRESET_SWITCHES.items():
        if getattr(config, field_name) == meaning:
            argv.append(switch)
    return argv


# --dsv3-fp8 -> (DeepSeekV3Config.fp8_blockwise, Megatron-LM flags). "te" is TE's
# Float8BlockScaling recipe; the others are our FP8 Linear on the local backend (config.py).
FP8_CHOICES = {
    "none": (None, ()),
    "te": ("te", ("--fp8-format", "e4m3", "--fp8-recipe", "blockwise")),
    "emulate": ("emulate", ()),
    "scaled_mm": ("scaled_mm", ()),
    "auto": ("auto", ()),
}


def expand_argv(argv: list[str]) -> list[str]:
    """`argv` with the flags of its `--dsv3-preset` and `--dsv3-fp8` put before it."""
    early = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    early.add_argument("--dsv3-preset")
    early.add_argument("--dsv3-fp8", choices=FP8_CHOICES, default="none")
    known, _ = early.parse_known_args(argv)
    prefix = preset_argv(known.dsv3_preset) if known.dsv3_preset else []
    return prefix + list(FP8_CHOICES[known.dsv3_fp8][1]) + list(argv)


def step_schedule(text: str) -> StepSchedule | None:
    """`START:VALUE,START:VALUE,...` (START a fraction of the run's tokens) or `none`."""
    if text == "none":
        return None
    try:
        return StepSchedule(tuple((float(start), float(value)) for start, value in (item.split(":") for item in text.split(","))))
    except ValueError as error:  # also StepSchedule's ConfigError
        raise argparse.ArgumentTypeError(f"{text!r}: expected 'none' or START:VALUE,... such as '0:0.3,0.6757:0.1' ({error})")


# A '%' that starts no format: argparse reads help texts as %-formats, and Megatron-LM 0.19.2
# has one such text (--moe-paged-stash-buffer-size-factor-cuda: "10%)"), which breaks --help.
_BARE_PERCENT = re.compile(r"(?<!%)%(?![(%])")


def add_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Megatron-LM `extra_args_provider`: `--pipeline-schedule` and the `--dsv3-*` flags."""
    for action in parser._actions:
        if action.help:
            action.help = _BARE_PERCENT.sub("%%", action.help)
    install.add_pipeline_schedule_args(parser)
    group = parser.add_argument_group(title="megatron_dsv3")
    group.add_argument("--dsv3-preset", choices=sorted(PRESETS), default=None,
                       help="Fill the model flags from megatron_dsv3.config.PRESETS; later flags override them.")
    group.add_argument("--dsv3-fp8", choices=tuple(FP8_CHOICES), default="none",
                       help="Blockwise FP8 (PAPER §5): te = TE's Float8BlockScaling (adds --fp8-format e4m3 "
                            "--fp8-recipe blockwise); emulate / scaled_mm / auto = our FP8 Linear (local backend).")
    group.add_argument("--dsv3-gamma-schedule", type=step_schedule, default=None, metavar="START:VALUE,...|none",
                       help="Bias update speed gamma by the fraction of the run's tokens consumed, set every step "
                            "(a preset gives its own, e.g. the paper's 0:0.001,0.9662:0). Default none: "
                            "--moe-router-bias-update-rate throughout.")
    group.add_argument("--dsv3-lambda-schedule", type=step_schedule, default=None, metavar="START:VALUE,...|none",
                       help="MTP loss weight lambda by the fraction of the run's tokens consumed, set every step "
                            "(a preset gives its own, e.g. the paper's 0:0.3,0.6757:0.1). Default none: "
                            "--mtp-loss-scaling-factor throughout.")
    group.add_argument("--dry-run", action="store_true",
                       help="Check the flags as on WORLD_SIZE GPUs, LOCAL_WORLD_SIZE (default 8) a node, print the "
                            "parallel layout and exit: no GPU, no process group, no model.")
    return parser


# --- Parallel layout ----------------------------------------------------------------------------

PLACEMENTS = {
    "default": schedule.one_f_one_b_placement,
    "dualpipe": schedule.dualpipe_placement,
    "dualpipev": schedule.dualpipev_placement,
}


def _v_split(rank_layers: list[int]) -> list[int]:
    """DualPipeV's 2P stages from each rank's layers: the odd layer on the way down."""
    return [(n + 1) // 2 for n in rank_layers] + [n // 2 for n in reversed(rank_layers)]


# Layers of each stage, from the layers Megatron gives each rank (module note).
STAGE_LAYERS = {"default": list, "dualpipe": list, "dualpipev": _v_split}

# Megatron-LM flags that lay layers out some other way than the module note says.
OTHER_LAYOUT_FLAGS = {
    "pipeline_model_parallel_layout": "--pipeline-model-parallel-layout",
    "num_layers_per_virtual_pipeline_stage": "--num-layers-per-virtual-pipeline-stage",
    "num_virtual_stages_per_pipeline_rank": "--num-virtual-stages-per-pipeline-rank",
    "account_for_embedding_in_pipeline_split": "--account-for-embedding-in-pipeline-split",
    "account_for_loss_in_pipeline_split": "--account-for-loss-in-pipeline-split",
}


def check_parallelism(args: argparse.Namespace) -> None:
    """What Megatron's `validate_args` would reject tersely (or not at all), naming the flags."""
    tp, pp, cp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.context_parallel_size
    ep, etp = args.expert_model_parallel_size, args.expert_tensor_parallel_size or tp
    world = args.world_size
    _require(
        cp == 1,
        f"--context-parallel-size={cp}: examples/pretrain_dsv3.py gives every rank whole sequences (the paper "
        "uses no context parallelism, PAPER §6)",
        "use 1",
    )
    _require(
        world % (tp * pp * cp) == 0,
        f"WORLD_SIZE={world} is not divisible by --tensor-model-parallel-size={tp} x "
        f"--pipeline-model-parallel-size={pp} x --context-parallel-size={cp}",
        "change the node count or the pipeline size",
    )
    if args.num_experts:
        _require(
            args.num_experts % ep == 0,
            f"--expert-model-parallel-size={ep} does not divide --num-experts={args.num_experts}",
            "choose an EP size that divides the experts",
        )
        _require(
            (world // pp) % (ep * etp) == 0,
            f"--expert-model-parallel-size={ep} x --expert-tensor-parallel-size={etp} does not divide the "
            f"{world // pp} GPUs of a pipeline stage (WORLD_SIZE={world} / --pipeline-model-parallel-size={pp})",
            "choose EP x ETP dividing the GPUs of a stage",
        )
    if args.global_batch_size and args.micro_batch_size:  # else Megatron's validate_args says
        dp = world // (tp * pp * cp)
        _require(
            args.global_batch_size % (args.micro_batch_size * dp) == 0,
            f"--global-batch-size={args.global_batch_size} is not divisible by --micro-batch-size={args.micro_batch_size} "
            f"x data-parallel size {dp} (WORLD_SIZE / (TP x PP x CP))",
            f"use a multiple of {args.micro_batch_size * dp}",
        )
        _placement(args, args.global_batch_size // (args.micro_batch_size * dp))
    if args.pipeline_schedule != "default":
        _require(
            not args.gradient_accumulation_fusion,
            f"--pipeline-schedule={args.pipeline_schedule} defers the local linears' weight gradients (megatron_dsv3."
            "pipeline.weight_grad), which Megatron's fused gradient accumulation cannot",
            "add --no-gradient-accumulation-fusion",
        )
    for name, flag in OTHER_LAYOUT_FLAGS.items():
        _require(
            not getattr(args, name),
            f"{flag}={getattr(args, name)}: layers are laid out per pipeline rank by --decoder-first-pipeline-num-layers / "
            "--decoder-last-pipeline-num-layers (megatron_dsv3.launch)",
            f"drop {flag}",
        )


# A dry run checks the flags as on the paper's cluster, wherever it runs: Megatron asks the GPU
# for its compute capability (H800: Hopper, 9.0) and Transformer Engine for its version (2.6:
# the oldest with the blockwise FP8 recipe and FP8-aware norm recompute that the scripts use).
DRY_RUN_DEVICE_CAPABILITY = (9, 0)
DRY_RUN_TE_VERSION = "2.6.0"


@contextlib.contextmanager
def _as_on_cluster():
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


def parse_args() -> argparse.Namespace:
    """Megatron-LM's parser over sys.argv (already expanded), our checks, then Megatron's."""
    args = megatron_parse_args(extra_args_provider=add_args)
    check_parallelism(args)
    with _as_on_cluster() if args.dry_run else contextlib.nullcontext():
        validate_args(args)
    return args


def dry_run(args: argparse.Namespace) -> str:
    """The layout of a parsed launch, checked as on the cluster; builds no model."""
    with _as_on_cluster():
        config = model_config(args)
        return describe(args, config, pipeline_layout(args, config))


def model_config(args: argparse.Namespace) -> DeepSeekV3Config:
    """The model config of Megatron-LM's parsed args, with what Megatron keeps elsewhere.

    `core_transformer_config_from_args` builds an `MLATransformerConfig` whatever class it is
    given when `--multi-latent-attention` is on, so its fields are carried over into ours."""
    mla = core_transformer_config_from_args(args, config_class=MLATransformerConfig)
    fields = {f.name: getattr(mla, f.name) for f in dataclasses.fields(MLATransformerConfig) if f.init}
    _require(args.padded_vocab_size is not None, "the vocabulary size is unknown before the tokenizer is built",
             "pass --padded-vocab-size (a --dsv3-preset does)")
    return DeepSeekV3Config(
        **fields,
        vocab_size=args.padded_vocab_size,
        seq_length=args.seq_length,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        fp8_blockwise=FP8_CHOICES[args.dsv3_fp8][0],
        bias_update_rate_schedule=args.dsv3_gamma_schedule,
        mtp_loss_scaling_schedule=args.dsv3_lambda_schedule,
        preset_name=args.dsv3_preset or "custom",
    )


def num_microbatches(args: argparse.Namespace) -> int:
    return args.global_batch_size // (args.micro_batch_size * args.data_parallel_size)


def stage_layers(args: argparse.Namespace, config: DeepSeekV3Config) -> list[int]:
    """Decoder layers of each pipeline stage under `--pipeline-schedule` (module note)."""
    pp = args.pipeline_model_parallel_size
    rank_layers = [get_num_layers_to_build(config, pp_rank=r) for r in range(pp)]
    counts = STAGE_LAYERS[args.pipeline_schedule](rank_layers)
    if args.pipeline_schedule != "default":
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


def _placement(args: argparse.Namespace, microbatches: int) -> schedule.Placement:
    """The stages of `--pipeline-schedule` on the pipeline ranks, for `microbatches` a step."""
    pp = args.pipeline_model_parallel_size
    try:
        return PLACEMENTS[args.pipeline_schedule](pp, microbatches)
    except ValueError as error:
        raise LaunchError(
            f"--pipeline-schedule={args.pipeline_schedule} with --pipeline-model-parallel-size={pp} and {microbatches} "
            f"micro-batches (--global-batch-size / (--micro-batch-size x data-parallel size)): {error}. Fix: change the "
            "global batch or the micro-batch size."
        ) from None


def pipeline_layout(args: argparse.Namespace, config: DeepSeekV3Config) -> PipelineLayout:
    """Where each stage and its layers live."""
    return PipelineLayout(_placement(args, num_microbatches(args)), stage_layers(args, config))


def _nodes(count: float) -> str:
    return f"{count:g} node{'' if count == 1 else 's'}"


def describe(args: argparse.Namespace, config: DeepSeekV3Config, pipeline: PipelineLayout) -> str:
    """The layout as a dry run prints it."""
    world, per_node = args.world_size, int(os.environ.get("LOCAL_WORLD_SIZE", "8"))
    pp, ep, dp = args.pipeline_model_parallel_size, args.expert_model_parallel_size, args.data_parallel_size
    etp = args.expert_tensor_parallel_size or args.tensor_model_parallel_size
    p, layers = pipeline.placement, pipeline.layers
    lines = [
        f"{config.preset_name}: {world} GPUs = {_nodes(world / per_node)} x {per_node}",
        f"  parallelism  TP {args.tensor_model_parallel_size}, PP {pp}, CP {args.context_parallel_size}, DP {dp}"
        + (" (ZeRO-1: distributed optimizer)" if args.use_distributed_optimizer else ""),
        f"  pipeline     {pp} ranks of {world // pp} GPUs ({_nodes(world // pp / per_node)}); {args.pipeline_schedule}: "
        f"{p.num_stages} stages{' per direction' if len(p.microbatches) > 1 else ''}, {len(p.stage_of[0])} per rank",
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
            cell = f"{f'direction {direction} ' if len(p.microbatches) > 1 else ''}stage {stage}: "
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
