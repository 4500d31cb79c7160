"""Resumable training checkpoints through `megatron.core.dist_checkpointing`.

Design note
-----------
On disk, under `<run_dir>/checkpoints/`:
  iter_0000010/   one dist_checkpointing directory per saved step
  latest          the step of the newest complete one, as text
A save is atomic: every rank writes into `iter_0000010.incomplete/`; once all have finished
(dist_checkpointing's save is collective), rank 0 renames it to `iter_0000010/` and then
replaces `latest` (written aside, `os.replace`d). A process killed during a save leaves at
most an `.incomplete` directory, which nothing reads: `latest` still names the previous
complete checkpoint, and `load` resumes from it.

What a checkpoint holds (sharded keys are the single-process model's names, since every
chunk numbers its layers globally; see pipeline/layout.py):
  model            every chunk's parameters and persistent buffers: the router expert biases;
  optimizer        AdamW's moments per parameter (`optimizer.state.exp_avg.<key>`, ...), its
                   step count and hyper-parameters; the LR / weight-decay scheduler's state;
  ema              the CPU EMA of the parameters (`ema.<key>`), when the run keeps one;
  rng              each rank's torch / Python / NumPy / Megatron tracker generator states (one
                   object per rank);
  progress         the step, consumed samples and tokens: the data position (the data order is
                   fixed by the seed, so the loop skips what was consumed) and the gamma /
                   lambda token-schedule position (`DeepSeekV3Config.apply_token_schedules`);
  run              the settings a resume must share (batch shape, schedule, world), checked
                   before anything is loaded.
DualPipe keeps two copies of every stage (pipeline/dualpipe.py); the mirror chunk marks its
entries as replicas (pipeline/layout.py), so each stage is written once (by the rank holding
it as chunk 0) and read into both copies; the moments and the EMA follow their parameters.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import queue
import random
import shutil
from pathlib import Path

import numpy
import torch
from megatron.core import dist_checkpointing, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.dist_checkpointing.optimizer import (
    get_param_id_to_sharded_param_map,
    make_sharded_optimizer_tensor,
    optim_state_to_sharding_state,
)
from megatron.core.dist_checkpointing.strategies import filesystem_async
from torch.distributed.checkpoint.api import CheckpointException

from megatron_dsv3 import safe_load
from megatron_dsv3.training.ema import ParameterEMA
from megatron_dsv3.training.optimizer import AdamWLowPrecisionMoments

LATEST = "latest"


def step_dir(root: Path, step: int) -> Path:
    return root / f"iter_{step:07d}"


def latest_step(root: Path) -> int | None:
    """The step of the newest complete checkpoint under `root`, or None."""
    path = root / LATEST
    if not path.exists():
        return None
    text = path.read_text().strip()
    if not text.isdigit():
        raise safe_load.CheckpointReadError(f"{path}: holds {text[:40]!r}, not a step number. Fix: write the step of a "
                                            f"complete checkpoint into it (one of {_complete_steps(root) or 'none'}).")
    return int(text)


def _complete_steps(root: Path) -> list[int]:
    return sorted(int(p.name.removeprefix("iter_")) for p in root.glob("iter_*") if p.name.removeprefix("iter_").isdigit())


@dataclasses.dataclass
class TrainingState:
    """What a loop hands to `save` and gets back from `load`."""

    chunks: list  # Megatron DDP-wrapped model chunks of this rank
    optimizer: torch.optim.Optimizer
    scheduler: object  # megatron.core.optimizer_param_scheduler.OptimizerParamScheduler
    ema: ParameterEMA | None
    ema_names: dict[str, torch.nn.Parameter]  # the EMA's parameter names -> parameters


def _unwrapped(chunk):
    return chunk.module if hasattr(chunk, "module") else chunk


def _model_state(state: TrainingState) -> dict:
    return {f"chunk{index}": _unwrapped(chunk).sharded_state_dict() for index, chunk in enumerate(state.chunks)}


def _ensure_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Give every parameter its AdamW state (zeros), so a load has tensors to fill."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            if optimizer.state[param]:
                continue
            if isinstance(optimizer, AdamWLowPrecisionMoments):
                moments = dict(dtype=optimizer.moments_dtype)
                optimizer.state[param] = {"step": 0, "exp_avg": torch.zeros_like(param, **moments), "exp_avg_sq": torch.zeros_like(param, **moments)}
            elif type(optimizer) is torch.optim.AdamW and not group["amsgrad"]:
                optimizer.state[param] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(param), "exp_avg_sq": torch.zeros_like(param)}
            else:
                raise TypeError(f"checkpoints know the state of AdamW and AdamWLowPrecisionMoments, not {type(optimizer).__name__}")


def _optimizer_state(state: TrainingState, model: dict) -> dict:
    """AdamW's moments as sharded tensors named after their parameters; the step count (one for
    all parameters: every parameter steps every step) and param groups as plain values."""
    params = [p for group in state.optimizer.param_groups for p in group["params"]]
    optimizer_state = state.optimizer.state_dict()
    optim_state_to_sharding_state(optimizer_state, get_param_id_to_sharded_param_map(model, params), exclude_keys=("step",))
    return optimizer_state


def _ema_state(state: TrainingState, model: dict) -> dict:
    """The EMA's averages as sharded tensors keyed `ema.<model key>`, sharded like their parameters."""
    averages = state.ema.state_dict()["averages"]
    sharded_of = get_param_id_to_sharded_param_map(model, state.ema_names.values())
    return {name: make_sharded_optimizer_tensor(sharded_of[index], averages[name], prefix="ema")
            for index, name in enumerate(state.ema_names)}


def _rng_state() -> ShardedObject:
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    states = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": numpy.random.get_state(),
              "model_parallel": tensor_parallel.get_cuda_rng_tracker().get_states()}  # Megatron's dropout streams
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    return ShardedObject("rng_state", states, (world,), (rank,), replica_id=0)


def _sharded_state(state: TrainingState) -> dict:
    model = _model_state(state)
    sharded = {"model": model, "optimizer": _optimizer_state(state, model), "rng": _rng_state()}
    if state.ema is not None:
        sharded["ema"] = _ema_state(state, model)
    return sharded


def _write_results_in_process() -> None:
    """Megatron's file writer reports through a queue it makes with a spawned multiprocessing
    Manager, for async saves. Saves here are synchronous, the writer threads run in this
    process, and a process-local queue does: no Manager server to start (a Python start-up
    per process) or to outlive a trainer that was killed."""
    if filesystem_async._results_queue is None:
        filesystem_async._results_queue = queue.Queue()


def save(root: Path, state: TrainingState, progress: dict, run: dict) -> Path:
    """Write step `progress["step"]` atomically (see the module note); a collective."""
    _write_results_in_process()
    step = progress["step"]
    final, incomplete = step_dir(root, step), root / f"{step_dir(root, step).name}.incomplete"
    rank = torch.distributed.get_rank()
    _ensure_optimizer_state(state.optimizer)
    sharded = _sharded_state(state)
    sharded["progress"] = dict(progress, optimizer_step=step)
    if state.ema is not None:
        state.ema.wait()
        sharded["progress"]["ema"] = {"decay": state.ema.decay, "num_updates": state.ema.num_updates}
    sharded["scheduler"] = state.scheduler.state_dict()
    sharded["run"] = run
    if rank == 0:
        shutil.rmtree(incomplete, ignore_errors=True)  # left by a save that was killed
        incomplete.mkdir(parents=True)
    torch.distributed.barrier()
    try:
        dist_checkpointing.save(sharded, str(incomplete))
    except (OSError, CheckpointException) as error:  # DCP reports every rank's error to every rank
        if rank == 0:
            shutil.rmtree(incomplete, ignore_errors=True)
        kept = f"the previous checkpoint stays the latest (step {latest_step(root)})" if latest_step(root) else "no checkpoint is kept"
        if _no_space(error):
            raise OSError(errno.ENOSPC, f"no space left on the device of {root} while writing {incomplete}; {kept} and the "
                                        "partial save is removed. Fix: free space, or pass a --run-dir on a larger disk") from None
        raise OSError(f"writing {incomplete} failed ({error}); {kept} and the partial save is removed") from error
    torch.distributed.barrier()  # every rank has written its part
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(incomplete, final)
        pending = root / f"{LATEST}.pending"
        pending.write_text(str(step))
        os.replace(pending, root / LATEST)
    torch.distributed.barrier()
    return final


def _no_space(error: BaseException) -> bool:
    """Whether `error`, or one DCP gathered from a rank, is a full disk."""
    if isinstance(error, CheckpointException):
        return any(_no_space(exception) for exception, _ in error.failures.values())
    return (isinstance(error, OSError) and error.errno == errno.ENOSPC) or (error.__cause__ is not None and _no_space(error.__cause__))


def load(root: Path, state: TrainingState, run: dict) -> dict:
    """Restore the newest complete checkpoint under `root` into `state`; returns its progress."""
    step = latest_step(root)
    if step is None:
        raise FileNotFoundError(f"no complete checkpoint under {root} (no {LATEST} file). Fix: start without --resume.")
    directory = step_dir(root, step)
    if not directory.is_dir():
        raise safe_load.CheckpointReadError(
            f"{root / LATEST} names step {step}, but {directory} does not exist. Fix: write the step of a complete "
            f"checkpoint into it (one of {_complete_steps(root) or 'none'}), or start without --resume."
        )
    with safe_load.reading(directory):  # nothing in the checkpoint runs code
        common = dist_checkpointing.load_common_state_dict(str(directory))
    for field, value in run.items():
        if common["run"].get(field) != value:
            raise ValueError(
                f"{directory} was saved with {field}={common['run'].get(field)!r}, this run has {field}={value!r}. "
                f"Fix: resume with the same {field}, or start a new --run-dir."
            )
    _ensure_optimizer_state(state.optimizer)
    with safe_load.reading(directory):
        loaded = dist_checkpointing.load(_sharded_state(state), str(directory))

    for index, chunk in enumerate(state.chunks):
        _unwrapped(chunk).load_state_dict(loaded["model"][f"chunk{index}"], strict=True)
    optimizer_state = loaded["optimizer"]
    optimizer_step = loaded["progress"]["optimizer_step"]
    for param_state in optimizer_state["state"].values():
        param_state["step"] = optimizer_step if isinstance(state.optimizer, AdamWLowPrecisionMoments) else torch.tensor(float(optimizer_step))
    state.optimizer.load_state_dict(optimizer_state)
    state.scheduler.load_state_dict(loaded["scheduler"])
    if state.ema is not None:
        if "ema" not in loaded:
            raise ValueError(f"{directory} has no EMA: the run that saved it kept none. Fix: resume without --ema-decay.")
        ema_progress = loaded["progress"]["ema"]
        state.ema.load_state_dict({"decay": ema_progress["decay"], "num_updates": ema_progress["num_updates"], "averages": loaded["ema"]})
    rng = loaded["rng"]
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    numpy.random.set_state(rng["numpy"])
    tensor_parallel.get_cuda_rng_tracker().set_states(rng["model_parallel"])
    if "cuda" in rng:
        torch.cuda.set_rng_state(rng["cuda"])
    return loaded["progress"]
