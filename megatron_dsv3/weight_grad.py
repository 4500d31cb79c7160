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

Transformer Engine modules (the `te` specs: TE Linear / LayerNormLinear and the grouped
experts' GroupedLinear) defer through TE's own mechanism, `delay_wgrad_compute` and
`backward_dw()` (TE >= 2.3), as Megatron's combined-1F1B schedule does. Megatron turns it on
only with `config.delay_wgrad_compute`, which it accepts only together with
`overlap_moe_expert_parallel_comm` (its own EP overlap), so `enable_weight_grad_deferral` turns
it on per module instead: it gives each TE module a delaying `WeightGradStore` of TE's class
(TE passes the store to its autograd function at forward time), and passes the module's input
through an identity whose backward runs right after the module's own backward, once its dW
is queued in TE's store. There, inside a capture (and for the weights `only` accepts), a
closure is queued that calls TE's `backward_dw()` at the W; outside one, it calls it at once,
so an undeferred backward still computes every dW. The identity also takes that use's entries
out of TE's first-in-first-out store, and the closure puts them back alone before it calls
`backward_dw()`, so each W computes its own use's dW whatever ran in between (an undeferred
backward, the FB overlap's expert W's). `backward_dw()` writes `weight.grad` (overwriting: TE
relies on DDP's hook to move it to main_grad); the closure keeps what `.grad` held, takes TE's
result and hands it to autograd like the local linears' dW, so accumulation and DDP's hook are
the same as above (a DDP hook TE fires itself, `register_wgrad_accumulation_and_reduce_hooks`,
leaves `.grad` empty and nothing is handed on). Megatron's TE wrappers gate `backward_dw()` on `config.delay_wgrad_compute`, so the
closure calls the first `backward_dw` in the module's class hierarchy defined outside
Megatron (TE's). TE's deferred B returns no weight gradient (None); for a DDP-managed weight a
pre-hook on its AccumulateGrad node then sets the placeholder and `grad_added_to_main_grad`, as
the local linears do, since DDP's hook asserts a gradient under overlap_grad_reduce. Limits:
TE's fused wgrad accumulation is gradient_accumulation_fusion (refused by `check_deferrable`);
Userbuffers TP overlap (`ub_bulk_wgrad`) has no delayed path in TE; TE's fusible operations
(`te.ops`, Megatron's fused grouped-MLP option) are left undeferred. Not run with TE here (no
GPU): tests/gpu/test_te_weight_grad.py checks it against a stand-in with TE's store semantics
on CPU and against TE itself where CUDA and TE are.

Megatron's local `wgrad_deferral_limit` only defers the output-embedding GEMM with
gradient_accumulation_fusion, for the TP overlap, not per module.
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
        pairs = compute() if isinstance(compute, _TEWeightGrads) else [(weight, compute())]
        for weight, grad in pairs:
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
    classes; our FP8 subclasses defer by themselves) through `defer_or_compute`, and those of its
    Transformer Engine modules through TE's `backward_dw` (design note). In place, idempotent.
    Frozen weights keep Megatron's path (no weight gradient to defer)."""
    for module in model.modules():
        if type(module) in (ColumnParallelLinear, RowParallelLinear) and "_forward_impl" not in vars(module):
            module._forward_impl = _deferrable_forward_impl(module)
        elif is_te_deferrable(module) and not getattr(module, "_dsv3_te_deferral", False):
            _enable_te_deferral(module)


def _deferrable_forward_impl(module):
    megatron_forward_impl = type(module)._forward_impl.__get__(module)

    def forward_impl(input, weight, *args, **kwargs):
        if not weight.requires_grad:
            return megatron_forward_impl(input, weight, *args, **kwargs)
        return deferrable_linear(input, weight, *args, **kwargs)

    return forward_impl


# --- Transformer Engine modules: TE's delay_wgrad_compute / backward_dw (design note)


def is_te_deferrable(module: torch.nn.Module) -> bool:
    """A TE module (a TransformerEngineBaseModule: Linear, LayerNormLinear, GroupedLinear, ...)
    with TE's split backward: a `wgrad_store` (TE's WeightGradStore) and `backward_dw`. TE's
    fusible operations (`te.ops`, run by their Sequential, not by `forward`) are not: they keep
    their undeferred backward."""
    store = getattr(module, "wgrad_store", None)
    return (
        any(cls.__name__ == "TransformerEngineBaseModule" for cls in type(module).__mro__)
        and store is not None and hasattr(store, "delay_wgrad_compute") and callable(getattr(module, "backward_dw", None))
    )


def _te_backward_dw(module: torch.nn.Module):
    """TE's own `backward_dw` of `module`: the first in its class hierarchy defined outside Megatron
    (Megatron's TE wrappers do nothing unless config.delay_wgrad_compute)."""
    for cls in type(module).__mro__:
        if "backward_dw" in vars(cls) and not cls.__module__.startswith("megatron."):
            return vars(cls)["backward_dw"].__get__(module)
    raise TypeError(f"{type(module).__name__} has no backward_dw outside Megatron's wrappers (is it a TE module?)")


class _TEWeightGrads:
    """The W of one use of a TE module: `entries` are what TE's backward queued in the module's
    store for that use (taken out at once, so that each W computes its own use's dW whatever
    ran in between); TE's `backward_dw` computes them. Returns [(parameter, gradient)] for
    `_accumulate`, leaving each `.grad` as it was."""

    def __init__(self, module: torch.nn.Module, entries: list | None):
        self.module, self.entries = module, entries

    def __call__(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        params = [p for p in self.module.parameters() if p.requires_grad]
        held = [p.grad for p in params]
        for p in params:
            p.grad = None
        queue = _store_queue(self.module)
        others = None
        try:
            if self.entries is not None:
                others = list(queue)
                queue.clear()
                queue.extend(self.entries)
            _te_backward_dw(self.module)()
            pairs = [(p, p.grad) for p in params if p.grad is not None]
        finally:
            for p, grad in zip(params, held):
                p.grad = grad
            if others is not None:
                queue.clear()
                queue.extend(others)
        return pairs


def _store_queue(module: torch.nn.Module):
    """The deque under TE's WeightGradStore (a queue.Queue in `context`), or None."""
    return getattr(getattr(module.wgrad_store, "context", None), "queue", None)


def _take_entries(module: torch.nn.Module) -> list | None:
    """Everything in the module's TE store: the use whose backward just ran (the others were
    taken when theirs ran). None where the store is not the queue this was written against."""
    queue = _store_queue(module)
    if queue is None:
        return None
    entries = list(queue)
    queue.clear()
    return entries


def _first_weight(module: torch.nn.Module) -> torch.Tensor | None:
    return next((p for p in module.parameters() if p.requires_grad), None)


class _TEBackwardDone(torch.autograd.Function):
    """Identity on a TE module's input; its backward runs once the module's backward has queued
    its dW in TE's store: the W is queued in the capture, or run at once outside one."""

    @staticmethod
    def forward(ctx, module, x, anchor):
        ctx.module = module
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad_x):
        module = ctx.module
        weight = _first_weight(module)
        w = _TEWeightGrads(module, _take_entries(module))
        if _capturing is not None and (_capturing[1] is None or _capturing[1](weight)):
            _capturing[0].append((weight, w))
        else:
            pairs = w()
            for p, _ in pairs:
                if hasattr(p, "grad_added_to_main_grad"):
                    p.grad_added_to_main_grad = False
            if pairs:
                torch.autograd.backward([p for p, _ in pairs], [g for _, g in pairs])
        return None, grad_x, None


def _enable_te_deferral(module: torch.nn.Module) -> None:
    store = module.wgrad_store
    if not store.delay_wgrad_compute():
        module.wgrad_store = type(store)(delay_wgrad_compute=True)  # TE's class; TE >= 2.3
    anchor = torch.zeros((), requires_grad=True)  # makes the identity's output need a gradient
    te_forward = module.forward

    def forward(x, *args, **kwargs):
        if torch.is_grad_enabled() and _first_weight(module) is not None:
            x = _TEBackwardDone.apply(module, x, None if x.requires_grad else anchor)
        return te_forward(x, *args, **kwargs)

    module.forward = forward
    # TE's deferred B gives a DDP-managed weight no gradient; DDP's hook wants one under
    # overlap_grad_reduce: the local linears' placeholder instead (design note)
    module._dsv3_grad_accs = []
    for p in module.parameters():
        if p.requires_grad:
            grad_acc = p.expand_as(p).grad_fn.next_functions[0][0]
            grad_acc.register_prehook(_placeholder_for_no_gradient(p))
            module._dsv3_grad_accs.append(grad_acc)
    module._dsv3_te_deferral = True


def _placeholder_for_no_gradient(param: torch.Tensor):
    def prehook(grad_outputs):
        if grad_outputs[0] is None and hasattr(param, "grad_added_to_main_grad") and param.grad is None:
            param.grad = torch.empty_like(param)
            param.grad_added_to_main_grad = True
        return None

    return prehook
