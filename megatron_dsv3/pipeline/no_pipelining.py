"""Megatron's no-pipelining schedule, device-agnostic.

Upstream `forward_backward_no_pipelining` allocates its token counter with `device="cuda"`;
this one takes the device from the tensors it handles, so it also runs on CPU. It keeps the
upstream contract: same signature, loss dicts returned, `schedules.forward_step` /
`backward_step` reused (they set the MoE and MTP loss scales), `no_sync_func` around all but
the last micro-batch, and `finalize_model_grads_func` once per global batch.
"""

from __future__ import annotations

import contextlib

import torch
from megatron.core.pipeline_parallel.schedules import backward_step, forward_step
from megatron.core.utils import get_model_config


def forward_backward_no_pipelining(
    *,
    forward_step_func,
    data_iterator,
    model,
    num_microbatches: int,
    seq_length: int,  # unused, as upstream
    micro_batch_size: int,  # unused, as upstream
    decoder_seq_length=None,
    forward_only: bool = False,
    collect_non_loss_data: bool = False,
    first_val_step=None,
    adjust_tensor_shapes_fn=None,
    p2p_communicator=None,
    pg_collection=None,
    force_all_reduce: bool = False,
):
    if isinstance(model, list):
        if len(model) != 1:
            raise ValueError(f"model has {len(model)} chunks: the no-pipelining schedule runs exactly one")
        model = model[0]
    if isinstance(data_iterator, list):
        data_iterator = data_iterator[0]
    if adjust_tensor_shapes_fn is not None:
        raise ValueError("adjust_tensor_shapes_fn is not supported without pipelining")
    config = get_model_config(model)
    no_sync = config.no_sync_func or contextlib.nullcontext
    cp_size = pg_collection.cp.size() if pg_collection is not None else 1

    losses = []
    total_num_tokens = None
    for i in range(num_microbatches):
        last = i == num_microbatches - 1
        # Gradient sync happens on the last micro-batch's backward only.
        with contextlib.nullcontext() if last else no_sync():
            output_tensor, num_tokens = forward_step(
                forward_step_func,
                data_iterator,
                model,
                num_microbatches,
                None,
                losses,
                config,
                cp_size,
                collect_non_loss_data,
                is_first_microbatch=i == 0 and not forward_only,
                current_microbatch=i,
            )
            num_tokens = torch.as_tensor(num_tokens)
            total_num_tokens = num_tokens if total_num_tokens is None else total_num_tokens + num_tokens
            if not forward_only:
                backward_step(None, output_tensor, None, config)
            del output_tensor

    if config.finalize_model_grads_func is not None and not forward_only:
        config.finalize_model_grads_func(
            [model],
            total_num_tokens if config.calculate_per_token_loss else None,
            pg_collection=pg_collection,
            force_all_reduce=force_all_reduce,
        )
    return losses
