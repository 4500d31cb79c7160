"""Megatron-LM's argument parser with our flags: `--pipeline-schedule` and the `--dsv3-*` flags.

`add_args` is the extra-args provider (`megatron.training.pretrain(extra_args_provider=...)`);
`parse_args` runs Megatron-LM's own parser over sys.argv (already expanded by
`flags.expand_argv`), then our checks (`check_flags`: the layer pattern and the validation
interval; `layout.check_parallelism`; errors naming the flags and the fix), then Megatron's
`validate_args` (as on the cluster for a dry run).

Design note: --eval-interval
----------------------------
Megatron-LM 0.19.2 defaults `--eval-interval` to None, yet sizes the validation set with
`train_iters // eval_interval` (`get_train_valid_test_num_samples`) and, on a resume, the
validation samples consumed with `iteration // eval_interval`, whether or not any validation
runs: a TypeError after the process groups exist, on every launch that does not pass it.
When validation runs (`--eval-iters` above 0, Megatron-LM's default 100, or
`--full-validation`) the interval is the user's choice, so `check_flags` rejects a launch
without one, naming the flag and the fix. With `--eval-iters 0` (and no `--full-validation`)
no validation runs and the interval is read only as a divisor of counts multiplied by 0; then
`NO_VALIDATION_INTERVAL` (1000, the default Megatron-LM's parser gave before its flags moved to
config dataclasses) is filled in; any positive value gives the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import re

from megatron.training.arguments import parse_args as megatron_parse_args
from megatron.training.arguments import validate_args

from megatron_dsv3.config import PRESETS, StepSchedule, num_dense_prefix
from megatron_dsv3.launch.dry_run import as_on_cluster
from megatron_dsv3.launch.errors import require
from megatron_dsv3.launch.flags import FP8_CHOICES, flag_value
from megatron_dsv3.launch.layout import check_parallelism
from megatron_dsv3.pipeline import install


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
                       help="Blockwise FP8 (report §3.3): te = TE's Float8BlockScaling (adds --fp8-format e4m3 "
                            "--fp8-recipe blockwise); emulate / scaled_mm / auto = our FP8 Linear (local backend).")
    group.add_argument("--dsv3-gamma-schedule", type=step_schedule, default=None, metavar="START:VALUE,...|none",
                       help="Bias update speed gamma by the fraction of the run's tokens consumed, set every step "
                            "(a preset gives its own, e.g. the paper's 0:0.001,0.9662:0). Default none: "
                            "--moe-router-bias-update-rate throughout.")
    group.add_argument("--dsv3-lambda-schedule", type=step_schedule, default=None, metavar="START:VALUE,...|none",
                       help="MTP loss weight lambda by the fraction of the run's tokens consumed, set every step "
                            "(a preset gives its own, e.g. the paper's 0:0.3,0.6757:0.1). Default none: "
                            "--mtp-loss-scaling-factor throughout.")
    group.add_argument("--dsv3-fb-overlap", action="store_true",
                       help="With --pipeline-schedule dualpipev or dualpipe and --expert-model-parallel-size > 1: each FB "
                            "step's forward and backward micro-batches take turns at their expert-parallel all-to-alls, "
                            "each exchange in flight while the other computes (report §3.2.1); the same numbers.")
    group.add_argument("--dsv3-init-as-single-process", action="store_true",
                       help="Every rank builds the whole model from --seed and keeps its chunks, so a pipelined run "
                            "starts from the single-process model's weights (Megatron-LM offsets the seed per pipeline "
                            "rank). Only for models that fit in one rank's memory.")
    group.add_argument("--dry-run", action="store_true",
                       help="Check the flags as on WORLD_SIZE GPUs, LOCAL_WORLD_SIZE (default 8) a node, print the "
                            "parallel layout and exit: no GPU, no process group, no model.")
    return parser


# --eval-interval where no validation runs (module note): Megatron-LM's former default.
NO_VALIDATION_INTERVAL = 1000


def check_flags(args: argparse.Namespace) -> None:
    """The layer count, and the layer pattern against it; the validation interval, filled in where no
    validation runs (module note)."""
    freq, layers = args.moe_layer_freq, args.num_layers
    require(layers is None or layers >= 1, f"--num-layers={layers}: a model needs at least one layer", "pass --num-layers >= 1")
    if args.num_experts and isinstance(freq, list) and layers is not None:
        k = min(num_dense_prefix(freq), layers)
        require(
            len(freq) == layers and set(freq) <= {0, 1},
            f"--moe-layer-freq={flag_value(freq)} ({len(freq)} entries) with --num-layers={layers}: needs one 0 "
            "(dense) or 1 (MoE) per layer",
            f"pass --moe-layer-freq '([0]*{k}+[1]*{layers - k})' (the first {k} dense, then MoE) or another list of "
            f"{layers} 0s and 1s; after --dsv3-preset, leave --moe-layer-freq out: the preset's first-k-dense pattern "
            "then follows --num-layers",
        )
    validates = args.full_validation or bool(args.eval_iters)
    if args.eval_interval is None and not validates:
        args.eval_interval = NO_VALIDATION_INTERVAL
    require(
        args.eval_interval is not None,
        f"--eval-interval is not set and --eval-iters={args.eval_iters}"
        f"{' with --full-validation' if args.full_validation else ''}: Megatron-LM validates every "
        "--eval-interval steps and divides by it to size the validation data (a TypeError before the first step)",
        "pass --eval-interval N (validate every N steps), or --eval-iters 0 for no validation",
    )
    require(
        args.eval_interval > 0,
        f"--eval-interval={args.eval_interval}: Megatron-LM divides by it to size the validation data",
        "pass a positive --eval-interval N (validate every N steps), or --eval-iters 0 and no --eval-interval for "
        "no validation",
    )


def parse_args() -> argparse.Namespace:
    """Megatron-LM's parser over sys.argv (already expanded), our checks, then Megatron's."""
    args = megatron_parse_args(extra_args_provider=add_args)
    check_flags(args)
    check_parallelism(args)
    with as_on_cluster() if args.dry_run else contextlib.nullcontext():
        validate_args(args)
    return args
