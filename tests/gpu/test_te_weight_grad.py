"""Zero-bubble W steps of Transformer Engine modules through TE's own `delay_wgrad_compute` /
`backward_dw` (megatron_dsv3/weight_grad.py, design note).

Two kinds of test:
  - `TEStandIn`, a CPU module with TE's split-backward contract as TE 2.x implements it
    (transformer_engine/pytorch/module/base.py: WeightGradStore, need_backward_dw,
    backward_dw; module/linear.py: the store is passed to the autograd function at forward
    time only when it delays, and a delayed backward queues dW and returns no weight
    gradient). It checks our side of the contract anywhere, against the float64 gradients
    written out (dW = dy^T x), and runs without CUDA or TE.
  - TE itself (Linear, LayerNormLinear, GroupedLinear, and the `te`-spec tiny model under
    Megatron DDP), against TE's own undeferred backward: skipped without CUDA and TE.
"""

from __future__ import annotations

import contextlib
import importlib.util
import queue

import pytest
import torch

from megatron_dsv3.weight_grad import PendingWeightGrads, WeightGradStore, enable_weight_grad_deferral, is_te_deferrable

HAVE_CUDA_TE = torch.cuda.is_available() and importlib.util.find_spec("transformer_engine") is not None
needs_te = pytest.mark.skipif(not HAVE_CUDA_TE, reason="needs CUDA and Transformer Engine (pip install -e '.[te]')")


# --- the stand-in: TE's contract, on CPU


class _StandInStore:
    """TE's WeightGradStore, its semantics."""

    def __init__(self, delay_wgrad_compute=False, ub_bulk_wgrad=False):
        self.context = queue.Queue() if delay_wgrad_compute else None
        self.enabled = delay_wgrad_compute

    def delay_wgrad_compute(self):
        return self.enabled

    def put(self, tensor_list, func):
        assert self.enabled
        self.context.put([tensor_list, func])

    def pop(self):
        assert self.enabled
        if self.context.qsize() > 0:
            tensor_list, func = self.context.get()
            return func(*tensor_list), tensor_list
        raise RuntimeError("Pop empty queue.")


class _StandInLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, store):
        ctx.save_for_backward(x, weight)
        ctx.store = store
        return x @ weight.T

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors

        def wgrad_gemm(x, dy):
            return dy.reshape(-1, dy.shape[-1]).T @ x.reshape(-1, x.shape[-1]), None

        if ctx.store is not None and ctx.store.delay_wgrad_compute():
            ctx.store.put([x, dy], wgrad_gemm)
            wgrad = None
        else:
            wgrad, _ = wgrad_gemm(x, dy)
        return dy @ weight, wgrad, None


class TransformerEngineBaseModule(torch.nn.Module):
    """The name of TE's module base class (module/base.py), which TE modules derive from."""


class TEStandIn(TransformerEngineBaseModule):
    """TE's Linear as far as the split backward goes (no bias, no FP8)."""

    def __init__(self, in_features, out_features, generator):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(out_features, in_features, generator=generator, dtype=torch.float64))
        self.wgrad_store = _StandInStore(False)
        self.wgrad_accumulation_and_reduce_hooks = []

    def forward(self, x):
        store = self.wgrad_store if self.wgrad_store.delay_wgrad_compute() else None  # as TE's Linear.forward
        return _StandInLinearFunction.apply(x, self.weight, store)

    def need_backward_dw(self):
        return self.wgrad_store is not None and self.wgrad_store.delay_wgrad_compute()

    def backward_dw(self):
        if not self.need_backward_dw():
            return
        (wgrad, _), _ = self.wgrad_store.pop()
        self.weight.grad = wgrad.to(self.weight.dtype)  # TE overwrites .grad, DDP's hook moves it
        for hook in self.wgrad_accumulation_and_reduce_hooks:
            hook()


class MegatronWrappedStandIn(TEStandIn):
    """Like Megatron's TELinear: backward_dw does nothing unless config.delay_wgrad_compute."""

    def backward_dw(self):
        return None


MegatronWrappedStandIn.__module__ = "megatron.core.extensions.transformer_engine"


def _two_layers(cls=TEStandIn, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.nn.Sequential(cls(16, 24, generator), cls(24, 8, generator))


def _reference_grads(model, x, dy):
    """dW of y = (x W1^T) W2^T written out in float64: dW2 = dy^T h, dW1 = (dy W2)^T x."""
    w1, w2 = (layer.weight.detach() for layer in model)
    h = x @ w1.T
    return (dy @ w2).T @ x, dy.T @ h


def _batch(seed):
    generator = torch.Generator().manual_seed(100 + seed)
    return (torch.randn(12, 16, generator=generator, dtype=torch.float64).requires_grad_(),
            torch.randn(12, 8, generator=generator, dtype=torch.float64))


def _close(a, b):
    return torch.allclose(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cls", [TEStandIn, MegatronWrappedStandIn], ids=["te", "megatron-wrapped"])
def test_outside_a_capture_every_weight_gradient_is_computed_in_the_backward(cls):
    model = _two_layers(cls)
    assert all(is_te_deferrable(layer) for layer in model) and not is_te_deferrable(model)
    enable_weight_grad_deferral(model)
    enable_weight_grad_deferral(model)  # idempotent
    assert all(layer.wgrad_store.delay_wgrad_compute() for layer in model)  # TE's store now delays
    x, dy = _batch(0)
    model(x).backward(dy)
    want = _reference_grads(model, x, dy)
    assert _close(model[0].weight.grad, want[0]) and _close(model[1].weight.grad, want[1])
    assert all(layer.wgrad_store.context.empty() for layer in model)


def test_each_w_computes_its_own_b_whatever_ran_in_between():
    """B0 and B1 captured, an undeferred backward of micro-batch 2, then W0 and W1: each W
    adds its own micro-batch's dW (TE's store is first in, first out: taken per use)."""
    model = _two_layers()
    enable_weight_grad_deferral(model)
    store = WeightGradStore()
    batches = [_batch(mb) for mb in range(3)]
    want = [_reference_grads(model, x, dy) for x, dy in batches]
    for mb in (0, 1):
        x, dy = batches[mb]
        with store.capture(mb):
            model(x).backward(dy)
        assert model[0].weight.grad is None and model[1].weight.grad is None and x.grad is not None  # B: dx only
    x, dy = batches[2]
    model(x).backward(dy)
    assert _close(model[1].weight.grad, want[2][1])
    store.run(0)
    assert _close(model[0].weight.grad, want[2][0] + want[0][0]) and _close(model[1].weight.grad, want[2][1] + want[0][1])
    store.run(1)
    assert _close(model[1].weight.grad, want[2][1] + want[0][1] + want[1][1])
    assert len(store) == 0 and all(layer.wgrad_store.context.empty() for layer in model)


def test_pending_weight_gradients_defer_only_the_chosen_te_weights():
    model = _two_layers()
    enable_weight_grad_deferral(model)
    x, dy = _batch(0)
    want = _reference_grads(model, x, dy)
    pending = PendingWeightGrads(only=lambda weight: weight is model[1].weight)
    with pending.capturing():
        model(x).backward(dy)
    assert model[1].weight.grad is None and _close(model[0].weight.grad, want[0])
    pending.run()
    assert _close(model[1].weight.grad, want[1])


def test_an_input_without_gradient_still_gets_its_weight_gradient():
    model = _two_layers()
    enable_weight_grad_deferral(model)
    x, dy = _batch(0)
    x = x.detach()
    model(x).backward(dy)
    assert _close(model[0].weight.grad, _reference_grads(model, x, dy)[0])


def test_megatron_ddp_with_overlapped_grad_reduce_gets_the_deferred_te_gradients():
    """TE's deferred B returns no weight gradient; DDP's hook asserts one under
    overlap_grad_reduce: the placeholder of the local linears takes its place, and the dW of a
    W, or of an undeferred backward, reaches main_grad through DDP's own hook."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from megatron_dsv3.config import preset

    config = preset("tiny")
    model = _two_layers()
    reference = [layer.weight.detach().clone() for layer in model]
    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(overlap_grad_reduce=True), model)
    enable_weight_grad_deferral(ddp)
    store = WeightGradStore()
    batches = [_batch(mb) for mb in range(2)]
    for _ in range(2):  # DDP learns the ready counts on its first batch
        ddp.zero_grad_buffer()
        (x0, dy0), (x1, dy1) = batches
        with ddp.no_sync():  # micro-batch 0: B deferred, then its W
            with store.capture(0):
                ddp(x0).backward(dy0)
            store.run(0)
        ddp(x1).backward(dy1)  # the last micro-batch, undeferred, where DDP syncs
        ddp.finish_grad_sync()
    for index, layer in enumerate(model):
        layer_weights = [w.clone() for w in reference]
        want = sum(_reference_grads_from(layer_weights, x, dy)[index] for x, dy in batches)
        assert torch.allclose(layer.weight.main_grad.double(), want, rtol=1e-5, atol=1e-6)


def _reference_grads_from(weights, x, dy):
    w1, w2 = weights
    return (dy @ w2).T @ x, dy.T @ (x @ w1.T)


# --- Transformer Engine itself (CUDA)


def _te_module(kind: str):
    import transformer_engine.pytorch as te

    torch.manual_seed(0)
    if kind == "Linear":
        return te.Linear(256, 384, bias=False, params_dtype=torch.float32)
    if kind == "LayerNormLinear":
        return te.LayerNormLinear(256, 384, bias=False, params_dtype=torch.float32)
    return te.GroupedLinear(4, 256, 384, bias=False, params_dtype=torch.float32)


def _te_step(module, kind, x, dy, defer: bool):
    args = (x, [64, 0, 128, 64]) if kind == "GroupedLinear" else (x,)
    store = WeightGradStore()
    with store.capture(0) if defer else contextlib.nullcontext():
        module(*args).backward(dy)
    if defer:
        assert all(p.grad is None for n, p in module.named_parameters() if "weight" in n and "layer_norm" not in n)
        store.run(0)
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


@needs_te
@pytest.mark.parametrize("kind", ["Linear", "LayerNormLinear", "GroupedLinear"])
def test_te_module_deferred_through_backward_dw_equals_its_own_backward(kind):
    x = torch.randn(256, 256, device="cuda")
    dy = torch.randn(256, 384, device="cuda")
    immediate = _te_step(_te_module(kind).cuda(), kind, x.clone().requires_grad_(), dy, defer=False)
    module = _te_module(kind).cuda()
    enable_weight_grad_deferral(module)
    deferred = _te_step(module, kind, x.clone().requires_grad_(), dy, defer=True)
    assert deferred.keys() == immediate.keys()
    for name in immediate:
        assert torch.allclose(deferred[name], immediate[name], rtol=1e-6, atol=1e-6), name


@needs_te
def test_te_spec_tiny_model_deferred_equals_immediate_under_ddp():
    """The `te` specs' tiny model (TE linears, grouped experts) under Megatron DDP with
    overlap_grad_reduce: B's captured, W's after, as the DualPipeV executor runs them."""
    from megatron.core import tensor_parallel
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from megatron_dsv3.config import preset
    from megatron_dsv3.specs import gpt_model

    seq, micro_batch = 32, 2

    def build():
        torch.manual_seed(0)
        tensor_parallel.model_parallel_cuda_manual_seed(0)
        config = preset("tiny", seq_length=seq, transformer_impl="transformer_engine", use_cpu_initialization=False,
                        moe_grouped_gemm=True)
        model = gpt_model(config).cuda()
        return DistributedDataParallel(config, DistributedDataParallelConfig(overlap_grad_reduce=True), model)

    def train(model, deferred):
        generator = torch.Generator().manual_seed(1)
        store = WeightGradStore()
        for _ in range(2):
            model.zero_grad_buffer()
            for mb in range(3):
                tokens = torch.randint(0, 257, (micro_batch, seq), generator=generator).cuda()
                positions = torch.arange(seq, device="cuda").expand(micro_batch, seq)
                with contextlib.nullcontext() if mb == 2 else model.no_sync():
                    loss = model(tokens, positions, None, labels=torch.roll(tokens, -1, 1)).sum()
                    with store.capture(mb) if deferred else contextlib.nullcontext():
                        loss.backward()
            if deferred:
                for mb in range(3):
                    with contextlib.nullcontext() if mb == 2 else model.no_sync():
                        store.run(mb)
            model.finish_grad_sync()
        return {n: p.main_grad.clone() for n, p in model.module.named_parameters()}

    want = train(build(), deferred=False)
    model = build()
    enable_weight_grad_deferral(model)
    assert any(is_te_deferrable(m) for m in model.modules())
    got = train(model, deferred=True)
    bad = [n for n in want if not torch.allclose(got[n], want[n], rtol=1e-5, atol=1e-7)]
    assert bad == []
