"""The explicit CPU compatibility layer (docs/cpu.md: what Megatron-Core needs to run on CPU, and why).

Megatron-Core 0.19 trains a GPTModel with MLA + MoE + MTP on CPU with exactly these changes:
  1. `torch.cuda.current_device` answers the CPU (Megatron allocates buffers on it),
     `torch.cuda.current_stream` answers a stream whose waits are no-ops (0.19.2's DDP
     `start_grad_sync` waits on CUDA-graph events through it; on CPU there are none), and
     `torch.cuda.synchronize` returns at once (dist_checkpointing's save calls it after
     copying tensors to the host; on CPU there is nothing to wait for);
  2. an RNG tracker that needs no CUDA generator (instead of `model_parallel_cuda_manual_seed`);
  3. an SDPA core attention for MLA (`megatron_dsv3.attention`, chosen by `megatron_dsv3.specs`);
  4. `torch.cuda.Stream()` / `torch.cuda.stream(s)`: a stream whose waits do nothing and a
     context that does nothing. The alltoall token dispatcher (expert parallelism) makes a
     side stream in `__init__` for its device-to-host copies of the split sizes, and Megatron-LM's
     `get_model` builds DDP inside one; on CPU the copies are synchronous. gloo runs the
     dispatcher's uneven `all_to_all_single` on CPU tensors as it is, given its split sizes as
     NumPy arrays: `maybe_move_tensor_to_cpu(..., as_numpy=True)` converts only tensors it
     moves off a GPU, and `all_to_all_single` refuses a tensor of sizes, so on CPU the
     dispatcher's copy of it converts host tensors too.
`enable()` applies 1, 2 and 4 and checks 3 against the config. It is opt-in, idempotent,
and does nothing on a machine with a GPU.

Megatron-LM's training loop (`megatron.training.pretrain`, examples/pretrain_dsv3.py) needs
more, measured with megatron-core 0.19.2 (its wheel ships `megatron.training`):
`enable_megatron_lm()` adds them, each for a named caller (docs/cpu.md lists the call sites):
  5. `initialize_megatron(allow_no_cuda=True)`: Megatron-LM's own switch for a run without
     CUDA (`pretrain` does not pass it);
  6. (moved to item 4, which `enable()` applies: the alltoall dispatcher needs it too);
  7. `torch.cuda.get_rng_state` / `set_rng_state` (and the same two of `torch.cuda.random`):
     the rerun state machine saves and restores the CUDA generator around every step, and
     selective recompute (`CheckpointWithoutOutput`, `--recompute-modules`) around each
     recomputed forward; on CPU there is none (the CPU generator is saved beside it);
  8. tensors asked for on "cuda" (`device="cuda"` literals, `.cuda()`, `.to("cuda")`) are made
     on the CPU, and `Tensor.type()` reports the CUDA type name (clip_grads asserts it):
     `_CudaOnCpu`, a torch function mode, since these are about twenty call sites in the
     loop, the optimizer, the schedules and the rerun state machine;
  9. the RNG tracker's states: on CPU it tracks no CUDA generator (item 2), and Megatron-LM's
     checkpoint load takes an empty tracker for a checkpoint without RNG state ("Unable to
     load rng state", exit): it reports one empty placeholder state, which loading ignores.
     Python's, NumPy's and torch's generators are saved and restored by Megatron-LM itself.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from megatron.core import tensor_parallel
from megatron.core.transformer.moe import token_dispatcher
from torch.overrides import TorchFunctionMode

from megatron_dsv3.config import DeepSeekV3Config, check_runs_on_cpu

_enabled = False
_megatron_lm_enabled = False


class _HostEvent:
    """An event of a host stream: what it marks has already happened."""

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


class _HostStream:
    """What Megatron asks of `torch.cuda.current_stream()` and of a side stream on a CPU run:
    work is synchronous, so every wait returns at once and every event has completed."""

    def record_event(self, event=None) -> _HostEvent:
        return _HostEvent()

    def wait_event(self, event) -> None:
        pass

    def wait_stream(self, stream) -> None:
        pass

    def synchronize(self) -> None:
        pass


_HOST_STREAM = _HostStream()


def _split_sizes_to_numpy(tensor, as_numpy: bool = False, record_stream: bool = False):
    """Item 4: Megatron's `maybe_move_tensor_to_cpu` for tensors already on the host."""
    return tensor.numpy() if as_numpy and torch.is_tensor(tensor) else tensor


def enable(config: DeepSeekV3Config | None = None) -> bool:
    """Make Megatron-Core run on CPU; returns True when the layer is active.

    With `config`, first rejects what cannot run on CPU (TE modules, the flex dispatcher,
    bf16, a fused router) with the field and the fix.
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
        torch.cuda.Stream = lambda *args, **kwargs: _HOST_STREAM
        torch.cuda.stream = lambda stream=None: contextlib.nullcontext()
        token_dispatcher.maybe_move_tensor_to_cpu = _split_sizes_to_numpy
        tensor_parallel.random.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
        _enabled = True
    return True


_NO_CUDA_GENERATOR = "megatron_dsv3.cpu: no CUDA generator"  # item 9


def _on_cuda(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int) and not isinstance(device, bool)  # an index is a CUDA device


class _CudaOnCpu(TorchFunctionMode):
    """Item 8 of the module note: what Megatron-LM's loop asks for on "cuda" is made on the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _on_cuda(kwargs.get("device")):
            kwargs = {**kwargs, "device": "cpu"}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.to:
            args = tuple("cpu" if _on_cuda(arg) else arg for arg in args)
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:  # the type's name
            return func(*args).replace("torch.", "torch.cuda.", 1)
        return func(*args, **kwargs)


def cuda_on_cpu():
    """Item 8 for one call: within it, what Megatron asks for on "cuda" is made on the CPU (the
    compact loop calls Megatron's clip_grads this way). A context that does nothing on a
    machine with a GPU."""
    return contextlib.nullcontext() if torch.cuda.is_available() else _CudaOnCpu()


def enable_megatron_lm() -> bool:
    """`enable()`, then what Megatron-LM's training loop needs on CPU (module note, items 5-9).
    Returns True when active; a no-op on a machine with a GPU. Idempotent. The torch function
    mode applies to the calling thread, the one that runs `pretrain`."""
    global _megatron_lm_enabled
    if not enable():
        return False
    if not _megatron_lm_enabled:
        import megatron.training.training as megatron_lm_training

        megatron_lm_training.initialize_megatron = functools.partial(megatron_lm_training.initialize_megatron, allow_no_cuda=True)
        for module in (torch.cuda, torch.cuda.random):  # the rerun state machine reads one, recompute the other
            module.get_rng_state = lambda device="cuda": torch.get_rng_state()
            module.set_rng_state = lambda new_state, device="cuda": None
        _CudaOnCpu().__enter__()
        tensor_parallel.get_cuda_rng_tracker().get_states = lambda: {_NO_CUDA_GENERATOR: torch.empty(0, dtype=torch.uint8)}
        _megatron_lm_enabled = True
    return True
