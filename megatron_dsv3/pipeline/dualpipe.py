"""DualPipe and DualPipeV executors: Megatron's forward_backward_func contract over their orders.

Design note
-----------
Placement (schedule.py, layout.py). P pipeline ranks (Megatron's pipeline group), two chunks
per rank, `model = [chunk 0, chunk 1]`:
  DualPipeV  2P stages in a V: rank r holds stage r (chunk 0) and stage 2P-1-r (chunk 1).
             Micro-batches go down through the chunks 0 (rank 0 -> P-1), turn on rank P-1 (its
             chunk 0 output is its chunk 1 input, no communication), and come back up through
             the chunks 1 (rank P-1 -> 0); the loss is on rank 0.
  DualPipe   two copies of a P-stage model: rank r holds stage r of direction 0 (chunk 0) and
             stage P-1-r of direction 1 (chunk 1). Micro-batches 0..M/2-1 go down direction 0
             (loss on rank P-1), M/2..M-1 up direction 1 (loss on rank 0). Rank r's chunk 0 and
             rank P-1-r's chunk 1 are mirrors (the same stage): after the last backward their
             expert loads and then their gradients are summed (`_sum_with_mirror`), so both
             copies take the same bias update and optimizer step and stay identical.
A chunk's neighbours are the holders of the previous and the next stage of its direction:
another rank (P2P, comm.py), this rank (the V's turn, kept in a dict), or none (it takes
tokens, or it computes the loss).

Execution. Each rank walks its own order, one action at a time:
  F          receive the input, `schedules.forward_step`, send the output;
  B          receive the output gradient, `schedules.backward_step` inside
             `WeightGradStore.capture`, send the input gradient: the linears' weight GEMMs are
             queued, not run (weight_grad.py);
  W          run the oldest queued B's weight GEMMs (first in, first out; it is this W's);
  BW         as B, but the weight gradients are computed at once (a full backward);
  FB         one micro-batch's forward with another's full backward. If the forward chunk
             (under its DDP wrapper) has `overlapped_forward_backward`, that runs them: it takes
             the keyword arguments of `sequential_forward_backward` (Megatron's
             `combined_forward_backward_step` names: f_model, input_tensor, b_model,
             b_input_tensor, b_output_tensor, b_output_tensor_grad, ...) and returns what it
             returns, (output, num_tokens, input gradient); it may interleave the two
             (attention / dispatch / MLP / combine, PAPER.md §6). Otherwise
             `sequential_forward_backward` runs the forward, then the backward.
Reusing Megatron's forward_step / backward_step sets the MoE and MTP loss scales, divides
the loss by the micro-batch count and applies `grad_scale_func`, as upstream schedules do.
Sends are non-blocking and receives block (comm.py), so a rank waits only for what its next
action needs; the orders are deadlock-free under that rule (simulate.py replays them).

Timeline. Inside `record_timeline()` every rank records each action's wall-clock start and
end on the host; `TimelineRecorder.timeline(group)` gathers them into a `simulate.Timeline`,
the type the simulator returns, for the same bubble / activation measures and
`plot_timeline`. On GPU the host times are those of kernel launches unless something
synchronises (a blocking receive does); on CPU they are the work itself.

The executor gives each chunk's local linears the deferrable forward at the start of a run
(`enable_weight_grad_deferral`, idempotent). Deferred weight gradients reach DDP's main_grad
through autograd and DDP's own hook, each weight's once per micro-batch as in a full
backward, so the gradients are bit-identical to a run without deferral (weight_grad.py).
DDP's sync of a chunk must see the B and the W of its last micro-batch: both run outside
`no_sync`.

Failures. A rank that raises stops sending; its neighbours' receives then fail, at once if
its process has exited, else after the pipeline group's timeout (comm.py), and the error
spreads rank by rank the same way: every rank raises, within at most about P timeouts.

Contract (DESIGN.md, "Contracts a Megatron schedule must honour"):
  - Loss dicts. Megatron's `is_pipeline_last_stage` is true on rank P-1, and Megatron-LM
    reads the losses there. So at the end the ranks that computed losses elsewhere (rank 0)
    send them (with the token count) to rank P-1, which returns them, one per micro-batch in
    micro-batch order; the other ranks return [].
  - `no_sync_func` (one callable, or one per chunk) holds DDP's gradient sync off except
    during each chunk's last backward; `grad_sync_func` (if set) is called per chunk at the
    end; `param_sync_func` (if set) per chunk at the start.
  - `finalize_model_grads_func` once per global batch (not in forward_only). The embedding
    is one module per rank (layout.py): no first/last-stage copy to all-reduce. Megatron's
    embedding group must therefore be rank 0 alone (`layout.dualpipev_embedding_ranks`); its
    default, ranks 0 and P-1, is rejected (ValueError) since the all-reduce would hang.
Not supported yet (ValueError): adjust_tensor_shapes_fn, gradient_accumulation_fusion (its fused
kernel accumulates weight gradients inside the backward). Ignored as by no-pipelining:
decoder_seq_length (no encoder), p2p_communicator (its one-chunk-per-rank
send/recv pairs do not express two chunks; comm.py communicates over the same pipeline group).
On GPU, Megatron's combined-1F1B plans (`TransformerModelChunkSchedulePlan`) are not wired in
as a chunk's `overlapped_forward_backward` yet: they need expert parallelism on GPUs.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel.schedules import backward_step, check_first_val_step, deallocate_output_tensor, forward_step
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.utils import get_attr_wrapped_model, get_model_config, get_pg_size

from megatron_dsv3.pipeline import schedule
from megatron_dsv3.pipeline.comm import ACTIVATION, GRADIENT, NeighbourP2P
from megatron_dsv3.pipeline.simulate import TimedAction, Timeline
from megatron_dsv3.pipeline.weight_grad import WeightGradStore, enable_weight_grad_deferral
from megatron_dsv3.routing import LoadRecordingRouter


@dataclass(frozen=True)
class _TwoChunkSchedule:
    name: str
    layout_builder: str  # the megatron_dsv3.pipeline.layout function building its chunks
    validate: Callable[[int, int], None]
    order: Callable[[int, int], list]
    placement: Callable[[int, int], schedule.Placement]


DUALPIPEV = _TwoChunkSchedule("DualPipeV", "dualpipev_chunks", schedule.validate_dualpipev, schedule.dualpipev_order, schedule.dualpipev_placement)
DUALPIPE = _TwoChunkSchedule("DualPipe", "dualpipe_chunks", schedule.validate_dualpipe, schedule.dualpipe_order, schedule.dualpipe_placement)


def forward_backward_dualpipev(**kwargs):
    """DualPipeV with Megatron's `forward_backward_func` signature and return contract."""
    return _forward_backward(DUALPIPEV, **kwargs)


def forward_backward_dualpipe(**kwargs):
    """DualPipe with Megatron's `forward_backward_func` signature and return contract."""
    return _forward_backward(DUALPIPE, **kwargs)


def _forward_backward(
    spec: _TwoChunkSchedule,
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
    _check_setup(spec, model, data_iterator, num_ranks, num_microbatches, adjust_tensor_shapes_fn, get_pg_size(embedding_group))
    config = get_model_config(model[0])
    placement = spec.placement(num_ranks, num_microbatches)
    executor = _RankExecutor(
        model=model,
        config=config,
        placement=placement,
        feed=_MicrobatchFeed(data_iterator, placement, rank),
        p2p=NeighbourP2P(group, _boundary_shape(config, seq_length, micro_batch_size, pg_collection), _boundary_dtype(config), next(model[0].parameters()).device),
        rank=rank,
        forward_step_func=forward_step_func,
        num_microbatches=num_microbatches,
        cp_size=pg_collection.cp.size() if pg_collection is not None else parallel_state.get_context_parallel_world_size(),
        forward_only=forward_only,
        first_val_step=first_val_step,
        collect_non_loss_data=collect_non_loss_data,
    )
    executor.run(spec.order(num_ranks, num_microbatches)[rank])
    losses, total_num_tokens = _move_losses_to_last_stage(executor, group)

    if not forward_only:
        mirrored = len(placement.microbatches) == 2  # DualPipe: two copies of every stage
        if mirrored:
            _sum_with_mirror([_expert_load_counts(chunk) for chunk in model], group)
        if config.finalize_model_grads_func is not None:
            config.finalize_model_grads_func(
                model,
                total_num_tokens if config.calculate_per_token_loss else None,
                pg_collection=pg_collection,
                force_all_reduce=force_all_reduce,
            )
        if mirrored:  # after DP's reduction (it may still be in flight before finalize); both are sums
            _sum_with_mirror([_gradients(chunk) for chunk in model], group)
    return losses


def _check_setup(spec: _TwoChunkSchedule, model, data_iterator, num_ranks: int, num_microbatches: int, adjust_tensor_shapes_fn, embedding_group_size: int) -> None:
    """Reject what the executor cannot run, before any communication."""
    if not isinstance(model, list) or len(model) != 2:
        got = f"has {len(model)} chunks" if isinstance(model, list) else f"is a {type(model).__name__}, not a list of chunks"
        raise ValueError(
            f"model {got}: {spec.name} runs exactly two per rank. "
            f"Fix: build them with megatron_dsv3.pipeline.layout.{spec.layout_builder}."
        )
    spec.validate(num_ranks, num_microbatches)
    if isinstance(data_iterator, list) and len(data_iterator) != 2:
        raise ValueError(
            f"data_iterator is a list of {len(data_iterator)}: give one iterator per chunk (2), or one iterator for both."
        )
    if adjust_tensor_shapes_fn is not None:
        raise ValueError(f"adjust_tensor_shapes_fn is not supported by the {spec.name} executor yet. Fix: pass None.")
    if embedding_group_size > 1:
        raise ValueError(
            f"Megatron's embedding group has {embedding_group_size} ranks: {spec.name} keeps one embedding per rank "
            "(shared by the input and the MTP block), so there is no first/last-stage copy to all-reduce. Fix: "
            "initialize_model_parallel(..., get_embedding_ranks=megatron_dsv3.pipeline.layout.dualpipev_embedding_ranks)."
        )
    if get_model_config(model[0]).gradient_accumulation_fusion:
        raise ValueError(
            f"gradient_accumulation_fusion=True: {spec.name} defers the local linears' weight gradients (weight_grad.py), "
            "which Megatron's fused accumulation kernel cannot. Fix: gradient_accumulation_fusion=False "
            "(Megatron-LM: --no-gradient-accumulation-fusion)."
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
    chunk forwards its micro-batches in order). One iterator for both yields micro-batches
    0..M-1 in order: it is read ahead as far as a forward needs, and each micro-batch is held
    until every chunk of this rank fed it (DualPipeV: both; DualPipe: one) has taken it."""

    def __init__(self, data_iterator, placement: schedule.Placement, rank: int):
        self._per_chunk = data_iterator if isinstance(data_iterator, list) else None
        self._shared = None if isinstance(data_iterator, list) else data_iterator
        self._takers = [placement.microbatches_of(rank, chunk) for chunk in range(2)]
        self._read = 0
        self._held: dict[int, list] = {}  # micro-batch -> [batch, chunks still to take it]

    def iterator(self, chunk: int, microbatch: int):
        if self._per_chunk is not None:
            return self._per_chunk[chunk]
        if self._shared is None:
            return None
        while self._read <= microbatch:
            takers = sum(self._read in microbatches for microbatches in self._takers)
            self._held[self._read] = [next(self._shared), takers]
            self._read += 1
        held = self._held[microbatch]
        held[1] -= 1
        if held[1] == 0:
            del self._held[microbatch]
        return iter([held[0]])


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


def sequential_forward_backward(*, forward_step_func, data_iterator, f_model, num_microbatches, input_tensor, forward_data_store,
                                b_model, b_input_tensor, b_output_tensor, b_output_tensor_grad, config, current_microbatch,
                                is_first_microbatch, cp_group_size, collect_non_loss_data, is_last_stage):
    """The FB fallback: one micro-batch's forward, then another's full backward (no overlap).
    Returns (output, num_tokens, input gradient), as Megatron's combined_forward_backward_step."""
    output, num_tokens = forward_step(
        forward_step_func, data_iterator, f_model, num_microbatches, input_tensor, forward_data_store, config,
        cp_group_size, collect_non_loss_data, is_first_microbatch=is_first_microbatch,
        current_microbatch=current_microbatch, is_last_stage=is_last_stage,
    )
    input_gradient = backward_step(b_input_tensor, b_output_tensor, b_output_tensor_grad, config)
    return output, num_tokens, input_gradient


def _overlap_hook(chunk) -> Callable | None:
    """The `overlapped_forward_backward` of the chunk's module under its wrappers (DDP), if any."""
    try:
        return get_attr_wrapped_model(chunk, "overlapped_forward_backward")
    except RuntimeError:  # Megatron's lookup raises when no wrapped module has it
        return None


class TimelineRecorder:
    """Wall-clock records of the actions run inside `record_timeline()` on this rank."""

    def __init__(self):
        self.records: list[TimedAction] = []
        self.placement: schedule.Placement | None = None

    def timeline(self, group=None) -> Timeline:
        """Every rank's records of `group` (the pipeline group), times from the earliest start.
        A collective: call it on every rank of the group."""
        gathered = [None] * torch.distributed.get_world_size(group) if group is not None else [self.records]
        if group is not None:
            torch.distributed.all_gather_object(gathered, self.records, group=group)
        records = [record for rank_records in gathered for record in rank_records]
        if not records:
            raise ValueError("no actions were recorded: run the schedule inside record_timeline().")
        origin = min(record.start for record in records)
        shifted = tuple(TimedAction(r.rank, r.action, r.start - origin, r.end - origin) for r in records)
        return Timeline(shifted, self.placement, costs=None)


_recorder: TimelineRecorder | None = None


@contextlib.contextmanager
def record_timeline():
    """Within it, the two-chunk executors record every action they run (see the design note)."""
    global _recorder
    previous, _recorder = _recorder, TimelineRecorder()
    try:
        yield _recorder
    finally:
        _recorder = previous


class _RankExecutor:
    """Runs one rank's order over its two chunks (the design note)."""

    def __init__(self, *, model, config, placement, feed, p2p, rank, forward_step_func, num_microbatches, cp_size, forward_only,
                 first_val_step, collect_non_loss_data):
        self.model = model
        self.config = config
        self.placement = placement
        self.feed = feed
        self.p2p = p2p
        self.rank = rank
        self.forward_step_func = forward_step_func
        self.num_microbatches = num_microbatches
        self.cp_size = cp_size
        self.forward_only = forward_only
        self.first_val_step = first_val_step
        self.collect_non_loss_data = collect_non_loss_data
        self.losses: dict[int, object] = {}  # micro-batch -> loss dict, on the chunks computing the loss
        self.total_num_tokens = torch.zeros((), dtype=torch.int, device=p2p.device)
        holder = {stage: (r, chunk) for r, chunks in enumerate(placement.stage_of) for chunk, stage in enumerate(chunks)}
        last_stage = placement.num_stages - 1
        # per chunk: who holds the previous / next stage of its direction, (rank, chunk) or None
        self.previous = [holder.get((d, s - 1)) if s > 0 else None for d, s in placement.stage_of[rank]]
        self.next = [holder.get((d, s + 1)) if s < last_stage else None for d, s in placement.stage_of[rank]]
        self._saved: dict[tuple[int, int], tuple] = {}  # (chunk, mb) -> (input, output) until backward
        self._local: dict[tuple[str, int, int], torch.Tensor] = {}  # (stream, to chunk, mb) -> tensor kept on this rank
        self.grad_sync = _GradSync(config.no_sync_func)
        self.weight_grads = WeightGradStore()  # B's deferred weight gradients, until their W
        if _recorder is not None:
            _recorder.placement = placement

    def computes_loss(self, chunk: int) -> bool:
        return self.next[chunk] is None

    def run(self, actions) -> None:
        if self.config.param_sync_func is not None:
            for chunk, func in enumerate(_per_chunk(self.config.param_sync_func, len(self.model))):
                func(self.model[chunk].parameters())
        if not self.forward_only:
            for chunk in self.model:
                enable_weight_grad_deferral(chunk)
            self.grad_sync.hold()
        for action in actions:
            start = time.time()
            self.run_action(action)
            if _recorder is not None:
                _recorder.records.append(TimedAction(self.rank, action, start, time.time()))
        self.p2p.wait_all()
        if len(self.weight_grads):
            raise RuntimeError(f"rank {self.rank}: {len(self.weight_grads)} deferred B's had no W in the order.")
        if not self.forward_only:
            self.grad_sync.release()
            if self.config.grad_sync_func is not None:
                for chunk, func in enumerate(_per_chunk(self.config.grad_sync_func, len(self.model))):
                    func(self.model[chunk].parameters())

    def run_action(self, action: schedule.Action) -> None:
        if action.kind == "F" or (self.forward_only and action.kind == "FB"):
            self.forward(action.chunk, action.microbatch)
        elif self.forward_only:
            pass  # B, W, BW
        elif action.kind in ("B", "BW"):
            self.backward(action.chunk, action.microbatch, defer_weight_grads=action.kind == "B")
        elif action.kind == "W":
            self.weight_backward(action.chunk, action.microbatch)
        else:
            self.forward_backward(action)

    # -- where each chunk's boundary tensors come from and go to ---------------------------

    def _receive(self, stream: int, neighbour, chunk: int, microbatch: int) -> torch.Tensor | None:
        if neighbour is None:
            return None
        if neighbour[0] == self.rank:
            return self._local.pop((stream, chunk, microbatch))
        return self.p2p.recv(neighbour[0], stream)

    def _send(self, stream: int, neighbour, microbatch: int, tensor: torch.Tensor | None) -> None:
        if neighbour is None:
            return
        if neighbour[0] == self.rank:
            self._local[stream, neighbour[1], microbatch] = tensor.detach() if stream == ACTIVATION else tensor
        else:
            self.p2p.send(tensor, neighbour[0], stream)

    # -- computations ------------------------------------------------------------------------

    def _forward_inputs(self, chunk: int, microbatch: int) -> dict:
        input_tensor = self._receive(ACTIVATION, self.previous[chunk], chunk, microbatch)
        if input_tensor is not None and not self.forward_only:
            input_tensor.requires_grad_()
        return dict(
            forward_step_func=self.forward_step_func,
            data_iterator=self.feed.iterator(chunk, microbatch),
            num_microbatches=self.num_microbatches,
            input_tensor=input_tensor,
            forward_data_store=[],
            config=self.config,
            current_microbatch=microbatch,
            is_first_microbatch=check_first_val_step(
                self.first_val_step, self.forward_only, microbatch == self.placement.microbatches_of(self.rank, chunk)[0]
            ),
        )

    def _forward_done(self, chunk: int, microbatch: int, inputs: dict, output, num_tokens) -> None:
        if self.computes_loss(chunk):
            self.total_num_tokens = self.total_num_tokens + torch.as_tensor(num_tokens, device=self.p2p.device)
            self.losses[microbatch] = inputs["forward_data_store"][0]
        else:
            # Megatron's Float16Module returns FP32 on its last pipeline rank (P-1), which here is
            # not where the loss is: the boundary's dtype (differentiably, for the backward)
            output = output.to(self.p2p.dtype)
            self._send(ACTIVATION, self.next[chunk], microbatch, output)
            # only its grad_fn is needed now (Megatron's deallocate_pipeline_outputs)
            deallocate_output_tensor(output, self.config.deallocate_pipeline_outputs)
        if not self.forward_only:
            self._saved[chunk, microbatch] = (inputs["input_tensor"], output)

    def forward(self, chunk: int, microbatch: int) -> None:
        inputs = self._forward_inputs(chunk, microbatch)
        output, num_tokens = forward_step(
            model=self.model[chunk], cp_group_size=self.cp_size, collect_non_loss_data=self.collect_non_loss_data,
            is_last_stage=self.computes_loss(chunk), **inputs,
        )
        self._forward_done(chunk, microbatch, inputs, output, num_tokens)

    def _backward_inputs(self, chunk: int, microbatch: int) -> tuple:
        input_tensor, output = self._saved.pop((chunk, microbatch))
        return input_tensor, output, self._receive(GRADIENT, self.next[chunk], chunk, microbatch)

    def backward(self, chunk: int, microbatch: int, defer_weight_grads: bool) -> None:
        input_tensor, output, output_gradient = self._backward_inputs(chunk, microbatch)
        deferral = self.weight_grads.capture((chunk, microbatch)) if defer_weight_grads else contextlib.nullcontext()
        with self._grad_sync_if_last(chunk, microbatch), deferral:
            input_gradient = backward_step(input_tensor, output, output_gradient, self.config)
        self._send(GRADIENT, self.previous[chunk], microbatch, input_gradient)

    def weight_backward(self, chunk: int, microbatch: int) -> None:
        with self._grad_sync_if_last(chunk, microbatch):
            self.weight_grads.run((chunk, microbatch))

    def forward_backward(self, action: schedule.Action) -> None:
        """FB: through the forward chunk's `overlapped_forward_backward` if it has one (the
        design note), else `sequential_forward_backward`."""
        f_chunk, f_microbatch = action.chunk, action.microbatch
        b_chunk, b_microbatch = action.backward_chunk, action.backward_microbatch
        inputs = self._forward_inputs(f_chunk, f_microbatch)
        b_input, b_output, b_output_gradient = self._backward_inputs(b_chunk, b_microbatch)
        run = _overlap_hook(self.model[f_chunk]) or sequential_forward_backward
        with self._grad_sync_if_last(b_chunk, b_microbatch):
            output, num_tokens, input_gradient = run(
                f_model=self.model[f_chunk], b_model=self.model[b_chunk], b_input_tensor=b_input, b_output_tensor=b_output,
                b_output_tensor_grad=b_output_gradient, cp_group_size=self.cp_size,
                collect_non_loss_data=self.collect_non_loss_data, is_last_stage=self.computes_loss(f_chunk), **inputs,
            )
        self._forward_done(f_chunk, f_microbatch, inputs, output, num_tokens)
        self._send(GRADIENT, self.previous[b_chunk], b_microbatch, input_gradient)

    @contextlib.contextmanager
    def _grad_sync_if_last(self, chunk: int, microbatch: int):
        """DDP syncs a chunk's gradients during its last micro-batch's backward (B and W):
        each chunk's backwards run in micro-batch order, and so do its W's."""
        last = microbatch == self.placement.microbatches_of(self.rank, chunk)[-1]
        if last:
            self.grad_sync.release()
        try:
            yield
        finally:
            if last:
                self.grad_sync.hold()


def _move_losses_to_last_stage(executor: _RankExecutor, group) -> tuple[list, torch.Tensor]:
    """Every loss dict and the token count, delivered to rank P-1 (Megatron's last stage) in
    micro-batch order; the other ranks keep none."""
    last = group.size() - 1
    senders = sorted({rank for rank, chunks in enumerate(executor.placement.stage_of)
                      for _, stage in chunks if stage == executor.placement.num_stages - 1} - {last})
    if executor.rank in senders:  # pickled through the CPU: a CUDA tensor would unpickle on this rank's GPU
        payload = [_to_device(executor.losses, torch.device("cpu")), executor.total_num_tokens.cpu()]
        torch.distributed.send_object_list(payload, group=group, group_dst=last)
        return [], executor.total_num_tokens
    if executor.rank != last:
        return [], executor.total_num_tokens
    losses, total_num_tokens = dict(executor.losses), executor.total_num_tokens
    for sender in senders:
        received = [None, None]
        torch.distributed.recv_object_list(received, group=group, group_src=sender)
        losses.update(_to_device(received[0], executor.p2p.device))
        total_num_tokens = total_num_tokens + received[1].to(executor.p2p.device)
    return [losses[microbatch] for microbatch in sorted(losses)], total_num_tokens


def _to_device(losses: dict, device: torch.device) -> dict:
    """{micro-batch: loss dict} with every tensor on `device`."""
    return {
        microbatch: {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in loss.items()} if isinstance(loss, dict) else loss
        for microbatch, loss in losses.items()
    }


# -- DualPipe's mirrored chunks ---------------------------------------------------------------


def _gradients(chunk) -> list[torch.Tensor]:
    """The chunk's accumulated gradients: DDP's `main_grad`, else `.grad` (zeros if none yet)."""
    gradients = []
    for param in chunk.parameters():
        if hasattr(param, "main_grad"):
            gradients.append(param.main_grad)
        else:
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            gradients.append(param.grad)
    return gradients


def _expert_load_counts(chunk) -> list[torch.Tensor]:
    """What the end-of-step bias update and load recording read: tokens per expert of each router."""
    counts = []
    for module in chunk.modules():
        if isinstance(module, TopKRouter) and module.local_tokens_per_expert is not None:
            counts.append(module.local_tokens_per_expert)
        if isinstance(module, LoadRecordingRouter):
            counts.append(module.step_tokens_per_expert)
    return counts


def _sum_with_mirror(tensors_of_chunk: list[list[torch.Tensor]], group) -> None:
    """DualPipe: add the mirror's values in place. Rank r's chunk c and rank P-1-r's chunk 1-c
    are one stage, built alike, so their tensors pair up in order; each side computes
    a + b of the same two numbers, so both copies end bit-identical."""
    partner = group.size() - 1 - group.rank()
    flat = [torch.cat([t.reshape(-1) for t in tensors]) if tensors else None for tensors in tensors_of_chunk]
    if flat[0] is None and flat[1] is None:
        return
    mine = torch.cat([f for f in flat if f is not None])
    theirs = torch.empty_like(mine)
    operations = [torch.distributed.P2POp(torch.distributed.isend, mine, group=group, group_peer=partner),
                  torch.distributed.P2POp(torch.distributed.irecv, theirs, group=group, group_peer=partner)]
    for request in torch.distributed.batch_isend_irecv(operations):
        request.wait()
    sizes = [0 if f is None else f.numel() for f in flat]
    # theirs = [their chunk 0 = my chunk 1's mirror | their chunk 1 = my chunk 0's mirror]
    mirror_of = {1: theirs[: sizes[1]], 0: theirs[sizes[1]:]}
    for chunk, tensors in enumerate(tensors_of_chunk):
        offset = 0
        for tensor in tensors:
            tensor.add_(mirror_of[chunk][offset: offset + tensor.numel()].view_as(tensor))
            offset += tensor.numel()
