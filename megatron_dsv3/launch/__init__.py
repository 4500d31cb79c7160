"""Launch DeepSeek-V3 runs through Megatron-LM (examples/pretrain_dsv3.py, examples/slurm/*.sbatch).

  flags.py    presets as Megatron-LM flags (`expand_argv`), and back (`model_config`)
  args.py     the extra-args provider (`add_args`) and `parse_args`: Megatron-LM's parser, our checks, then Megatron's
  layout.py   the parallel layout's checks (`check_parallelism`), layers per stage, placement
  dry_run.py  the launch checked as on the report's cluster, and the layout as text (`dry_run`, `describe`)
  data.py     the data flags against the tokenizer and --padded-vocab-size (`check_data`, megatron_dsv3.datasets' rules)
  errors.py   `LaunchError`: names the flags, their values and the fix
"""

from megatron_dsv3.launch.args import add_args, parse_args, step_schedule
from megatron_dsv3.launch.data import check_data
from megatron_dsv3.launch.dry_run import describe, dry_run
from megatron_dsv3.launch.errors import LaunchError
from megatron_dsv3.launch.flags import (
    FP8_CHOICES,
    PRESET_FLAGS,
    PRESET_IMPLIED,
    PRESET_SWITCHES,
    expand_argv,
    model_config,
    preset_argv,
)
from megatron_dsv3.launch.layout import check_parallelism, num_microbatches, pipeline_layout, stage_layers

__all__ = [
    "FP8_CHOICES", "PRESET_FLAGS", "PRESET_IMPLIED", "PRESET_SWITCHES", "LaunchError", "add_args", "check_data",
    "check_parallelism", "describe", "dry_run", "expand_argv", "model_config", "num_microbatches", "parse_args",
    "pipeline_layout", "preset_argv", "stage_layers", "step_schedule",
]
