"""DualPipeV on P gloo processes equals the single-process model on the same data.

The tiny preset (MLA + MoE + MTP) with 2P stages of equal depth runs two training steps
(no optimizer) through `forward_backward_dualpipev` (P processes, Megatron pipeline group
of P) and through the no-pipelining schedule (one process); then one forward-only step on
new data. Compared: the loss dict of every micro-batch, every parameter's gradient after the
second finalize, the expert biases after each update, and the forward-only losses.

Bit-identical except one tensor: the word embedding's gradient. Its embedding is shared by
the decoder input (rank 0, chunk 0) and the MTP block (rank 0, chunk 1); the single process
sums the two contributions inside one backward, then adds the sum to the micro-batch
accumulator, while DualPipeV runs the two backwards at different times and adds them one at
a time (in an order the schedule interleaves across micro-batches). Same terms, another
order of fp32 additions: bounded at 1e-6 relative to the gradient's largest entry.
The order's B actions defer their linears' weight gradients to its W actions
(pipeline/weight_grad.py); those reach main_grad once per micro-batch, in micro-batch order,
as in the single process, so they are among the bit-identical ones.
"""

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

SEQ, MICRO_BATCH = 32, 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _batches(seed: int, vocab_size: int):
    generator = torch.Generator().manual_seed(seed)
    while True:
        tokens = torch.randint(0, vocab_size, (MICRO_BATCH, SEQ), generator=generator)
        yield {"tokens": tokens, "labels": torch.roll(tokens, -1, 1), "loss_mask": torch.ones(MICRO_BATCH, SEQ),
               "position_ids": torch.arange(SEQ).expand(MICRO_BATCH, SEQ)}


def _run_step(schedule, config, chunks, layer_offsets, num_microbatches: int) -> dict:
    """Two training steps (no optimizer: the second step's gradients and the biases updated
twice are compared), then one forward-only step on other data."""
    from megatron_dsv3.routing import finalize_model_grads_with_load
    from megatron_dsv3.training.loop import forward_step

    config.no_sync_func = [chunk.no_sync for chunk in chunks] if len(chunks) > 1 else chunks[0].no_sync
    config.finalize_model_grads_func = finalize_model_grads_with_load
    common = dict(forward_step_func=forward_step, model=chunks, num_microbatches=num_microbatches,
                  seq_length=SEQ, micro_batch_size=MICRO_BATCH)
    data = _batches(1, config.vocab_size)
    losses, biases = [], []
    for _ in range(2):  # the second step is the one where DDP's overlapped sync follows no_sync
        for chunk in chunks:
            chunk.zero_grad_buffer()
        losses += schedule(data_iterator=data, **common)
        biases.append({n: b.clone() for n, b in _named_expert_biases(chunks, layer_offsets)})
    with torch.no_grad():
        eval_losses = schedule(data_iterator=_batches(2, config.vocab_size), forward_only=True, **common)
    return {"losses": losses, "eval_losses": eval_losses, "biases": biases}


def _named_expert_biases(chunks, layer_offsets):
    """(single-process name, expert bias) of every router in `chunks`."""
    from megatron_dsv3.pipeline.layout import full_model_name

    for chunk, offset in zip(chunks, layer_offsets):
        for n, b in chunk.module.named_buffers():
            if n.endswith("expert_bias"):
                yield full_model_name(n, offset), b


def _config(num_layers: int, pp_size: int):
    from megatron_dsv3.config import preset

    if pp_size == 1:
        return preset("tiny", num_layers=num_layers, seq_length=SEQ)
    return preset("tiny", num_layers=num_layers, seq_length=SEQ, pipeline_model_parallel_size=pp_size, pipeline_dtype=torch.float32)


def _reference_main(rank: int, port: int, num_layers: int, num_microbatches: int, overlap: bool, out: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1")
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from megatron_dsv3 import cpu
    from megatron_dsv3.pipeline.no_pipelining import forward_backward_no_pipelining
    from megatron_dsv3.specs import gpt_model
    from megatron_dsv3.training.loop import init_distributed, seed_everything

    init_distributed()
    config = _config(num_layers, 1)
    cpu.enable(config)
    seed_everything(0)
    model = DistributedDataParallel(config, DistributedDataParallelConfig(overlap_grad_reduce=overlap), gpt_model(config))
    result = _run_step(forward_backward_no_pipelining, config, [model], [0], num_microbatches)
    result["grads"] = {n: p.main_grad.clone() for n, p in model.module.named_parameters()}
    torch.save(result, out)
    torch.distributed.destroy_process_group()


def _pipeline_main(rank: int, port: int, pp_size: int, num_layers: int, num_microbatches: int, overlap: bool, out_dir: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(pp_size))
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from megatron_dsv3 import cpu
    from megatron_dsv3.pipeline.dualpipe import forward_backward_dualpipev
    from megatron_dsv3.pipeline.layout import dualpipev_chunks, dualpipev_embedding_ranks, full_model_name, stage_layers
    from megatron_dsv3.training.loop import seed_everything

    torch.distributed.init_process_group("gloo")
    parallel_state.initialize_model_parallel(pipeline_model_parallel_size=pp_size, get_embedding_ranks=dualpipev_embedding_ranks)
    config = _config(num_layers, pp_size)
    cpu.enable(config)
    seed_everything(0)
    chunks = [DistributedDataParallel(config, DistributedDataParallelConfig(overlap_grad_reduce=overlap), chunk)
              for chunk in dualpipev_chunks(config, rank, pp_size)]
    offsets = [stage_layers(num_layers, 2 * pp_size, stage).start for stage in (rank, 2 * pp_size - 1 - rank)]
    result = _run_step(forward_backward_dualpipev, config, chunks, offsets, num_microbatches)
    result["grads"] = {full_model_name(n, offset): p.main_grad.clone()
                       for chunk, offset in zip(chunks, offsets) for n, p in chunk.module.named_parameters()}
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


def _gathered(pp_size: int, out_dir: str) -> list[dict]:
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=True) for r in range(pp_size)]


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


# P = 1: the V turns on the rank that computes the loss. overlap_grad_reduce: DDP then syncs
# a chunk's gradients only when its last backward runs outside no_sync.
@pytest.mark.parametrize(
    "pp_size, num_layers, num_microbatches, overlap",
    [(1, 2, 3, True), (2, 4, 8, True), pytest.param(4, 8, 12, False, marks=pytest.mark.slow)],
)
def test_dualpipev_matches_single_process(tmp_path, pp_size, num_layers, num_microbatches, overlap):
    mp.spawn(_reference_main, args=(_free_port(), num_layers, num_microbatches, overlap, str(tmp_path / "ref.pt")), nprocs=1, join=True)
    mp.spawn(_pipeline_main, args=(_free_port(), pp_size, num_layers, num_microbatches, overlap, str(tmp_path)), nprocs=pp_size, join=True)
    reference = torch.load(tmp_path / "ref.pt", weights_only=True)
    ranks = _gathered(pp_size, str(tmp_path))

    # Loss dicts: on Megatron's last pipeline stage (rank P-1) only, one per micro-batch.
    for rank in range(pp_size - 1):
        assert ranks[rank]["losses"] == [] and ranks[rank]["eval_losses"] == []
    for key in ("losses", "eval_losses"):
        got, want = ranks[-1][key], reference[key]
        assert len(got) == len(want) == num_microbatches * (2 if key == "losses" else 1)
        for g, w in zip(got, want):
            assert g.keys() == w.keys() and all(torch.equal(g[k], w[k]) for k in w)

    grads = {}
    for result in ranks:
        assert not grads.keys() & result["grads"].keys()  # each parameter lives on one rank
        grads.update(result["grads"])
    assert grads.keys() == reference["grads"].keys()
    differing = {n: _relative(grads[n], reference["grads"][n]) for n in grads if not torch.equal(grads[n], reference["grads"][n])}
    print(f"P={pp_size}: {len(grads) - len(differing)}/{len(grads)} gradients bit-identical; differing: {differing}")
    assert set(differing) <= {"embedding.word_embeddings.weight"}
    assert all(d <= 1e-6 for d in differing.values())

    for step in range(2):
        biases = {n: b for result in ranks for n, b in result["biases"][step].items()}
        assert biases.keys() == reference["biases"][step].keys() and biases
        for n, b in biases.items():
            assert torch.equal(b, reference["biases"][step][n]), (step, n)
            if step == 0:
                assert not torch.equal(b, torch.zeros_like(b))  # the update really happened


def _invalid_main(rank: int, port: int, out_dir: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    from megatron.core import parallel_state

    from megatron_dsv3.pipeline.dualpipe import forward_backward_dualpipev

    torch.distributed.init_process_group("gloo")
    parallel_state.initialize_model_parallel(pipeline_model_parallel_size=2)
    common = dict(forward_step_func=None, data_iterator=None, seq_length=SEQ, micro_batch_size=MICRO_BATCH)
    chunk = torch.nn.Linear(2, 2)
    messages = []
    # Megatron's default embedding group (ranks 0 and P-1) is the third.
    for model, num_microbatches in (([chunk], 8), ([chunk, chunk], 2), ([chunk, chunk], 8)):
        with pytest.raises(ValueError) as error:
            forward_backward_dualpipev(model=model, num_microbatches=num_microbatches, **common)
        messages.append(str(error.value))
    torch.save(messages, os.path.join(out_dir, f"invalid{rank}.pt"))
    torch.distributed.destroy_process_group()


def test_invalid_setups_raise_before_communicating(tmp_path):
    mp.spawn(_invalid_main, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    one_chunk, too_few, embedding_pair = torch.load(tmp_path / "invalid0.pt")
    assert "model has 1 chunks" in one_chunk
    assert "num_microbatches >= 2 * num_ranks - 1" in too_few and "num_microbatches=2, num_ranks=2" in too_few
    assert "embedding group has 2 ranks" in embedding_pair and "dualpipev_embedding_ranks" in embedding_pair


def test_layout_rejects_an_uneven_split():
    from megatron_dsv3.pipeline.layout import stage_layers

    with pytest.raises(ValueError, match=r"num_layers=6 does not divide into 4"):
        stage_layers(6, 4, 0)
