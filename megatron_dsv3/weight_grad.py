"""Zero-bubble weight gradients: a backward for inputs (B) now, its weight gradients (W) later.

Design note
-----------
What is deferred. The weight GEMM (dW = dy^T x) of every linear that routes its autograd
through `defer_or_compute`: Megatron's local ColumnParallelLinear / RowParallelLinear once
`enable_weight_grad_deferral` has given them `deferrable_linear` (this covers attention, the
dense MLP, the shared experts and each SequentialMLP expert, MTP's eh_proj and the output
head), and our FP8 linears (fp8/linear.py) always. Everything else (norms, router, biases,
embedding, input gradients) is computed during B as usual.

How. A `WeightGradStore` (DualPipe's name) is a FIFO of (key, closures). Inside
`store.capture(key)` (a B), each such linear's backward queues a closure that computes its
dW from the tensors autograd already holds (dy and the saved input, nothing recomputed) and
returns no real weight gradient. `store.run(key)` (the W) runs the oldest entry's closures in
the order they were queued, sums the dW's of a weight used more than once in that order (as
autograd's input buffer does), and hands each sum to autograd with
`torch.autograd.backward(weight, dW)`. Outside a capture the linear computes dW at once.

Accumulating into Megatron DDP's main_grad. DDP adds `param.grad` to `param.main_grad` in a
post-hook on the weight's AccumulateGrad node, then clears `param.grad`, and with
`overlap_grad_reduce` counts the param ready for its bucket's reduce (and asserts that
`param.grad` is not None). Autograd runs that hook even when a Function returns None for the
weight, so B must not return None for a DDP-wrapped weight. B therefore uses Megatron's own
convention for gradients that bypass autograd (gradient_accumulation_fusion): it returns an
uninitialised placeholder and sets `weight.grad_added_to_main_grad = True`, so the hook adds
nothing. W clears the flag and sends the real dW through the same AccumulateGrad node, so the
hook adds it exactly as in an undeferred backward: the same fp32 GEMM and the same single
`main_grad.add_` per (weight, micro-batch), hence bit-identical gradients. Calling the hook
ourselves (or adding to main_grad directly) would duplicate DDP's bookkeeping; going through
autograd keeps it DDP's. With overlap_grad_reduce a deferred weight is counted ready twice
per last micro-batch (at B and at W); DDP learns these counts on its first batch and starts a
bucket's reduce only once all are reached, i.e. after the W. The executor must therefore run
both the B and the W of each chunk's last micro-batch outside `no_sync`. A weight without
`grad_added_to_main_grad` (no DDP) gets None at B and its dW in `.grad` at W.

Limits (ValueError): tensor parallelism (sequence_parallel, all-reduced dgrad), fused
gradient accumulation (`gradient_accumulation_fusion`) and generalized-TP rematerialisation
are not supported by `deferrable_linear`; DeepSeek-V3 trains without TP.

With Transformer Engine this maps to TE's own mechanism: TE linears built with
`delay_wgrad_compute=True` (Megatron's `config.delay_wgrad_compute`, with
`DistributedDataParallelConfig.delay_wgrad_compute`) skip dW in backward and compute it in
`module.backward_dw()`, which also fires the DDP hook registered through
`register_wgrad_accumulation_and_reduce_hooks`; a W would call `backward_dw()` on the
chunk's TE modules in B order. Megatron's local `wgrad_deferral_limit` only defers the
output-embedding GEMM with gradient_accumulation_fusion, for the TP overlap, not per module.
"""

from __future__ import annotations

import contextlib
from collections import deque
from typing import Callable

import torch
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

from megatron_dsv3.config import ConfigError

# The capture in progress, if any: where closures go, and which weights it defers (None: all).
_capturing: tuple[list, Callable[[torch.Tensor], bool] | None] | None = None


def check_deferrable(config) -> None:
    """The one home of the rule that every entry point of a zero-bubble schedule (the
    executor, the compact loop, the Megatron-LM launch) checks before any work: Megatron's
    fused gradient accumulation adds weight gradients inside the backward, so they cannot be
    deferred to a W."""
    if config.gradient_accumulation_fusion:
        raise ConfigError(
            "gradient_accumulation_fusion", True,
            "DualPipe and DualPipeV defer the local linears' weight gradients (megatron_dsv3.weight_grad), "
            "which Megatron's fused accumulation kernel cannot",
            "gradient_accumulation_fusion=False (Megatron-LM: --no-gradient-accumulation-fusion)",
        )


def defer_or_compute(weight: torch.Tensor, compute: Callable[[], torch.Tensor]) -> torch.Tensor | None:
    """The weight gradient a linear's backward returns: `compute()` now, or, inside a
    `WeightGradStore.capture`, a placeholder while `compute` waits for its W (design note)."""
    if _capturing is None or (_capturing[1] is not None and not _capturing[1](weight)):
        if hasattr(weight, "grad_added_to_main_grad"):
            weight.grad_added_to_main_grad = False  # a deferred B of this weight may have set it
        return compute()
    _capturing[0].append((weight, compute))
    if hasattr(weight, "grad_added_to_main_grad"):
        weight.grad_added_to_main_grad = True
        return torch.empty_like(weight)
    return None


class WeightGradStore:
    """First in, first out queue of deferred weight-gradient closures, one entry per B."""

    def __init__(self):
        self._queue: deque[tuple[object, list]] = deque()

    def __len__(self) -> int:
        return len(self._queue)

    @contextlib.contextmanager
    def capture(self, key):
        """Defer the weight gradients of the backward run inside; `key` names it for `run`."""
        closures: list = []
        with _capture(closures):
            yield
        self._queue.append((key, closures))

    def run(self, key) -> None:
        """Compute and accumulate the oldest entry's weight gradients; it must be `key`'s."""
        if not self._queue:
            raise RuntimeError(f"W for {key}: no deferred weight gradients are queued (its B did not run deferred).")
        queued_key, closures = self._queue.popleft()
        if queued_key != key:
            raise RuntimeError(
                f"W for {key}, but the oldest deferred B is {queued_key}: W's must follow their B's first in, first out."
            )
        _accumulate(closures)


class PendingWeightGrads:
    """Weight gradients deferred within one backward and computed at points of it (`run`), for
    the weights `only` accepts. The FB overlap defers the experts' this way, to compute them
    while the dispatch's backward all-to-all is in flight (report §3.2.1: the MLP's backward
    split into B and W). A weight's uses in one backward must fall between two runs: each run
    accumulates what it computed, and a weight's second run would add in another order."""

    def __init__(self, only: Callable[[torch.Tensor], bool]):
        self._only = only
        self._closures: list = []
        self._ran: set[torch.Tensor] = set()

    def capturing(self):
        return _capture(self._closures, self._only)

    def run(self) -> None:
        closures = list(self._closures)
        self._closures.clear()
        weights = {weight for weight, _ in closures}
        if weights & self._ran:
            raise RuntimeError("a deferred weight was used again after its gradient was computed in this backward.")
        self._ran |= weights
        _accumulate(closures)


@contextlib.contextmanager
def _capture(closures: list, only: Callable[[torch.Tensor], bool] | None = None):
    global _capturing
    if _capturing is not None:
        raise RuntimeError("weight gradients are already being deferred: captures do not nest.")
    _capturing = (closures, only)
    try:
        yield
    finally:
        _capturing = None


def _accumulate(closures: list) -> None:
    """Compute the closures' weight gradients in order, sum those of a weight used more than
    once (as autograd's input buffer does), and hand each sum to autograd (design note)."""
    sums: dict[torch.Tensor, torch.Tensor] = {}
    for weight, compute in closures:
        grad = compute()
        sums[weight] = grad if weight not in sums else sums[weight] + grad
    for weight in sums:
        if hasattr(weight, "grad_added_to_main_grad"):
            weight.grad_added_to_main_grad = False  # let DDP's hook add this real gradient
    if sums:
        torch.autograd.backward(list(sums), list(sums.values()))


class DeferrableLinearFunction(torch.autograd.Function):
    """y = x W^T (+ b) with the ops of Megatron's LinearWithGradAccumulationAndAsyncCommunication
    at TP = 1 without fused accumulation, its weight gradient through `defer_or_compute`."""

    @staticmethod
    def forward(ctx, input, weight, bias):
        ctx.save_for_backward(input, weight)
        ctx.use_bias = bias is not None
        output = torch.matmul(input, weight.t())
        if bias is not None:
            output = output + bias
        return output

    @staticmethod
    def backward(ctx, grad_output):
        input, weight = ctx.saved_tensors
        grad_input = grad_output.matmul(weight)
        grad_output_2d, input_2d = _as_2d(grad_output.contiguous(), input.contiguous())
        grad_weight = defer_or_compute(weight, lambda: grad_output_2d.t().matmul(input_2d))
        grad_bias = grad_output_2d.sum(dim=0) if ctx.use_bias else None
        return grad_input, grad_weight, grad_bias


def _as_2d(grad_output: torch.Tensor, input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, features) views, as Megatron's prepare_input_tensors_for_wgrad_compute."""
    if grad_output.dim() == 3:
        grad_output = grad_output.view(grad_output.shape[0] * grad_output.shape[1], grad_output.shape[2])
        input = input.view(input.shape[0] * input.shape[1], input.shape[2])
    return grad_output, input


def deferrable_linear(input, weight, bias, gradient_accumulation_fusion, allreduce_dgrad, sequence_parallel,
                      grad_output_buffer=None, wgrad_deferral_limit=None, tp_group=None, gtp_remat_size=1):
    """The `_forward_impl` that `enable_weight_grad_deferral` gives Megatron's local linears."""
    unsupported = {
        "gradient_accumulation_fusion": gradient_accumulation_fusion,
        "allreduce_dgrad": allreduce_dgrad,
        "sequence_parallel": sequence_parallel,
        "grad_output_buffer": grad_output_buffer is not None,
        "gtp_remat_size > 1": gtp_remat_size > 1,
    }
    for name, value in unsupported.items():
        if value:
            raise ValueError(
                f"deferred weight gradients: {name}={value} is not supported (TP = 1 linears without fused "
                "gradient accumulation only). Fix: tensor_model_parallel_size=1, sequence_parallel=False, "
                "gradient_accumulation_fusion=False, defer_embedding_wgrad_compute=False."
            )
    return DeferrableLinearFunction.apply(input, weight, bias)


def enable_weight_grad_deferral(model: torch.nn.Module) -> None:
    """Route the weight gradients of `model`'s local Column/RowParallelLinears (exactly those
    classes; our FP8 subclasses defer by themselves) through `defer_or_compute`. In place,
    idempotent. Frozen weights keep Megatron's path (no weight gradient to defer)."""
    for module in model.modules():
        if type(module) in (ColumnParallelLinear, RowParallelLinear) and "_forward_impl" not in vars(module):
            module._forward_impl = _deferrable_forward_impl(module)


def _deferrable_forward_impl(module):
    megatron_forward_impl = type(module)._forward_impl.__get__(module)

    def forward_impl(input, weight, *args, **kwargs):
        if not weight.requires_grad:
            return megatron_forward_impl(input, weight, *args, **kwargs)
        return deferrable_linear(input, weight, *args, **kwargs)

    return forward_impl
