"""Deferred weight gradients (a B now, its W later) equal immediate ones bit for bit."""

import contextlib

import pytest
import torch
from megatron.core.tensor_parallel.layers import linear_with_grad_accumulation_and_async_allreduce

from megatron_dsv3.fp8.linear import fp8_linear
from megatron_dsv3.weight_grad import PendingWeightGrads, WeightGradStore, deferrable_linear, enable_weight_grad_deferral

SEQ, MICRO_BATCH = 32, 2


def _megatron_linear(x, w, b):
    return linear_with_grad_accumulation_and_async_allreduce(x, w, b, gradient_accumulation_fusion=False, allreduce_dgrad=False, sequence_parallel=False)


def _our_linear(x, w, b):
    return deferrable_linear(x, w, b, gradient_accumulation_fusion=False, allreduce_dgrad=False, sequence_parallel=False)


def _fp8(x, w, b):
    return fp8_linear(x, w, b, backend="emulate")


def _grads(linear, x, w, b, dy, store=None):
    """(dx, dW, db) of two uses of `linear` (the weight's gradients summed, as for a shared
    output head); with `store`, dW is deferred to a W run after the B."""
    x, w, b = (t.detach().clone().requires_grad_() for t in (x, w, b))
    y = linear(x, w, b) + linear(x * 2, w, b)
    if store is None:
        y.backward(dy)
    else:
        with store.capture(("chunk", 0)):
            y.backward(dy)
        assert w.grad is None and x.grad is not None and b.grad is not None  # B: inputs and bias only
        store.run(("chunk", 0))
    return x.grad, w.grad, b.grad


@pytest.mark.parametrize("linear", [_our_linear, _fp8], ids=["megatron-ops", "fp8"])
def test_deferred_weight_gradient_of_one_linear_is_bit_identical(linear):
    generator = torch.Generator().manual_seed(0)
    x, dy = torch.randn(SEQ, MICRO_BATCH, 256, generator=generator), torch.randn(SEQ, MICRO_BATCH, 128, generator=generator)
    w, b = torch.randn(128, 256, generator=generator), torch.randn(128, generator=generator)
    immediate = _grads(linear, x, w, b, dy)
    store = WeightGradStore()
    deferred = _grads(linear, x, w, b, dy, store)
    assert len(store) == 0
    for got, want in zip(deferred, immediate):
        assert torch.equal(got, want)
    if linear is _our_linear:  # the same ops as Megatron's own linear, so the same bits
        for got, want in zip(immediate, _grads(_megatron_linear, x, w, b, dy)):
            assert torch.equal(got, want)


def test_pending_weight_gradients_defer_only_the_chosen_weights_and_equal_immediate_ones():
    """Two linears in a row; the second's weight is deferred and computed once the backward
    has passed it (as the FB overlap defers the experts' before the dispatch's backward)."""
    generator = torch.Generator().manual_seed(1)
    x, dy = torch.randn(SEQ, MICRO_BATCH, 128, generator=generator), torch.randn(SEQ, MICRO_BATCH, 128, generator=generator)
    weights = [torch.randn(128, 128, generator=generator) for _ in range(2)]

    w1, w2 = (w.clone().requires_grad_() for w in weights)
    _our_linear(_our_linear(x, w1, None), w2, None).backward(dy)
    immediate = w1.grad, w2.grad

    w1, w2 = (w.clone().requires_grad_() for w in weights)
    pending = PendingWeightGrads(only=lambda weight: weight is w2)
    with pending.capturing():
        _our_linear(_our_linear(x, w1, None), w2, None).backward(dy)
    assert w2.grad is None and w1.grad is not None  # only w2 waits
    pending.run()
    assert torch.equal(w1.grad, immediate[0]) and torch.equal(w2.grad, immediate[1])
    with pending.capturing():  # w2 used again in the same backward after its run: refused
        _our_linear(x, w2, None).backward(dy)
        with pytest.raises(RuntimeError, match="used again after its gradient was computed"):
            pending.run()


def test_w_must_follow_its_b_first_in_first_out():
    store = WeightGradStore()
    with store.capture(("chunk", 0)):
        pass
    with pytest.raises(RuntimeError, match=r"oldest deferred B is \('chunk', 0\)"):
        store.run(("chunk", 1))
    with pytest.raises(RuntimeError, match="no deferred weight gradients are queued"):
        store.run(("chunk", 1))


def _tiny_ddp(fp8, overlap: bool):
    from megatron.core import tensor_parallel
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from megatron_dsv3.config import preset
    from megatron_dsv3.specs import gpt_model

    torch.manual_seed(0)
    tensor_parallel.random.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
    config = preset("tiny-fp8", seq_length=SEQ, fp8_blockwise=fp8) if fp8 else preset("tiny", seq_length=SEQ)
    return DistributedDataParallel(config, DistributedDataParallelConfig(overlap_grad_reduce=overlap), gpt_model(config))


def _train_two_steps(model, vocab_size: int, deferred: bool) -> dict:
    """Two global batches of three micro-batches. Deferred: all B's, then the W's in order,
    the last micro-batch's B and W outside no_sync (as the DualPipeV executor does)."""
    generator = torch.Generator().manual_seed(1)
    store = WeightGradStore()
    for _ in range(2):
        model.zero_grad_buffer()
        for microbatch in range(3):
            tokens = torch.randint(0, vocab_size, (MICRO_BATCH, SEQ), generator=generator)
            last = microbatch == 2
            with contextlib.nullcontext() if last else model.no_sync():
                loss = model(tokens, torch.arange(SEQ).expand(MICRO_BATCH, SEQ), None, labels=torch.roll(tokens, -1, 1)).sum()
                if deferred:
                    with store.capture(microbatch):
                        loss.backward()
                else:
                    loss.backward()
        if deferred:  # B's done: the linears' weights have no gradient yet, the rest do
            weights = {n: p.main_grad for n, p in model.module.named_parameters() if n.endswith("linear_fc1.weight")}
            assert weights and all(not g.any() for g in weights.values())
            assert model.module.embedding.word_embeddings.weight.main_grad.any()
            for microbatch in range(3):
                with contextlib.nullcontext() if microbatch == 2 else model.no_sync():
                    store.run(microbatch)
        model.finish_grad_sync()
    return {n: p.main_grad.clone() for n, p in model.module.named_parameters()}


@pytest.mark.parametrize("fp8, overlap", [(None, True), (None, False), ("emulate", True)], ids=["fp32-overlap", "fp32", "fp8-overlap"])
def test_deferred_weight_gradients_of_the_tiny_model_are_bit_identical(fp8, overlap):
    """Every linear of the tiny model (MLA, dense and expert MLPs, shared experts, MTP, output
    head) deferred through DDP's main_grad equals Megatron's own immediate backward."""
    reference = _tiny_ddp(fp8, overlap)
    deferred = _tiny_ddp(fp8, overlap)
    enable_weight_grad_deferral(deferred)
    vocab_size = reference.module.config.vocab_size
    want = _train_two_steps(reference, vocab_size, deferred=False)
    got = _train_two_steps(deferred, vocab_size, deferred=True)
    assert got.keys() == want.keys()
    differing = [n for n in want if not torch.equal(got[n], want[n])]
    assert differing == []
    linear_weights = [n for n in want if n.endswith("linear_fc1.weight") or n.endswith("output_layer.weight")]
    assert linear_weights and all(want[n].abs().sum() > 0 for n in linear_weights)
