"""Megatron-LM's argument parser with our flags: `--pipeline-schedule` and the `--dsv3-*` flags.

`add_args` is the extra-args provider (`megatron.training.pretrain(extra_args_provider=...)`);
`parse_args` runs Megatron-LM's own parser over sys.argv (already expanded by
`flags.expand_argv`), then our checks (`layout.check_parallelism`, errors naming the flags and
the fix), then Megatron's `validate_args` (as on the cluster for a dry run).
"""

from __future__ import annotations

import argparse
import contextlib
import re

from megatron.training.arguments import parse_args as megatron_parse_args
from megatron.training.arguments import validate_args

from megatron_dsv3.config import PRESETS, StepSchedule
from megatron_dsv3.launch.dry_run import as_on_cluster
from megatron_dsv3.launch.flags import FP8_CHOICES
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
    group.add_argument("--dry-run", action="store_true",
                       help="Check the flags as on WORLD_SIZE GPUs, LOCAL_WORLD_SIZE (default 8) a node, print the "
                            "parallel layout and exit: no GPU, no process group, no model.")
    return parser


def parse_args() -> argparse.Namespace:
    """Megatron-LM's parser over sys.argv (already expanded), our checks, then Megatron's."""
    args = megatron_parse_args(extra_args_provider=add_args)
    check_parallelism(args)
    with as_on_cluster() if args.dry_run else contextlib.nullcontext():
        validate_args(args)
    return args
