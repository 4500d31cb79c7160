"""`--init-from DIR`: start a run from released or converted weights (fine-tuning).

The weights come from DIR; the optimizer state, the LR schedule, the data position and the
step count start fresh (step 1 is the first), as a new run's do. DIR is one of
  - an HF DeepSeek-V3 directory (`config.json` and safetensors, BF16/FP32 or DeepSeek's FP8):
    rank 0 converts it once into RUN_DIR/init-from-hf/ with `python -m megatron_dsv3.convert
    hf-to-mcore` in a process of its own (the converter's dist_checkpointing save is a
    collective of the processes that convert, not of the training job), while the other
    ranks wait for it;
  - a dist_checkpointing checkpoint whose tensors carry the model's names: the converter's
    output, a compact-loop checkpoint (`RUN_DIR/checkpoints`, or one `iter_N` in it) or a
    Megatron-LM `torch_dist` checkpoint (its `--save` directory, or one `iter_N`/`release`).
Every rank then reads its chunks' tensors with Megatron's `dist_checkpointing.load`, which
reshards them to the run's layout: pipeline stages by their global layer numbers (both copies
of a DualPipe stage), experts by their global index, data-parallel replicas alike. Only
tensors are read (no pickled object is unpickled).

Everything that can be checked before any work is: the directory's kind, an HF config.json
against the preset (`convert.check_hf_config`), a converted checkpoint's recorded config.json
likewise (`convert.check_recorded_hf_config`: the router's top-k, which no tensor shape shows),
and, before a byte is loaded, every tensor the model needs against the checkpoint's metadata
(name and global shape, `convert.tensor_fit_problems`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

from megatron_dsv3 import safe_load
from megatron_dsv3.config import DeepSeekV3Config
from megatron_dsv3.convert.hf import (
    DCP_METADATA,
    INDEX_FILE,
    SINGLE_FILE,
    ConversionError,
    check_hf_config,
    check_recorded_hf_config,
    model_tensor_shapes,
    tensor_fit_problems,
    tracked_checkpoint,
)

CONVERTED = "init-from-hf"  # under RUN_DIR: an HF directory's conversion


class InitFromError(ValueError):
    """A --init-from directory that cannot initialise this model: names it, what is wrong and the fix."""


@dataclass(frozen=True)
class Source:
    """Where a run's first weights come from."""

    directory: Path
    hf: bool  # an HF directory, converted first


def resolve(directory: Path | None, config: DeepSeekV3Config) -> Source | None:
    """The source of `--init-from directory`, checked before any work (None: a random start)."""
    if directory is None:
        return None
    try:
        directory = tracked_checkpoint(directory)
    except ConversionError as error:
        raise InitFromError(f"--init-from {error}") from None
    if (directory / DCP_METADATA).is_file():
        try:
            check_recorded_hf_config(directory, config)  # a converted checkpoint's: what shapes cannot show
        except ConversionError as error:
            raise InitFromError(f"--init-from {directory}: {error}") from None
        return Source(directory, hf=False)
    if (directory / "config.json").is_file() and ((directory / INDEX_FILE).is_file() or (directory / SINGLE_FILE).is_file()):
        try:
            check_hf_config(json.loads((directory / "config.json").read_text()), config, str(directory / "config.json"))
        except (ConversionError, json.JSONDecodeError) as error:
            raise InitFromError(f"--init-from {directory}: {error}") from None
        return Source(directory, hf=True)
    raise InitFromError(
        f"--init-from {directory}: neither an HF checkpoint (config.json with {INDEX_FILE} or {SINGLE_FILE}) nor a "
        f"dist_checkpointing checkpoint ({DCP_METADATA}){'' if directory.exists() else '; it does not exist'}. Fix: "
        "point it at an HF DeepSeek-V3 directory, the output of `python -m megatron_dsv3.convert hf-to-mcore`, or a "
        "checkpoint's iter_N directory."
    )


def _convert(source: Source, out: Path, preset: str, overrides: dict) -> None:
    """Rank 0: the HF directory as a dist_checkpointing checkpoint, by the converter in a process
    of its own (no rendezvous of this job: it is a one-process conversion)."""
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE",
                                                            "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK")}
    sets = [arg for field, value in overrides.items() for arg in ("--set", f"{field}={json.dumps(value)}")]
    command = [sys.executable, "-m", "megatron_dsv3.convert", "hf-to-mcore", "--hf", str(source.directory),
               "--out", str(out), "--preset", preset, *sets]
    print(f"--init-from: converting {source.directory} into {out}", file=sys.stderr, flush=True)
    result = subprocess.run(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if result.returncode != 0:
        raise InitFromError(f"--init-from {source.directory}: the conversion failed:\n{result.stderr[-4000:]}")


def _check_against_metadata(directory: Path, chunks: list) -> None:
    """Every tensor the chunks need is in the checkpoint, with its global shape."""
    problems = tensor_fit_problems(directory, model_tensor_shapes(chunks))
    if problems:
        raise InitFromError(f"--init-from {directory}: {len(problems)} tensor(s) do not fit this model: "
                            f"{'; '.join(problems[:8])}. Fix: pass the preset and --set values the checkpoint was made "
                            "with.")


def load_weights(source: Source, chunks: list, config: DeepSeekV3Config, run_dir: Path, preset: str, overrides: dict) -> Path:
    """Give this rank's (unwrapped) chunks the weights of `source`; a collective. Returns the
    dist_checkpointing directory read."""
    directory = source.directory
    if source.hf:
        directory = run_dir / CONVERTED
        if torch.distributed.get_rank() == 0:
            _convert(source, directory, preset, overrides)
        torch.distributed.barrier()
    _check_against_metadata(directory, chunks)
    # One load for all chunks: a DualPipe rank's mirror chunk marks its entries as replicas
    # (pipeline/layout.py), and Megatron checks that the main replicas of the whole job cover
    # every tensor. Only tensors: a ShardedObject would be unpickled.
    wanted = {f"chunk{index}": {key: value for key, value in chunk.sharded_state_dict().items()
                                if isinstance(value, (ShardedTensor, ShardedTensorFactory))}
              for index, chunk in enumerate(chunks)}
    with safe_load.reading(directory):
        loaded = dist_checkpointing.load(wanted, str(directory))
    for index, chunk in enumerate(chunks):
        missing, unexpected = chunk.load_state_dict(loaded[f"chunk{index}"], strict=False)
        missing = [key for key in missing if not key.endswith("_extra_state")]
        if missing or unexpected:
            raise InitFromError(f"--init-from {directory}: loading left {missing[:4]} unset and {unexpected[:4]} unused.")
    return directory
