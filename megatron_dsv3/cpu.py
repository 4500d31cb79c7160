"""The explicit CPU compatibility layer (docs/cpu.md: what Megatron-Core needs to run on CPU, and why).

Megatron-Core 0.19 trains a GPTModel with MLA + MoE + MTP on CPU with exactly these changes:
  1. `torch.cuda.current_device` answers the CPU (Megatron allocates buffers on it),
     `torch.cuda.current_stream` answers a stream whose waits are no-ops (0.19.2's DDP
     `start_grad_sync` waits on CUDA-graph events through it; on CPU there are none), and
     `torch.cuda.synchronize` returns at once (dist_checkpointing's save calls it after
     copying tensors to the host; on CPU there is nothing to wait for);
  2. an RNG tracker that needs no CUDA generator (instead of `model_parallel_cuda_manual_seed`);
  3. an SDPA core attention for MLA (`megatron_dsv3.attention`, chosen by `megatron_dsv3.specs`);
  4. the allgather token dispatcher (alltoall creates a CUDA stream in `__init__`).
`enable()` applies 1 and 2 and checks 3 and 4 against the config. It is opt-in, idempotent,
and does nothing on a machine with a GPU.
"""

from __future__ import annotations

import torch
from megatron.core import tensor_parallel

from megatron_dsv3.config import DeepSeekV3Config, check_runs_on_cpu

_enabled = False


class _HostStream:
    """What Megatron asks of `torch.cuda.current_stream()` on a CPU run: work is synchronous."""

    def wait_event(self, event) -> None:
        pass

    def wait_stream(self, stream) -> None:
        pass

    def synchronize(self) -> None:
        pass


_HOST_STREAM = _HostStream()


def enable(config: DeepSeekV3Config | None = None) -> bool:
    """Make Megatron-Core run on CPU; returns True when the layer is active.

    With `config`, first rejects what cannot run on CPU (TE modules, the alltoall or flex
    dispatcher, bf16, a fused router) with the field and the fix.
    """
    global _enabled
    if torch.cuda.is_available():
        return False
    if config is not None:
        check_runs_on_cpu(config)
    if not _enabled:
        torch.cuda.current_device = lambda: torch.device("cpu")
        torch.cuda.current_stream = lambda device=None: _HOST_STREAM
        torch.cuda.synchronize = lambda device=None: None
        tensor_parallel.random.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
        _enabled = True
    return True
