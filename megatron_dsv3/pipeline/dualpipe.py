"""The DualPipe and DualPipeV executor: Megatron's `forward_backward_func` contract over their orders.

Design note
-----------
Placement, orders and the action kinds are described once in docs/pipeline.md; the contract
with Megatron in docs/schedule-contract.md. `forward_backward(schedule, **megatron_kwargs)`
runs one global batch of a two-chunk schedule record (`registry.PipelineSchedule`:
its validation, order, placement and `mirrored`); the registry hands Megatron the record
bound to it (`PipelineSchedule.forward_backward_func`).

A chunk's neighbours (`Neighbour(rank, chunk)`) are the holders of the previous and the
next stage of its direction: another rank (P2P, comm.py), this rank (the V's turn, kept in
a dict), or none (it takes tokens, or it computes the loss). Each rank walks its own order:
  F    receive the input, `schedules.forward_step`, send the output;
  B    receive the output gradient, `schedules.backward_step` inside
       `WeightGradStore.capture`, send the input gradient: the linears' weight GEMMs are
       queued, not run (megatron_dsv3/weight_grad.py);
  W    run the oldest queued B's weight GEMMs (first in, first out: it is this W's);
  BW   as B, with the weight gradients computed at once (a full backward);
  FB   one micro-batch's forward with another's full backward: through the forward
       chunk's `overlapped_forward_backward` (under its DDP wrapper) when it has one, which
       takes the keyword arguments of `sequential_forward_backward` and returns what it
       returns, (output, num_tokens, input gradient); else, with `config.fb_overlap`,
       `overlapped_forward_backward`: the two as tasks that take turns at their
       expert-parallel all-to-alls, the experts' weight GEMMs computed while the dispatch's
       backward exchange is in flight (docs/overlap.md); else `sequential_forward_backward`
       runs the forward, then the backward.
Reusing Megatron's forward_step / backward_step sets the MoE and MTP loss scales, divides
the loss by the micro-batch count and applies `grad_scale_func`, as upstream schedules do.
Sends are non-blocking; receives are posted ahead, each as soon as the one before it from
the same neighbour and stream has been taken, and waited for when an action needs the data
(comm.py), so a rank waits only for what its next action needs; the orders are deadlock-free
under that rule (simulate.py replays them).
DDP's sync of a chunk must see the B and the W of its last micro-batch: both run outside
`no_sync`. DualPipe's mirrors (rank r's chunk 0 and rank P-1-r's chunk 1) sum their expert
loads before `finalize_model_grads` and their gradients after it (`_sum_with_mirror`), so both
copies take the same bias update and optimizer step.

Timeline: pass `timeline=TimelineRecorder()` and every action's host wall-clock start and end
is recorded, with its time blocked on all-to-alls and pipeline receives (overlap/link.py's
clock) and an overlapped FB's hand-overs; `recorder.timeline(group)` gathers them into the
simulator's `Timeline`. On GPU the host times are those of kernel launches unless something
synchronises (a blocking receive does); on CPU they are the work itself.

Failures: a rank that raises stops sending; its neighbours' receives fail at once if its
process has exited, else after the pipeline group's timeout (comm.py), and the error spreads
rank by rank: every rank raises, within at most about P timeouts.

Rejected (ValueError, before any communication): a model that is not two chunks,
micro-batch counts the schedule cannot run, adjust_tensor_shapes_fn, an embedding group
other than pipeline rank 0 alone, gradient_accumulation_fusion. Ignored, as by
no-pipelining: decoder_seq_length (no encoder), p2p_communicator (its one-chunk-per-rank
send/recv pairs do not express two chunks; comm.py uses the same pipeline group).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import NamedTuple

import torch
from megatron.core.pipeline_parallel.schedules import backward_step, check_first_val_step, deallocate_output_tensor, forward_step
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.utils import get_attr_wrapped_model, get_model_config, get_pg_size

from megatron_dsv3.overlap import link
from megatron_dsv3.overlap.handover import Interleave, before_waiting
from megatron_dsv3.pipeline import schedule
from megatron_dsv3.pipeline.comm import ACTIVATION, GRADIENT, NeighbourP2P
from megatron_dsv3.pipeline.simulate import TimedAction, Timeline
from megatron_dsv3.routing import expert_load_counts
from megatron_dsv3.weight_grad import PendingWeightGrads, WeightGradStore, check_deferrable, enable_weight_grad_deferral


def forward_backward(
    spec,
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
    timeline: TimelineRecorder | None = None,
):
    """One global batch of the two-chunk schedule `spec` (its `registry.PipelineSchedule` record,
    which imports this module: hence no annotation), with Megatron's `forward_backward_func`
    signature and return contract; `timeline` records what this rank ran (design note)."""
    groups = _process_groups(pg_collection)
    num_ranks, rank = groups.pp.size(), groups.pp.rank()
    _check_setup(spec, model, data_iterator, num_ranks, num_microbatches, adjust_tensor_shapes_fn, get_pg_size(groups.embd))
    config = get_model_config(model[0])
    placement = spec.placement(num_ranks, num_microbatches)
    if timeline is not None:
        timeline.placement = placement
    executor = _RankExecutor(
        model=model,
        config=config,
        placement=placement,
        feed=_MicrobatchFeed(data_iterator, placement, rank),
        p2p=NeighbourP2P(groups.pp, _boundary_shape(config, seq_length, micro_batch_size, groups), _boundary_dtype(config),
                         next(model[0].parameters()).device),
        rank=rank,
        forward_step_func=forward_step_func,
        num_microbatches=num_microbatches,
        cp_size=groups.cp.size(),
        forward_only=forward_only,
        first_val_step=first_val_step,
        collect_non_loss_data=collect_non_loss_data,
        timeline=timeline,
    )
    executor.run(spec.order(num_ranks, num_microbatches)[rank])
    losses, total_num_tokens = _move_losses_to_last_stage(executor, groups.pp)

    if not forward_only:
        if spec.mirrored:
            _sum_with_mirror([expert_load_counts(chunk) for chunk in model], groups.pp)
        if config.finalize_model_grads_func is not None:
            config.finalize_model_grads_func(
                model,
                total_num_tokens if config.calculate_per_token_loss else None,
                pg_collection=pg_collection,
                force_all_reduce=force_all_reduce,
            )
        if spec.mirrored:  # after DP's reduction (it may still be in flight before finalize); both are sums
            _sum_with_mirror([_gradients(chunk) for chunk in model], groups.pp)
    return losses


def _process_groups(pg_collection: ProcessGroupCollection | None) -> ProcessGroupCollection:
    """The groups the executor uses: the caller's, or Megatron's parallel_state ones."""
    if pg_collection is not None:
        return pg_collection
    return ProcessGroupCollection.use_mpu_process_groups(required_pgs=["pp", "embd", "cp", "tp"])


def _check_setup(spec, model, data_iterator, num_ranks: int, num_microbatches: int, adjust_tensor_shapes_fn,
                 embedding_group_size: int) -> None:
    """Reject what the executor cannot run, before any communication."""
    if not isinstance(model, list) or len(model) != 2:
        got = f"has {len(model)} chunks" if isinstance(model, list) else f"is a {type(model).__name__}, not a list of chunks"
        raise ValueError(
            f"model {got}: {spec.name} runs exactly two per rank. "
            f"Fix: build them with megatron_dsv3.pipeline.layout.{spec.build_chunks.__name__}."
        )
    spec.validate(num_ranks, num_microbatches)
    if isinstance(data_iterator, list) and len(data_iterator) != 2:
        raise ValueError(
            f"data_iterator is a list of {len(data_iterator)}: give one iterator per chunk (2), or one iterator for both."
        )
    if adjust_tensor_shapes_fn is not None:
        raise ValueError(f"adjust_tensor_shapes_fn is not supported by the {spec.name} executor. Fix: pass None.")
    if embedding_group_size > 1:
        raise ValueError(
            f"Megatron's embedding group has {embedding_group_size} ranks: {spec.name} keeps one embedding per rank "
            "(shared by the input and the MTP block), so there is no first/last-stage copy to all-reduce. Fix: "
            f"initialize_model_parallel(..., get_embedding_ranks=megatron_dsv3.pipeline.layout.{spec.get_embedding_ranks.__name__})."
        )
    check_deferrable(get_model_config(model[0]))


def _boundary_shape(config, seq_length: int, micro_batch_size: int, groups: ProcessGroupCollection) -> tuple[int, int, int]:
    """(sequence, micro-batch, hidden) of the tensor between two stages on this rank."""
    sequence = seq_length // groups.cp.size()
    if config.sequence_parallel:
        sequence //= groups.tp.size()
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


def overlapped_forward_backward(*, forward_step_func, data_iterator, f_model, num_microbatches, input_tensor, forward_data_store,
                                b_model, b_input_tensor, b_output_tensor, b_output_tensor_grad, config, current_microbatch,
                                is_first_microbatch, cp_group_size, collect_non_loss_data, is_last_stage, handovers=None,
                                defer_expert_weight_grads=False):
    """The FB step of `config.fb_overlap`: the same forward and backward as
    `sequential_forward_backward`, as two tasks that take turns at their expert-parallel
    all-to-alls (overlap/handover.py), the backward first. Bit for bit the same results.
    `handovers`, a list, receives the (task, label) of every hand-over. With
    `defer_expert_weight_grads` (the executor sets it unless DDP syncs in this backward), the
    experts' weight GEMMs wait until the backward is about to wait for its next all-to-all, the
    dispatch's: the report's W of the MLP, computed while that exchange is in flight."""

    def forward():
        return forward_step(
            forward_step_func, data_iterator, f_model, num_microbatches, input_tensor, forward_data_store, config,
            cp_group_size, collect_non_loss_data, is_first_microbatch=is_first_microbatch,
            current_microbatch=current_microbatch, is_last_stage=is_last_stage,
        )

    def backward():
        if not defer_expert_weight_grads:
            return backward_step(b_input_tensor, b_output_tensor, b_output_tensor_grad, config)
        pending = PendingWeightGrads(only=_is_expert_weight)
        before_waiting(pending.run)
        with pending.capturing():
            input_gradient = backward_step(b_input_tensor, b_output_tensor, b_output_tensor_grad, config)
        pending.run()
        return input_gradient

    interleave = Interleave(names=("forward", "backward"))
    (output, num_tokens), input_gradient = interleave.run(forward, backward, first=1)
    if handovers is not None:
        handovers += interleave.handovers
    return output, num_tokens, input_gradient


def _is_expert_weight(weight: torch.Tensor) -> bool:
    """A routed expert's parameter: Megatron marks them allreduce=False (they sync over the
    expert-data-parallel group)."""
    return not getattr(weight, "allreduce", True)


def _overlap_hook(chunk) -> Callable | None:
    """The `overlapped_forward_backward` of the chunk's module under its wrappers (DDP), if any."""
    try:
        return get_attr_wrapped_model(chunk, "overlapped_forward_backward")
    except RuntimeError:  # Megatron's lookup raises when no wrapped module has it
        return None


class TimelineRecorder:
    """Wall-clock records of the actions this rank ran with `forward_backward(..., timeline=recorder)`."""

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
            raise ValueError("no actions were recorded: pass timeline=recorder to the executor.")
        origin = min(record.start for record in records)
        shifted = tuple(dataclasses.replace(r, start=r.start - origin, end=r.end - origin) for r in records)
        return Timeline(shifted, self.placement, costs=None)


class Neighbour(NamedTuple):
    """The holder of an adjacent stage: pipeline rank and its chunk."""

    rank: int
    chunk: int


@dataclass
class _ForwardInputs:
    """The keyword arguments of Megatron's `forward_step` (and of an FB hook) for one forward."""

    forward_step_func: Callable
    data_iterator: object
    num_microbatches: int
    input_tensor: torch.Tensor | None
    forward_data_store: list
    config: object
    current_microbatch: int
    is_first_microbatch: bool

    def kwargs(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class _RankExecutor:
    """Runs one rank's order over its two chunks (the design note)."""

    model: list
    config: object
    placement: schedule.Placement
    feed: _MicrobatchFeed
    p2p: NeighbourP2P
    rank: int
    forward_step_func: Callable
    num_microbatches: int
    cp_size: int
    forward_only: bool
    first_val_step: bool | None
    collect_non_loss_data: bool
    timeline: TimelineRecorder | None

    def __post_init__(self):
        placement, rank = self.placement, self.rank
        self.losses: dict[int, object] = {}  # micro-batch -> loss dict, on the chunks computing the loss
        self.total_num_tokens = torch.zeros((), dtype=torch.int, device=self.p2p.device)
        holder = {stage: Neighbour(r, chunk) for r, chunks in enumerate(placement.stage_of) for chunk, stage in enumerate(chunks)}
        last_stage = placement.num_stages - 1
        # per chunk: who holds the previous / next stage of its direction, or None
        self.previous: list[Neighbour | None] = [holder.get((d, s - 1)) if s > 0 else None for d, s in placement.stage_of[rank]]
        self.next: list[Neighbour | None] = [holder.get((d, s + 1)) if s < last_stage else None for d, s in placement.stage_of[rank]]
        fed = [placement.microbatches_of(rank, chunk) for chunk in range(len(placement.stage_of[rank]))]
        self._first_microbatch, self._last_microbatch = [mbs[0] for mbs in fed], [mbs[-1] for mbs in fed]
        self._saved: dict[tuple[int, int], tuple] = {}  # (chunk, mb) -> (input, output) until backward
        self._local: dict[tuple[int, int, int], torch.Tensor] = {}  # (stream, to chunk, mb) -> tensor kept on this rank
        self.grad_sync = _GradSync(self.config.no_sync_func)
        self.weight_grads = WeightGradStore()  # B's deferred weight gradients, until their W
        self.handovers: list[tuple[str, str]] = []  # the running action's, when it is an overlapped FB

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
        try:
            self.p2p.expect(self._remote_receives(actions))
            self._run_actions(actions)
        except BaseException:
            self.p2p.abandon()  # its posted receives would take a later step's messages (comm.py)
            raise
        self.p2p.wait_all()
        if len(self.weight_grads):
            raise RuntimeError(f"rank {self.rank}: {len(self.weight_grads)} deferred B's had no W in the order.")
        if not self.forward_only:
            self.grad_sync.release()
            if self.config.grad_sync_func is not None:
                for chunk, func in enumerate(_per_chunk(self.config.grad_sync_func, len(self.model))):
                    func(self.model[chunk].parameters())

    def _run_actions(self, actions) -> None:
        for action in actions:
            self.handovers = []
            if self.timeline is None:
                self.run_action(action)
                continue
            clock, start = link.totals(), time.time()
            self.run_action(action)
            end, spent = time.time(), _spent(clock, link.totals())
            self.timeline.records.append(TimedAction(
                self.rank, action, start, end, a2a_blocked=spent["a2a_blocked"], p2p_blocked=spent["p2p_blocked"],
                a2a_comm=spent["a2a_comm"], handovers=tuple(f"{task}: {label}" for task, label in self.handovers),
            ))

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

    def _remote_receives(self, actions) -> collections.Counter:
        """How many tensors `actions` take from each (other rank, stream): what `_receive` will
        be asked for, so that comm.py can post each receive ahead."""
        receives = collections.Counter()
        for action in actions:
            for kind, chunk, _ in action.computations():
                if kind == "F":
                    stream, neighbour = ACTIVATION, self.previous[chunk]
                elif kind == "B" and not self.forward_only:
                    stream, neighbour = GRADIENT, self.next[chunk]
                else:
                    continue
                if neighbour is not None and neighbour.rank != self.rank:
                    receives[neighbour.rank, stream] += 1
        return receives

    def _receive(self, stream: int, neighbour: Neighbour | None, chunk: int, microbatch: int) -> torch.Tensor | None:
        if neighbour is None:
            return None
        if neighbour.rank == self.rank:
            return self._local.pop((stream, chunk, microbatch))
        return self.p2p.recv(neighbour.rank, stream)

    def _send(self, stream: int, neighbour: Neighbour | None, microbatch: int, tensor: torch.Tensor | None) -> None:
        if neighbour is None:
            return
        if neighbour.rank == self.rank:
            self._local[stream, neighbour.chunk, microbatch] = tensor.detach() if stream == ACTIVATION else tensor
        else:
            self.p2p.send(tensor, neighbour.rank, stream)

    # -- computations ------------------------------------------------------------------------

    def _forward_inputs(self, chunk: int, microbatch: int) -> _ForwardInputs:
        input_tensor = self._receive(ACTIVATION, self.previous[chunk], chunk, microbatch)
        if input_tensor is not None and not self.forward_only:
            input_tensor.requires_grad_()
        return _ForwardInputs(
            forward_step_func=self.forward_step_func,
            data_iterator=self.feed.iterator(chunk, microbatch),
            num_microbatches=self.num_microbatches,
            input_tensor=input_tensor,
            forward_data_store=[],
            config=self.config,
            current_microbatch=microbatch,
            is_first_microbatch=check_first_val_step(self.first_val_step, self.forward_only, microbatch == self._first_microbatch[chunk]),
        )

    def _forward_done(self, chunk: int, microbatch: int, inputs: _ForwardInputs, output, num_tokens) -> None:
        if self.computes_loss(chunk):
            self.total_num_tokens = self.total_num_tokens + torch.as_tensor(num_tokens, device=self.p2p.device)
            self.losses[microbatch] = inputs.forward_data_store[0]
        else:
            # Megatron's Float16Module returns FP32 on its last pipeline rank (P-1), which here is
            # not where the loss is: the boundary's dtype (differentiably, for the backward)
            output = output.to(self.p2p.dtype)
            self._send(ACTIVATION, self.next[chunk], microbatch, output)
            # only its grad_fn is needed now (Megatron's deallocate_pipeline_outputs)
            deallocate_output_tensor(output, self.config.deallocate_pipeline_outputs)
        if not self.forward_only:
            self._saved[chunk, microbatch] = (inputs.input_tensor, output)

    def forward(self, chunk: int, microbatch: int) -> None:
        inputs = self._forward_inputs(chunk, microbatch)
        output, num_tokens = forward_step(
            model=self.model[chunk], cp_group_size=self.cp_size, collect_non_loss_data=self.collect_non_loss_data,
            is_last_stage=self.computes_loss(chunk), **inputs.kwargs(),
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
        run = _overlap_hook(self.model[f_chunk])
        if run is None and getattr(self.config, "fb_overlap", False):
            # DDP counts a deferred weight ready twice where it syncs (weight_grad.py): not in its last backward
            run = functools.partial(overlapped_forward_backward, handovers=self.handovers,
                                    defer_expert_weight_grads=not self._last(b_chunk, b_microbatch))
        run = run or sequential_forward_backward
        with self._grad_sync_if_last(b_chunk, b_microbatch):
            output, num_tokens, input_gradient = run(
                f_model=self.model[f_chunk], b_model=self.model[b_chunk], b_input_tensor=b_input, b_output_tensor=b_output,
                b_output_tensor_grad=b_output_gradient, cp_group_size=self.cp_size,
                collect_non_loss_data=self.collect_non_loss_data, is_last_stage=self.computes_loss(f_chunk), **inputs.kwargs(),
            )
        self._forward_done(f_chunk, f_microbatch, inputs, output, num_tokens)
        self._send(GRADIENT, self.previous[b_chunk], b_microbatch, input_gradient)

    def _last(self, chunk: int, microbatch: int) -> bool:
        return microbatch == self._last_microbatch[chunk]

    @contextlib.contextmanager
    def _grad_sync_if_last(self, chunk: int, microbatch: int):
        """DDP syncs a chunk's gradients during its last micro-batch's backward (B and W):
        each chunk's backwards run in micro-batch order, and so do its W's."""
        last = self._last(chunk, microbatch)
        if last:
            self.grad_sync.release()
        try:
            yield
        finally:
            if last:
                self.grad_sync.hold()


def _spent(before: dict[str, link.Totals], after: dict[str, link.Totals]) -> dict[str, float]:
    """Seconds between two readings of the link's clock: blocked on all-to-alls and on P2P, and
    the all-to-alls' communication time."""
    def change(labels, name):
        return sum(getattr(after[label], name) - getattr(before.get(label, link.Totals()), name) for label in labels)

    all_to_alls = [label for label in after if label != link.P2P]
    p2p = [link.P2P] if link.P2P in after else []
    return {"a2a_blocked": change(all_to_alls, "blocked_s"), "p2p_blocked": change(p2p, "blocked_s"),
            "a2a_comm": change(all_to_alls, "comm_s")}


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
