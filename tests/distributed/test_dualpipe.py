"""DualPipeV and DualPipe on P gloo processes, with and without expert parallelism, equal the
single-process model on the same data.

The tiny preset (MLA + MoE + MTP) cut into stages (2P for DualPipeV, P per direction for
DualPipe; even, or an explicit uneven layout) runs two training steps (no optimizer) through
the registry's DualPipeV / DualPipe executors (P processes, Megatron pipeline
group of P) and through the no-pipelining schedule (one process); then one forward-only step
on new data. Compared: the loss dict of every micro-batch, every parameter's gradient after
the second finalize, the expert biases and every MoE layer's tokens per expert after each update, and the
forward-only losses.
The first step also records its timeline: the actions each rank ran are its order.

Expert parallelism (EP=2): P x DP processes, DP data-parallel replicas of the pipeline, every
two of which split every MoE layer's experts (overlap/dispatch.py's alltoall dispatcher; DP = 4
is expert data parallelism: each expert on two ranks); replica d runs micro-batches d, d + DP,
... of the single process's DP x M. Each replica's losses equal the single process's of
its micro-batches within 1e-6 relative, most of them bit for bit: a token meets the same
weights wherever its experts live, but an expert's GEMM now runs over the tokens of both
replicas' micro-batches, and the CPU GEMM's blocking, so the order of a row's sums, depends on
the number of rows below about 12 (measured with torch 2.14). The expert biases are
bit-identical (integer token counts summed over the replicas). The gradients are the
replicas' sums added (DDP's all-reduce, the experts' over their expert-data-parallel group), in
another order than the single process adds its micro-batches: every one within 1e-6 relative
to its largest entry.

The FB overlap (config.fb_overlap, docs/overlap.md): at EP=2 the DualPipeV runs with DP = 2
(P = 1, 2) train a second time from the same weights with FB steps overlapped, which must
equal the sequential run bit for bit (losses, forward-only losses, every gradient, biases,
loads); the expert-data-parallel run (P = 1, DP = 4) and the DualPipe run (P = 2) train
overlapped only. In every overlapped run the FB actions must have
handed over at the all-to-alls, the backward first and the two tasks in turn.

DualPipeV: bit-identical except one tensor, the word embedding's gradient. Its embedding is shared by
the decoder input (rank 0, chunk 0) and the MTP block (rank 0, chunk 1); the single process
sums the two contributions inside one backward, then adds the sum to the micro-batch
accumulator, while DualPipeV runs the two backwards at different times and adds them one at
a time (in an order the schedule interleaves across micro-batches). Same terms, another
order of fp32 additions: bounded at 1e-6 relative to the gradient's largest entry.
The order's B actions defer their linears' weight gradients to its W actions
(megatron_dsv3/weight_grad.py); those reach main_grad once per micro-batch, in micro-batch order,
as in the single process, so they are among the bit-identical ones.

DualPipe: each stage is on two ranks (mirrors), one per direction; each copy accumulates the
gradient of its direction's M/2 micro-batches, and the executor adds the two sums. The single
process adds the M micro-batches one by one: same terms, another order of fp32 additions, so
every gradient is bounded at 1e-6 relative to its largest entry, and the two mirrors are
bit-identical to each other (a + b on both sides). Expert biases are updated from integer
token counts: bit-identical.
"""

import os

import pytest
import torch
import torch.multiprocessing as mp

from megatron_dsv3.distributed import free_port

SEQ, MICRO_BATCH = 32, 2


def _batches(seed: int, vocab_size: int, replica: int = 0, replicas: int = 1):
    """The micro-batches of data-parallel `replica` of `replicas`: every replicas-th of one stream."""
    generator = torch.Generator().manual_seed(seed)
    for index in range(10**9):
        tokens = torch.randint(0, vocab_size, (MICRO_BATCH, SEQ), generator=generator)
        if index % replicas != replica:
            continue
        yield {"tokens": tokens, "labels": torch.roll(tokens, -1, 1), "loss_mask": torch.ones(MICRO_BATCH, SEQ),
               "position_ids": torch.arange(SEQ).expand(MICRO_BATCH, SEQ)}


def _run_step(schedule, config, chunks, layer_offsets, num_microbatches: int, timeline_group=None, replica=0, replicas=1) -> dict:
    """Two training steps (no optimizer: the second step's gradients and the biases updated
twice are compared), then one forward-only step on other data. With `timeline_group` the first
step is recorded and its timeline gathered over that group."""
    from megatron_dsv3.pipeline.dualpipe import TimelineRecorder
    from megatron_dsv3.routing import expert_load, finalize_model_grads_with_load
    from megatron_dsv3.training.forward_step import forward_step

    config.no_sync_func = [chunk.no_sync for chunk in chunks] if len(chunks) > 1 else chunks[0].no_sync
    config.finalize_model_grads_func = finalize_model_grads_with_load
    common = dict(forward_step_func=forward_step, model=chunks, num_microbatches=num_microbatches,
                  seq_length=SEQ, micro_batch_size=MICRO_BATCH)
    data = _batches(1, config.vocab_size, replica, replicas)
    losses, biases, loads, timeline = [], [], [], None
    for step in range(2):  # the second step is the one where DDP's overlapped sync follows no_sync
        for chunk in chunks:
            chunk.zero_grad_buffer()
        if timeline_group is not None and step == 0:
            recorder = TimelineRecorder()
            losses += schedule(data_iterator=data, timeline=recorder, **common)
            timeline = recorder.timeline(timeline_group)
        else:
            losses += schedule(data_iterator=data, **common)
        biases.append({n: b.clone() for n, b in _named_expert_biases(chunks, layer_offsets)})
        loads.append({load.name: load.tokens_per_expert for load in expert_load(chunks)})
    with torch.no_grad():
        eval_losses = schedule(data_iterator=_batches(2, config.vocab_size, replica, replicas), forward_only=True, **common)
    return {"losses": losses, "eval_losses": eval_losses, "biases": biases, "loads": loads, "timeline": timeline}


def _named_expert_biases(chunks, layer_offsets):
    """(single-process name, expert bias) of every router in `chunks`."""
    from megatron_dsv3.pipeline.layout import full_model_name

    for chunk, offset in zip(chunks, layer_offsets):
        for n, b in chunk.module.named_buffers():
            if n.endswith("expert_bias"):
                yield full_model_name(n, offset), b


def _config(num_layers: int, pp_size: int, ep_size: int = 1):
    from megatron_dsv3.config import preset

    parallel = dict(expert_model_parallel_size=ep_size) if ep_size > 1 else {}
    if pp_size > 1:
        parallel.update(pipeline_model_parallel_size=pp_size, pipeline_dtype=torch.float32)
    return preset("tiny", num_layers=num_layers, seq_length=SEQ, **parallel)


def _reference_main(rank: int, port: int, num_layers: int, num_microbatches: int, overlap: bool, out: str):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from megatron_dsv3 import cpu
    from megatron_dsv3.distributed import init_distributed, local_process_env, seed_everything
    from megatron_dsv3.pipeline.no_pipelining import forward_backward_no_pipelining
    from megatron_dsv3.specs import gpt_model

    local_process_env(rank, 1, port)
    init_distributed()
    config = _config(num_layers, 1)
    cpu.enable(config)
    seed_everything(0)
    model = DistributedDataParallel(config, DistributedDataParallelConfig(overlap_grad_reduce=overlap), gpt_model(config))
    result = _run_step(forward_backward_no_pipelining, config, [model], [0], num_microbatches)
    result["grads"] = {n: p.main_grad.clone() for n, p in model.module.named_parameters()}
    torch.save(result, out)
    torch.distributed.destroy_process_group()


def _backward_first(calls: list):
    """An `overlapped_forward_backward` that runs the backward before the forward (the two are
    independent micro-batches, so any interleaving must give the same numbers)."""
    from megatron.core.pipeline_parallel.schedules import backward_step, forward_step

    def overlapped_forward_backward(*, f_model, b_model, b_input_tensor, b_output_tensor, b_output_tensor_grad, config,
                                    current_microbatch, **forward_inputs):
        calls.append(current_microbatch)
        input_gradient = backward_step(b_input_tensor, b_output_tensor, b_output_tensor_grad, config)
        output, num_tokens = forward_step(model=f_model, config=config, current_microbatch=current_microbatch, **forward_inputs)
        return output, num_tokens, input_gradient

    return overlapped_forward_backward


def _pipeline_main(rank: int, port: int, schedule_name: str, pp_size: int, dp_size: int, ep_size: int, num_layers: int,
                   num_microbatches: int, overlap: bool, layers_per_stage, fb: str, out_dir: str):
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from megatron_dsv3 import cpu
    from megatron_dsv3.distributed import init_distributed, local_process_env, seed_everything
    from megatron_dsv3.pipeline import layout
    from megatron_dsv3.pipeline.registry import SCHEDULES

    schedule = SCHEDULES[schedule_name]
    local_process_env(rank, pp_size * dp_size, port)
    init_distributed(pp_size, get_embedding_ranks=schedule.get_embedding_ranks, backend="gloo", expert_model_parallel_size=ep_size)
    config = _config(num_layers, pp_size, ep_size)
    config.deallocate_pipeline_outputs = True  # as Megatron-LM runs: sent outputs keep only their grad_fn
    cpu.enable(config)
    seed_everything(0)
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    chunks = [DistributedDataParallel(config, DistributedDataParallelConfig(overlap_grad_reduce=overlap), chunk)
              for chunk in schedule.build_chunks(config, pp_rank, pp_size, layers_per_stage)]
    overlap_calls = []
    if schedule_name == "dualpipe" and fb == "sequential":  # FB actions through a chunk's own hook
        for chunk in chunks:
            chunk.module.overlapped_forward_backward = _backward_first(overlap_calls)
    config.fb_overlap = fb == "overlapped"
    stages = [stage for _, stage in schedule.stages(pp_size)[pp_rank]]
    offsets = [layout.stage_layers(num_layers, schedule.num_stages(pp_size), stage, layers_per_stage).start for stage in stages]
    initial = [{k: v.clone() for k, v in chunk.module.state_dict().items() if isinstance(v, torch.Tensor)} for chunk in chunks]

    def two_steps():
        result = _run_step(schedule.forward_backward_func, config, chunks, offsets, num_microbatches,
                           timeline_group=parallel_state.get_pipeline_model_parallel_group(),
                           replica=parallel_state.get_data_parallel_rank(), replicas=dp_size)
        experts = layout.expert_offset(config)
        result["grads"] = {layout.full_model_name(n, offset, experts): p.main_grad.clone()
                           for chunk, offset in zip(chunks, offsets) for n, p in chunk.module.named_parameters()}
        return result

    result = two_steps()
    if fb == "both":  # the same again from the same weights, FB overlapped at the all-to-alls
        for chunk, state in zip(chunks, initial):
            chunk.module.load_state_dict(state, strict=False)
        config.fb_overlap = True
        result["fb_overlap"] = two_steps()
    if fb != "sequential":
        overlapped = result.get("fb_overlap", result)
        overlapped["handovers"] = [(str(r.action), r.handovers) for r in overlapped["timeline"].records if r.rank == pp_rank]
        result.get("fb_overlap", {}).pop("timeline", None)
    result["place"] = (pp_rank, parallel_state.get_data_parallel_rank())
    result["overlap_calls"] = overlap_calls
    if rank == 0:
        from megatron_dsv3.pipeline.simulate import plot_timeline

        plot_timeline(result["timeline"], os.path.join(out_dir, "timeline.png"))
    result["timeline"] = [(r.rank, str(r.action), r.start, r.end) for r in result["timeline"].records]
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


def _gathered(pp_size: int, out_dir: str) -> list[dict]:
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=True) for r in range(pp_size)]


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


# P = 1: the V turns on the rank that computes the loss. overlap_grad_reduce: DDP then syncs
# a chunk's gradients only when its last backward runs outside no_sync. P x DP processes; EP = 2
# splits the experts over 2 of the DP replicas (with DP = 4: expert data parallelism of 2).
# fb: how FB actions run: "sequential" (DualPipe's through the chunks' own hook), "overlapped"
# (config.fb_overlap), or "both": sequential, then overlapped from the same weights, compared.
@pytest.mark.parametrize(
    "schedule_name, pp_size, dp_size, ep_size, num_layers, num_microbatches, overlap, layers_per_stage, fb",
    [
        ("dualpipev", 1, 2, 2, 2, 3, True, None, "both"),
        ("dualpipev", 1, 4, 2, 2, 3, True, None, "overlapped"),
        ("dualpipev", 2, 2, 2, 6, 6, True, [1, 2, 2, 1], "both"),
        ("dualpipe", 2, 2, 2, 4, 8, True, None, "overlapped"),
        pytest.param("dualpipe", 4, 1, 1, 6, 8, False, [1, 2, 2, 1], "sequential", marks=pytest.mark.slow),
    ],
)
def test_matches_single_process(tmp_path, schedule_name, pp_size, dp_size, ep_size, num_layers, num_microbatches, overlap,
                                layers_per_stage, fb):
    from megatron_dsv3.pipeline.schedule import dualpipe_order, dualpipev_order

    mp.spawn(_reference_main, args=(free_port(), num_layers, num_microbatches * dp_size, overlap, str(tmp_path / "ref.pt")),
             nprocs=1, join=True)
    mp.spawn(_pipeline_main, args=(free_port(), schedule_name, pp_size, dp_size, ep_size, num_layers, num_microbatches, overlap,
                                   layers_per_stage, fb, str(tmp_path)), nprocs=pp_size * dp_size, join=True)
    reference = torch.load(tmp_path / "ref.pt", weights_only=True)
    ranks = _gathered(pp_size * dp_size, str(tmp_path))
    mirrored = schedule_name == "dualpipe"

    # Loss dicts: on Megatron's last pipeline stage only, one per micro-batch of the replica;
    # replica d's k-th micro-batch of a step is the single process's k * EP + d-th.
    for result in ranks:
        pp_rank, replica = result["place"]
        if pp_rank < pp_size - 1:
            assert result["losses"] == [] and result["eval_losses"] == []
            continue
        for key, steps in (("losses", 2), ("eval_losses", 1)):
            got = result[key]
            want = [reference[key][step * num_microbatches * dp_size + k * dp_size + replica]
                    for step in range(steps) for k in range(num_microbatches)]
            assert len(got) == len(want) == num_microbatches * steps
            for g, w in zip(got, want):
                assert g.keys() == w.keys()
                for k in w:  # bit-identical without EP; with it, the GEMM-rows reason of the module note
                    assert torch.equal(g[k], w[k]) if ep_size == 1 else torch.allclose(g[k], w[k], rtol=1e-6, atol=0), (key, k)

    grads = {}
    for result in ranks:
        for name, grad in result["grads"].items():
            if name in grads:  # a mirror (DualPipe) or another replica's copy (EP): the same sum
                assert (mirrored or dp_size > 1) and torch.equal(grads[name], grad), name
            grads[name] = grad
    assert grads.keys() == reference["grads"].keys()
    differing = {n: _relative(grads[n], reference["grads"][n]) for n in grads if not torch.equal(grads[n], reference["grads"][n])}
    print(f"{schedule_name} P={pp_size} DP={dp_size} EP={ep_size}: {len(grads) - len(differing)}/{len(grads)} gradients bit-identical; "
          f"largest relative difference {max(differing.values(), default=0):.2e}")
    if not mirrored and dp_size == 1:
        assert set(differing) <= {"embedding.word_embeddings.weight"}
    assert all(d <= 1e-6 for d in differing.values())

    for step in range(2):
        biases = {}
        for result in ranks:
            for n, b in result["biases"][step].items():
                assert n not in biases or torch.equal(biases[n], b)  # mirrors and replicas agree
                biases[n] = b
        assert biases.keys() == reference["biases"][step].keys() and biases
        for n, b in biases.items():
            assert torch.equal(b, reference["biases"][step][n]), (step, n)
            if step == 0:
                assert not torch.equal(b, torch.zeros_like(b))  # the update really happened
        # tokens per expert over the global batch: every MoE layer's, on every rank that holds it
        loads = {}
        for result in ranks:
            for name, tokens in result["loads"][step].items():
                assert loads.setdefault(name, tokens) == tokens, (step, name)
        assert loads == reference["loads"][step] and loads, step

    # The recorded timeline (gathered over each replica's pipeline): every pipeline rank ran
    # exactly its order, each action after the previous.
    order = (dualpipev_order if schedule_name == "dualpipev" else dualpipe_order)(pp_size, num_microbatches)
    for replica in range(dp_size):
        pipeline = [result for result in ranks if result["place"][1] == replica]
        timeline = pipeline[0]["timeline"]
        assert all(result["timeline"] == timeline for result in pipeline)
        for pp_rank in range(pp_size):
            records = [r for r in timeline if r[0] == pp_rank]
            assert [r[1] for r in records] == [str(a) for a in order[pp_rank]]
            assert all(start <= end for _, _, start, end in records)
            assert all(a[3] <= b[2] for a, b in zip(records, records[1:]))
    assert (tmp_path / "timeline.png").stat().st_size > 0
    if fb != "sequential":
        _check_fb_overlap(ranks, compare=fb == "both")
    if mirrored and fb == "sequential":  # the FB actions of both steps went through the chunks' own hook
        for result in ranks:
            fb = [a for a in order[result["place"][0]] if a.kind == "FB"]
            assert fb and result["overlap_calls"] == [a.microbatch for a in fb] * 2


def _check_fb_overlap(ranks: list[dict], compare: bool) -> None:
    """The FB-overlapped run's FB actions (config.fb_overlap) handed over at the all-to-alls:
    the backward first, then the two tasks in turn, each at its own exchanges in their order
    (forward: dispatch, combine; backward: combine's, then dispatch's backward). With
    `compare`, the overlapped run equals the sequential one bit for bit."""
    for result in ranks:
        overlapped = result.get("fb_overlap", result)
        fb = [handovers for action, handovers in overlapped["handovers"] if "&" in action]
        assert any(fb), "the FB actions handed over"  # those of two dense-only chunks have nothing to hand over at
        cycles = {"backward": ("combine backward", "dispatch backward"), "forward": ("dispatch", "combine")}
        for handovers in fb:
            tasks = [h.split(": ")[0] for h in handovers]
            assert tasks == [("backward", "forward")[i % 2] for i in range(len(tasks))], handovers
            for task, labels in cycles.items():
                mine = [h.split(": ")[1] for h in handovers if h.startswith(task)]
                assert mine == [labels[i % 2] for i in range(len(mine))], handovers
        if not compare:
            continue
        for key in ("losses", "eval_losses"):
            assert len(overlapped[key]) == len(result[key])
            for got, want in zip(overlapped[key], result[key]):
                assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), key
        assert overlapped["grads"].keys() == result["grads"].keys()
        assert all(torch.equal(overlapped["grads"][n], g) for n, g in result["grads"].items())
        for step in range(2):
            assert overlapped["loads"][step] == result["loads"][step]
            assert all(torch.equal(overlapped["biases"][step][n], b) for n, b in result["biases"][step].items())


def _invalid_main(rank: int, port: int, out_dir: str):
    from megatron_dsv3.distributed import init_distributed, local_process_env
    from megatron_dsv3.pipeline.registry import SCHEDULES

    forward_backward_dualpipev = SCHEDULES["dualpipev"].forward_backward_func
    forward_backward_dualpipe = SCHEDULES["dualpipe"].forward_backward_func
    local_process_env(rank, 2, port)
    init_distributed(2, backend="gloo")  # Megatron's default embedding group: pipeline ranks 0 and P-1
    common = dict(forward_step_func=None, data_iterator=None, seq_length=SEQ, micro_batch_size=MICRO_BATCH)
    chunk = torch.nn.Linear(2, 2)
    messages = []
    # Megatron's default embedding group (ranks 0 and P-1) is the third.
    for executor, model, num_microbatches in (
        (forward_backward_dualpipev, [chunk], 8),
        (forward_backward_dualpipev, [chunk, chunk], 2),
        (forward_backward_dualpipev, [chunk, chunk], 8),
        (forward_backward_dualpipe, [chunk, chunk], 7),
    ):
        with pytest.raises(ValueError) as error:
            executor(model=model, num_microbatches=num_microbatches, **common)
        messages.append(str(error.value))
    torch.save(messages, os.path.join(out_dir, f"invalid{rank}.pt"))
    torch.distributed.destroy_process_group()


def test_invalid_setups_raise_before_communicating(tmp_path):
    mp.spawn(_invalid_main, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    one_chunk, too_few, embedding_pair, odd = torch.load(tmp_path / "invalid0.pt")
    assert "model has 1 chunks" in one_chunk and "dualpipev_chunks" in one_chunk
    assert "num_microbatches >= 2 * num_ranks - 1" in too_few and "num_microbatches=2, num_ranks=2" in too_few
    assert "embedding group has 2 ranks" in embedding_pair and "embedding_on_first_rank" in embedding_pair
    assert "DualPipe needs an even number of micro-batches" in odd and "num_microbatches=7" in odd


def test_layouts_reject_impossible_layer_counts():
    from megatron_dsv3.config import preset
    from megatron_dsv3.pipeline.layout import dualpipe_chunks, stage_layers

    with pytest.raises(ValueError, match=r"num_layers=6 does not divide into 4 .* pass layers_per_stage"):
        stage_layers(6, 4, 0)
    with pytest.raises(ValueError, match=r"layers_per_stage=\[1, 2, 2\]: needs 4 counts .* summing to num_layers=6"):
        stage_layers(6, 4, 0, [1, 2, 2])
    with pytest.raises(ValueError, match=r"layers_per_stage=\[0, 3, 2, 1\]: .* each >= 1"):
        stage_layers(6, 4, 0, [0, 3, 2, 1])
    with pytest.raises(ValueError, match=r"DualPipe needs an even number of ranks .*num_ranks=3"):
        dualpipe_chunks(preset("tiny", pipeline_model_parallel_size=3, pipeline_dtype=torch.float32), 0, 3)


def _mirrors_main(rank: int, port: int, out_dir: str):
    from megatron_dsv3 import cpu
    from megatron_dsv3.distributed import init_distributed, local_process_env
    from megatron_dsv3.pipeline import layout

    local_process_env(rank, 2, port)
    init_distributed(2, get_embedding_ranks=layout.embedding_on_first_rank, backend="gloo")
    config = _config(4, 2)
    cpu.enable(config)
    torch.manual_seed(100 + rank)  # as Megatron-LM seeds pipeline ranks: differently
    chunks = layout.dualpipe_chunks(config, rank, 2, init_as_single_process=False)
    torch.save([dict(chunk.state_dict()) for chunk in chunks], os.path.join(out_dir, f"mirrors{rank}.pt"))
    torch.distributed.destroy_process_group()


def test_dualpipe_mirrors_start_equal_when_ranks_initialise_apart(tmp_path):
    """Without the single-process initialisation (too big to build), each rank initialises its
    chunks from its own seed; rank r's chunk 1 must still equal its mirror, rank P-1-r's chunk 0."""
    mp.spawn(_mirrors_main, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"mirrors{rank}.pt", weights_only=False) for rank in range(2)]
    for rank in range(2):
        mine, mirror = ranks[rank][1], ranks[1 - rank][0]
        tensors = {k: v for k, v in mine.items() if isinstance(v, torch.Tensor)}
        assert tensors and all(torch.equal(v, mirror[k]) for k, v in tensors.items())
