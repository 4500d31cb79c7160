"""DualPipeV executor: Megatron's forward_backward_func contract over `dualpipev_order`.

Design note
-----------
Placement (schedule.py, layout.py). P pipeline ranks (Megatron's pipeline group), 2P stages
in a V: rank r holds `model[0]` = stage r and `model[1]` = stage 2P-1-r. Micro-batches go
down through the chunks 0 (rank 0 -> P-1), turn on rank P-1 (its chunk 0 output is its
chunk 1 input, no communication), and come back up through the chunks 1 (rank P-1 -> 0);
the loss is computed on rank 0 after chunk 1. Gradients flow the other way.

Execution. Each rank walks its own `dualpipev_order(P, M)[rank]`, one action at a time:
  F          receive the input (or take it from the V turn), `schedules.forward_step`,
             send the output (or keep it for the V turn / the loss);
  B          receive the output gradient (or take it from the V turn / none for the loss),
             `schedules.backward_step` inside `WeightGradStore.capture`, send the input
             gradient: the linears' weight GEMMs are queued, not run (weight_grad.py);
  W          run the oldest queued B's weight GEMMs (first in, first out; it is this W's);
  BW         as B, but the weight gradients are computed at once (a full backward);
  FB         the forward, then a full backward (no overlap yet).
Reusing Megatron's forward_step / backward_step sets the MoE and MTP loss scales, divides
the loss by the micro-batch count and applies `grad_scale_func`, as upstream schedules do.
Sends are non-blocking and receives block (comm.py), so a rank waits only for what its next
action needs; the order is deadlock-free under that rule (simulate.py replays it).

The executor gives each chunk's local linears the deferrable forward at the start of a run
(`enable_weight_grad_deferral`, idempotent). Deferred weight gradients reach DDP's main_grad
through autograd and DDP's own hook, each weight's once per micro-batch as in a full
backward, so the gradients are bit-identical to a run without deferral (weight_grad.py).
DDP's sync of a chunk must see the B and the W of its last micro-batch: both run outside
`no_sync`.
Next: FB through a module's `overlapped_forward_backward`.

Failures. A rank that raises stops sending; its neighbours' receives then fail, at once if
its process has exited, else after the pipeline group's timeout (comm.py), and the error
spreads rank by rank the same way: every rank raises, within at most about P timeouts.

Contract (DESIGN.md, "Contracts a Megatron schedule must honour"):
  - Loss dicts. Megatron's `is_pipeline_last_stage` is true on rank P-1, and Megatron-LM
    reads the losses there; DualPipeV computes them on rank 0. So at the end rank 0 sends
    them (with the token count) to rank P-1, which returns them, one per micro-batch; the
    other ranks return []. With P = 1 rank 0 is both.
  - `no_sync_func` (one callable, or one per chunk) holds DDP's gradient sync off except
    during each chunk's last backward; `grad_sync_func` (if set) is called per chunk at the
    end; `param_sync_func` (if set) per chunk at the start.
  - `finalize_model_grads_func` once per global batch (not in forward_only). The embedding
    is one module on rank 0, used by chunk 0 and by the MTP block of chunk 1 (layout.py):
    no first/last-stage copy to all-reduce. Megatron's embedding group must therefore be
    rank 0 alone (`layout.dualpipev_embedding_ranks`); its default, ranks 0 and P-1, is
    rejected (ValueError) since rank P-1 holds no embedding and the all-reduce would hang.
Not supported yet (ValueError): adjust_tensor_shapes_fn. Ignored as by no-pipelining:
decoder_seq_length (no encoder), first_val_step, p2p_communicator (its one-chunk-per-rank
send/recv pairs do not express the V; comm.py communicates over the same pipeline group).
"""

from __future__ import annotations

import contextlib

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel.schedules import backward_step, forward_step
from megatron.core.utils import get_model_config, get_pg_size

from megatron_dsv3.pipeline.comm import ACTIVATION, GRADIENT, NeighbourP2P
from megatron_dsv3.pipeline.schedule import dualpipev_order, validate_dualpipev
from megatron_dsv3.pipeline.weight_grad import WeightGradStore, enable_weight_grad_deferral


def forward_backward_dualpipev(
    *,
    forward_step_func,
    data_iterator,
    model,
    num_microbatches: int,
    seq_length: int,
    micro_batch_size: int,
    decoder_seq_length=None,
    forward_only: bool = False,
    collect_non_loss_data: bool = False,
    first_val_step=None,
    adjust_tensor_shapes_fn=None,
    p2p_communicator=None,
    pg_collection=None,
    force_all_reduce: bool = False,
):
    group = pg_collection.pp if pg_collection is not None else parallel_state.get_pipeline_model_parallel_group()
    num_ranks, rank = group.size(), group.rank()
    embedding_group = pg_collection.embd if pg_collection is not None else parallel_state.get_embedding_group(check_initialized=False)
    _check_setup(model, data_iterator, num_ranks, num_microbatches, adjust_tensor_shapes_fn, get_pg_size(embedding_group))
    config = get_model_config(model[0])
    executor = _RankExecutor(
        model=model,
        config=config,
        feed=_MicrobatchFeed(data_iterator),
        p2p=NeighbourP2P(group, _boundary_shape(config, seq_length, micro_batch_size, pg_collection), _boundary_dtype(config), next(model[0].parameters()).device),
        rank=rank,
        num_ranks=num_ranks,
        forward_step_func=forward_step_func,
        num_microbatches=num_microbatches,
        cp_size=pg_collection.cp.size() if pg_collection is not None else parallel_state.get_context_parallel_world_size(),
        forward_only=forward_only,
        collect_non_loss_data=collect_non_loss_data,
    )
    executor.run(dualpipev_order(num_ranks, num_microbatches)[rank])
    losses, total_num_tokens = _move_losses_to_last_stage(executor, group)

    if config.finalize_model_grads_func is not None and not forward_only:
        config.finalize_model_grads_func(
            model,
            total_num_tokens if config.calculate_per_token_loss else None,
            pg_collection=pg_collection,
            force_all_reduce=force_all_reduce,
        )
    return losses


def _check_setup(model, data_iterator, num_ranks: int, num_microbatches: int, adjust_tensor_shapes_fn, embedding_group_size: int) -> None:
    """Reject what DualPipeV cannot run, before any communication."""
    if not isinstance(model, list) or len(model) != 2:
        count = len(model) if isinstance(model, list) else "not a list of"
        raise ValueError(
            f"model has {count} chunks: DualPipeV runs exactly two per rank (stage r and stage 2P-1-r). "
            "Fix: build them with megatron_dsv3.pipeline.layout.dualpipev_chunks."
        )
    validate_dualpipev(num_ranks, num_microbatches)
    if isinstance(data_iterator, list) and len(data_iterator) != 2:
        raise ValueError(
            f"data_iterator is a list of {len(data_iterator)}: give one iterator per chunk (2), or one iterator for both."
        )
    if adjust_tensor_shapes_fn is not None:
        raise ValueError("adjust_tensor_shapes_fn is not supported by the DualPipeV executor yet. Fix: pass None.")
    if embedding_group_size > 1:
        raise ValueError(
            f"Megatron's embedding group has {embedding_group_size} ranks: DualPipeV keeps its one embedding on "
            "pipeline rank 0 (shared by the input and the MTP block), so there is no copy to all-reduce. Fix: "
            "initialize_model_parallel(..., get_embedding_ranks=megatron_dsv3.pipeline.layout.dualpipev_embedding_ranks)."
        )


def _boundary_shape(config, seq_length: int, micro_batch_size: int, pg_collection) -> tuple[int, int, int]:
    """(sequence, micro-batch, hidden) of the tensor between two stages on this rank."""
    cp_size = pg_collection.cp.size() if pg_collection is not None else parallel_state.get_context_parallel_world_size()
    tp_size = pg_collection.tp.size() if pg_collection is not None else parallel_state.get_tensor_model_parallel_world_size()
    sequence = seq_length // cp_size
    if config.sequence_parallel:
        sequence //= tp_size
    return (sequence, micro_batch_size, config.hidden_size)


def _boundary_dtype(config) -> torch.dtype:
    """Megatron's `pipeline_dtype` (required by its config when P > 1), else the params dtype."""
    return config.pipeline_dtype if config.pipeline_dtype is not None else config.params_dtype


class _MicrobatchFeed:
    """The data iterator each forward gets. One iterator per chunk is used as given (each
    chunk forwards its micro-batches in order); one iterator for both is read once per
    micro-batch, when chunk 0 reaches it (it always does first), and replayed to chunk 1."""

    def __init__(self, data_iterator):
        self._per_chunk = data_iterator if isinstance(data_iterator, list) else None
        self._shared = None if isinstance(data_iterator, list) else data_iterator
        self._held: dict[int, object] = {}

    def iterator(self, chunk: int, microbatch: int):
        if self._per_chunk is not None:
            return self._per_chunk[chunk]
        if self._shared is None:
            return None
        if chunk == 0:
            self._held[microbatch] = next(self._shared)
        return iter([self._held[microbatch] if chunk == 0 else self._held.pop(microbatch)])


class _GradSync:
    """DDP's gradient sync held off (`no_sync_func`, entered for every chunk) or let through."""

    def __init__(self, no_sync_func):
        if no_sync_func is None:
            self._funcs = []
        elif isinstance(no_sync_func, list):
            self._funcs = no_sync_func
        else:
            self._funcs = [no_sync_func]
        self._held: contextlib.ExitStack | None = None

    def hold(self) -> None:
        if self._held is None:
            self._held = contextlib.ExitStack()
            for func in self._funcs:
                self._held.enter_context(func())

    def release(self) -> None:
        if self._held is not None:
            self._held.close()
            self._held = None


def _per_chunk(func, num_chunks: int) -> list:
    """A config hook given as one callable or as one per chunk, as a list per chunk."""
    return func if isinstance(func, list) else [func] * num_chunks


class _RankExecutor:
    """Runs one rank's order. Chunk 0 is stage r, chunk 1 stage 2P-1-r (the design note)."""

    def __init__(self, *, model, config, feed, p2p, rank, num_ranks, forward_step_func, num_microbatches, cp_size, forward_only, collect_non_loss_data):
        self.model = model
        self.config = config
        self.feed = feed
        self.p2p = p2p
        self.rank = rank
        self.num_ranks = num_ranks
        self.forward_step_func = forward_step_func
        self.num_microbatches = num_microbatches
        self.cp_size = cp_size
        self.forward_only = forward_only
        self.collect_non_loss_data = collect_non_loss_data
        self.losses: list = []  # filled by forward_step on rank 0's chunk 1
        self.total_num_tokens = torch.zeros((), dtype=torch.int)
        self.is_first = rank == 0  # holds the embedding: chunk 0 takes tokens
        self.turns_the_v = rank == num_ranks - 1  # chunk 0's output is chunk 1's input
        self._saved: dict[tuple[int, int], tuple] = {}  # (chunk, mb) -> (input, output) until backward
        self._turn_activations: dict[int, torch.Tensor] = {}  # mb -> chunk 0 output, on rank P-1
        self._turn_gradients: dict[int, torch.Tensor] = {}  # mb -> chunk 1 input grad, on rank P-1
        self.grad_sync = _GradSync(config.no_sync_func)
        self.weight_grads = WeightGradStore()  # B's deferred weight gradients, until their W

    def run(self, actions) -> None:
        if self.config.param_sync_func is not None:
            for chunk, func in enumerate(_per_chunk(self.config.param_sync_func, len(self.model))):
                func(self.model[chunk].parameters())
        if not self.forward_only:
            for chunk in self.model:
                enable_weight_grad_deferral(chunk)
            self.grad_sync.hold()
        for action in actions:
            for kind, chunk, microbatch in action.computations():
                if kind == "F":
                    self.forward(chunk, microbatch)
                elif kind == "B" and not self.forward_only:
                    self.backward(chunk, microbatch, defer_weight_grads=action.kind == "B")
                elif kind == "W" and action.kind == "W" and not self.forward_only:
                    self.weight_backward(chunk, microbatch)
                # the W of a BW or an FB: computed with its B (a full backward)
        self.p2p.wait_all()
        if len(self.weight_grads):
            raise RuntimeError(f"rank {self.rank}: {len(self.weight_grads)} deferred B's had no W in the order.")
        if not self.forward_only:
            self.grad_sync.release()
            if self.config.grad_sync_func is not None:
                for chunk, func in enumerate(_per_chunk(self.config.grad_sync_func, len(self.model))):
                    func(self.model[chunk].parameters())

    # -- where each chunk's boundary tensors come from and go to ---------------------------

    def _forward_input(self, chunk: int, microbatch: int) -> torch.Tensor | None:
        if chunk == 0:
            return None if self.is_first else self.p2p.recv(self.rank - 1, ACTIVATION)
        if self.turns_the_v:
            return self._turn_activations.pop(microbatch)
        return self.p2p.recv(self.rank + 1, ACTIVATION)

    def _deliver_output(self, chunk: int, microbatch: int, output: torch.Tensor) -> None:
        if chunk == 0:
            if self.turns_the_v:
                self._turn_activations[microbatch] = output.detach()
            else:
                self.p2p.send(output, self.rank + 1, ACTIVATION)
        elif not self.is_first:  # rank 0's chunk 1 output is the loss: kept for the backward
            self.p2p.send(output, self.rank - 1, ACTIVATION)

    def _output_gradient(self, chunk: int, microbatch: int) -> torch.Tensor | None:
        if chunk == 1:
            return None if self.is_first else self.p2p.recv(self.rank - 1, GRADIENT)
        if self.turns_the_v:
            return self._turn_gradients.pop(microbatch)
        return self.p2p.recv(self.rank + 1, GRADIENT)

    def _deliver_input_gradient(self, chunk: int, microbatch: int, gradient: torch.Tensor | None) -> None:
        if chunk == 1:
            if self.turns_the_v:
                self._turn_gradients[microbatch] = gradient
            else:
                self.p2p.send(gradient, self.rank + 1, GRADIENT)
        elif not self.is_first:  # rank 0's chunk 0 starts from tokens: no input gradient
            self.p2p.send(gradient, self.rank - 1, GRADIENT)

    # -- computations ------------------------------------------------------------------------

    def forward(self, chunk: int, microbatch: int) -> None:
        input_tensor = self._forward_input(chunk, microbatch)
        if input_tensor is not None and not self.forward_only:
            input_tensor.requires_grad_()
        computes_loss = self.is_first and chunk == 1
        output, num_tokens = forward_step(
            self.forward_step_func,
            self.feed.iterator(chunk, microbatch),
            self.model[chunk],
            self.num_microbatches,
            input_tensor,
            self.losses,
            self.config,
            self.cp_size,
            self.collect_non_loss_data,
            is_first_microbatch=microbatch == 0 and not self.forward_only,
            current_microbatch=microbatch,
            is_last_stage=computes_loss,
        )
        if computes_loss:
            self.total_num_tokens = self.total_num_tokens + torch.as_tensor(num_tokens).cpu()
        else:
            self._deliver_output(chunk, microbatch, output)
        if not self.forward_only:
            self._saved[chunk, microbatch] = (input_tensor, output)

    def backward(self, chunk: int, microbatch: int, defer_weight_grads: bool) -> None:
        input_tensor, output = self._saved.pop((chunk, microbatch))
        output_gradient = self._output_gradient(chunk, microbatch)
        deferral = self.weight_grads.capture((chunk, microbatch)) if defer_weight_grads else contextlib.nullcontext()
        with self._grad_sync_if_last(microbatch), deferral:
            input_gradient = backward_step(input_tensor, output, output_gradient, self.config)
        self._deliver_input_gradient(chunk, microbatch, input_gradient)

    def weight_backward(self, chunk: int, microbatch: int) -> None:
        with self._grad_sync_if_last(microbatch):
            self.weight_grads.run((chunk, microbatch))

    @contextlib.contextmanager
    def _grad_sync_if_last(self, microbatch: int):
        """DDP syncs a chunk's gradients during its last micro-batch's backward (B and W):
        each chunk's backwards run in micro-batch order, and so do its W's."""
        last = microbatch == self.num_microbatches - 1
        if last:
            self.grad_sync.release()
        try:
            yield
        finally:
            if last:
                self.grad_sync.hold()


def _move_losses_to_last_stage(executor: _RankExecutor, group) -> tuple[list, torch.Tensor]:
    """Rank 0's loss dicts and token count, delivered to rank P-1 (Megatron's last stage)."""
    last = executor.num_ranks - 1
    if last == 0:
        return executor.losses, executor.total_num_tokens
    if executor.rank == 0:
        torch.distributed.send_object_list([executor.losses, executor.total_num_tokens], group=group, group_dst=last)
        return [], executor.total_num_tokens
    if executor.rank == last:
        received = [None, None]
        torch.distributed.recv_object_list(received, group=group, group_src=0)
        return received[0], received[1]
    return [], executor.total_num_tokens
