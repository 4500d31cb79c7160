"""Exponential moving average of the parameters, kept in CPU memory (DeepSeek-V3 report §3.2.3).

DeepSeek-V3 keeps an EMA of the parameters (to estimate the model after learning-rate decay
early) in CPU memory and updates it asynchronously after each step, so that it costs neither
GPU memory nor step time. `ParameterEMA.update()`, called right after `optimizer.step()`:

1. Snapshot: copies the current parameters into CPU buffers of their own dtype. On GPU the
   copies are non-blocking, into pinned buffers, on a side CUDA stream that first waits for
   the optimizer's kernels; an event marks their end and the host returns at once. On CPU the
   snapshot is one memcpy per parameter.
2. Fold: one worker thread (`ThreadPoolExecutor(max_workers=1)`) waits for that event and
   folds the snapshot into the FP32 average, `ema.lerp_(snapshot, 1 - decay)`, i.e.
   ema = decay * ema + (1 - decay) * param. torch releases the GIL inside the op, so the
   training thread meanwhile runs the next step.
3. Ordering: the snapshot buffers are reused, so the next `update()` and every read of the
   average (`wait`, `state_dict`, `load_state_dict`, `copy_to`, `swapped_in`) first waits for
   the fold in flight. On GPU the parameters must not be overwritten while the copies still
   read them: given the optimizer, its next step makes the compute stream wait for the copy
   event (the copy overlaps the next forward and backward); without it the compute stream
   waits right away (the host still does not).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from megatron_dsv3.config import ConfigError


def named_trainable_parameters(model_chunks: torch.nn.Module | Sequence[torch.nn.Module]) -> dict[str, torch.Tensor]:
    """The parameters that require grad; names are prefixed `model<i>.` when there are several chunks
    (Megatron's checkpoint naming of virtual-pipeline chunks). A parameter shared by two chunks counts once."""
    chunks = [model_chunks] if isinstance(model_chunks, torch.nn.Module) else list(model_chunks)
    named, seen = {}, set()
    for index, chunk in enumerate(chunks):
        prefix = f"model{index}." if len(chunks) > 1 else ""
        for name, param in chunk.named_parameters():
            if param.requires_grad and id(param) not in seen:
                seen.add(id(param))
                named[prefix + name] = param
    return named


class ParameterEMA:
    """FP32 exponential moving average of `parameters` in CPU memory, updated in a background thread.

    `parameters`: name -> tensor, or one or more model chunks (see `named_trainable_parameters`).
    `optimizer`: on GPU, the torch optimizer that steps these parameters, so that the snapshot
    copy overlaps the next forward and backward (see the module docstring); ignored on CPU.
    """

    def __init__(
        self,
        parameters: Mapping[str, torch.Tensor] | torch.nn.Module | Sequence[torch.nn.Module],
        decay: float,
        optimizer: torch.optim.Optimizer | None = None,
    ):
        if not 0.0 <= decay < 1.0:
            raise ConfigError(
                "decay", decay, "the EMA decay is a fraction in [0, 1)",
                "pass e.g. decay=0.999 (the average spans about 1 / (1 - decay) steps)",
            )
        self.decay = float(decay)
        self.num_updates = 0
        self._parameters = dict(parameters) if isinstance(parameters, Mapping) else named_trainable_parameters(parameters)
        if not self._parameters:
            raise ValueError("ParameterEMA got no parameters: pass a non-empty name -> tensor mapping or a model with trainable parameters")
        devices = {p.device for p in self._parameters.values()}
        if len(devices) != 1:
            raise ValueError(f"ParameterEMA's parameters are on several devices {sorted(map(str, devices))}: build one EMA per device")
        (self._device,) = devices
        on_gpu = self._device.type == "cuda"
        with torch.no_grad():
            self._averages = {
                name: torch.empty(p.shape, dtype=torch.float32, pin_memory=on_gpu).copy_(p)
                for name, p in self._parameters.items()
            }
        self._snapshots = {
            name: torch.empty(p.shape, dtype=p.dtype, pin_memory=on_gpu) for name, p in self._parameters.items()
        }
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ema-fold")
        self._fold_in_flight: Future | None = None
        if on_gpu:
            self._copy_stream = torch.cuda.Stream(self._device)
            self._snapshot_copied = torch.cuda.Event()
            if optimizer is not None:
                optimizer.register_step_pre_hook(lambda *_: self._make_compute_stream_wait_for_snapshot())
            self._compute_stream_waits_at_optimizer_step = optimizer is not None

    @torch.no_grad()
    def update(self) -> None:
        """Snapshot the parameters and fold them into the average in the background; returns before the fold."""
        self.wait()
        if self._device.type == "cuda":
            self._copy_stream.wait_stream(torch.cuda.current_stream(self._device))
            with torch.cuda.stream(self._copy_stream):
                for name, param in self._parameters.items():
                    self._snapshots[name].copy_(param.detach(), non_blocking=True)
                self._snapshot_copied.record(self._copy_stream)
            if not self._compute_stream_waits_at_optimizer_step:
                self._make_compute_stream_wait_for_snapshot()
        else:
            for name, param in self._parameters.items():
                self._snapshots[name].copy_(param.detach())
        self.num_updates += 1
        self._fold_in_flight = self._worker.submit(self._fold_snapshot_into_average)

    def wait(self) -> None:
        """Block until the update in flight, if any, is folded in (re-raising its error)."""
        if self._fold_in_flight is not None:
            fold, self._fold_in_flight = self._fold_in_flight, None
            fold.result()

    def state_dict(self) -> dict:
        """{"decay", "num_updates", "averages": {parameter name: CPU FP32 tensor}}; the tensors are copies."""
        self.wait()
        return {
            "decay": self.decay,
            "num_updates": self.num_updates,
            "averages": {name: average.clone() for name, average in self._averages.items()},
        }

    def load_state_dict(self, state: Mapping) -> None:
        self.wait()
        if state["decay"] != self.decay:
            raise ValueError(
                f"EMA checkpoint has decay={state['decay']!r}, this run decay={self.decay!r}: "
                "resume with the checkpoint's decay, or start a new average"
            )
        averages = state["averages"]
        if averages.keys() != self._averages.keys():
            missing, unexpected = self._averages.keys() - averages.keys(), averages.keys() - self._averages.keys()
            raise KeyError(f"EMA checkpoint does not match the model: missing {sorted(missing)}, unexpected {sorted(unexpected)}")
        for name, average in self._averages.items():
            if averages[name].shape != average.shape:
                raise ValueError(f"EMA checkpoint's {name} has shape {tuple(averages[name].shape)}, the model's {tuple(average.shape)}")
            average.copy_(averages[name])
        self.num_updates = int(state["num_updates"])

    @torch.no_grad()
    def copy_to(self, parameters: Mapping[str, torch.Tensor]) -> None:
        """Write the averages into `parameters` (same names; cast to each parameter's dtype and device)."""
        self.wait()
        for name, param in parameters.items():
            param.copy_(self._averages[name])

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """Put the averages into the model's parameters for evaluation; restore the training weights bit-exactly after."""
        self.wait()
        # the snapshot buffers are idle after wait() and have the parameters' dtypes: they hold the training weights
        with torch.no_grad():
            for name, param in self._parameters.items():
                self._snapshots[name].copy_(param.detach())
            self.copy_to(self._parameters)
        try:
            yield
        finally:
            with torch.no_grad():
                for name, param in self._parameters.items():
                    param.copy_(self._snapshots[name])

    def _make_compute_stream_wait_for_snapshot(self) -> None:
        torch.cuda.current_stream(self._device).wait_event(self._snapshot_copied)

    def _fold_snapshot_into_average(self) -> None:
        if self._device.type == "cuda":
            self._snapshot_copied.synchronize()
        for name, average in self._averages.items():
            average.lerp_(self._snapshots[name].to(torch.float32), 1.0 - self.decay)
