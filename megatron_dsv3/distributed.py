"""Process-group set-up shared by the training loop, the converter, the benchmarks and the tests.

  - `free_port()` and `local_process_env(rank, world_size, port)`: a one-host process group
    without torchrun (spawned workers, one-process runs);
  - `init_distributed(...)`: torch's default group (gloo on CPU, NCCL on GPU) and Megatron's
    model-parallel groups (`parallel_state.initialize_model_parallel`), with the pipeline
    schedule's embedding group (`registry.PipelineSchedule`'s layout: two-chunk schedules
    keep the embedding on pipeline rank 0 alone);
  - `seed_everything(seed)`: Python, NumPy, torch and, on GPU, Megatron's CUDA RNG tracker.
"""

from __future__ import annotations

import datetime
import os
import random
import socket
from collections.abc import Callable

import numpy
import torch
from megatron.core import parallel_state, tensor_parallel

LOCALHOST = "127.0.0.1"


def free_port() -> int:
    """A TCP port of this host that nothing listens on now."""
    with socket.socket() as s:
        s.bind((LOCALHOST, 0))
        return s.getsockname()[1]


def local_process_env(rank: int, world_size: int, port: int) -> None:
    """The environment torchrun would give process `rank` of a one-host group on `port`."""
    os.environ.update(MASTER_ADDR=LOCALHOST, MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))


def init_distributed(pipeline_size: int = 1, get_embedding_ranks: Callable[[list[int]], list[int]] | None = None,
                     timeout: datetime.timedelta | None = None, backend: str | None = None, *,
                     tensor_model_parallel_size: int = 1, context_parallel_size: int = 1,
                     expert_model_parallel_size: int = 1) -> None:
    """Join torchrun's process group (or make a one-process one), then Megatron's groups.

    `pipeline_size` ranks per pipeline, the rest of the world data parallel;
    `get_embedding_ranks` is Megatron's hook for the embedding group (None: its default, the
    first and last pipeline ranks); `timeout` bounds the default group's collectives and
    Megatron's groups' (the pipeline's P2P among them; Megatron's default is 30 minutes);
    `backend` defaults to NCCL where CUDA is, else gloo; the other model-parallel sizes are
    Megatron's (`initialize_model_parallel`). Idempotent: groups that exist are kept."""
    if not torch.distributed.is_initialized():
        if "RANK" not in os.environ:
            local_process_env(0, 1, free_port())
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        torch.distributed.init_process_group(backend, **({"timeout": timeout} if timeout is not None else {}))
    if not parallel_state.model_parallel_is_initialized():
        world = torch.distributed.get_world_size()
        model_parallel = pipeline_size * tensor_model_parallel_size * context_parallel_size
        if world % model_parallel:
            raise ValueError(
                f"pipeline_size={pipeline_size} x tensor {tensor_model_parallel_size} x context {context_parallel_size} "
                f"does not divide the {world} processes. Fix: launch a multiple of {model_parallel} processes "
                "(torchrun --nproc-per-node), or change the parallel sizes."
            )
        timeout_minutes = {"distributed_timeout_minutes": timeout.total_seconds() / 60} if timeout is not None else {}
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tensor_model_parallel_size, pipeline_model_parallel_size=pipeline_size,
            context_parallel_size=context_parallel_size, expert_model_parallel_size=expert_model_parallel_size,
            get_embedding_ranks=get_embedding_ranks, **timeout_minutes,
        )


def seed_everything(seed: int) -> None:
    random.seed(seed)
    numpy.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
