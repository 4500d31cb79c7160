"""A pipeline rank that raises mid-step makes the others fail within a bounded time.

P = 2 gloo processes run DualPipeV on the tiny model; rank 1 raises at its 3rd action (its
third forward), then lingers with its connections open (as a rank stuck in its error
handling would), so rank 0 cannot learn of the failure from a closed socket: it is blocked
in a receive for rank 1's next activation and must give up after the pipeline group's
timeout (`initialize_model_parallel(distributed_timeout_minutes=...)`, which a training
launcher must set too; the default is 30 minutes). Both processes must exit non-zero within
the bound, rank 0 on the timeout (not on rank 1's exit). Rank 1 then refuses a second step
before any communication: its failed step left receives posted. torch.compile is off in both (tests/conftest.py): its
first call (Megatron's fused router functions) can take longer than the short timeout, and a
rank waiting on it would time out before the injected failure.
"""

import datetime
import os
import time
import traceback

import pytest
import torch
import torch.multiprocessing as mp

from megatron_dsv3.distributed import free_port

SEQ, MICRO_BATCH, NUM_MICROBATCHES, NUM_LAYERS = 32, 2, 8, 4
TIMEOUT_S, LINGER_S, BOUND_S = 10, 20, 60  # rank 1 lingers past rank 0's timeout


def _batches(vocab_size: int):
    generator = torch.Generator().manual_seed(1)
    while True:
        tokens = torch.randint(0, vocab_size, (MICRO_BATCH, SEQ), generator=generator)
        yield {"tokens": tokens, "labels": torch.roll(tokens, -1, 1), "loss_mask": torch.ones(MICRO_BATCH, SEQ),
               "position_ids": torch.arange(SEQ).expand(MICRO_BATCH, SEQ)}


def _main(rank: int, port: int, out_dir: str):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from megatron_dsv3 import cpu
    from megatron_dsv3.config import preset
    from megatron_dsv3.distributed import init_distributed, local_process_env, seed_everything
    from megatron_dsv3.pipeline.registry import SCHEDULES
    from megatron_dsv3.training.forward_step import forward_step

    dualpipev = SCHEDULES["dualpipev"]
    local_process_env(rank, 2, port)
    # the default group's and the pipeline group's timeout
    init_distributed(2, get_embedding_ranks=dualpipev.get_embedding_ranks, timeout=datetime.timedelta(seconds=TIMEOUT_S),
                     backend="gloo")
    config = preset("tiny", num_layers=NUM_LAYERS, seq_length=SEQ, pipeline_model_parallel_size=2, pipeline_dtype=torch.float32)
    cpu.enable(config)
    seed_everything(0)
    chunks = [DistributedDataParallel(config, DistributedDataParallelConfig(), chunk) for chunk in dualpipev.build_chunks(config, rank, 2)]
    calls = []

    def failing_forward_step(data_iterator, model):
        calls.append(None)
        if rank == 1 and len(calls) == 3:  # rank 1's first three actions are forwards
            raise RuntimeError("injected failure at rank 1's third action")
        return forward_step(data_iterator, model)

    def step():
        dualpipev.forward_backward_func(forward_step_func=failing_forward_step, data_iterator=_batches(config.vocab_size), model=chunks,
                                        num_microbatches=NUM_MICROBATCHES, seq_length=SEQ, micro_batch_size=MICRO_BATCH)

    start = time.monotonic()
    try:
        step()
    except Exception:
        with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
            f.write(f"{time.monotonic() - start:.1f}\n{traceback.format_exc()}")
        if rank == 1:
            try:  # its receives posted for the failed step would take the next step's messages
                step()
            except RuntimeError as error:
                with open(os.path.join(out_dir, "rank1-next-step.txt"), "w") as f:
                    f.write(str(error))
            time.sleep(LINGER_S)
        raise
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_a_failing_rank_makes_the_other_fail_within_a_bound(tmp_path):
    context = mp.get_context("spawn")
    port = free_port()
    processes = [context.Process(target=_main, args=(rank, port, str(tmp_path))) for rank in range(2)]
    start = time.monotonic()
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=max(0.0, BOUND_S + 60 - (time.monotonic() - start)))  # + start-up time
    hung = [rank for rank, process in enumerate(processes) if process.is_alive()]
    for process in processes:
        if process.is_alive():
            process.kill()
    assert hung == [], f"ranks {hung} still running"
    assert [process.exitcode for process in processes] == [1, 1]
    rank0 = (tmp_path / "rank0.txt").read_text()
    rank1 = (tmp_path / "rank1.txt").read_text()
    print(f"rank 0 failed after {rank0.splitlines()[0]} s:\n{rank0[-600:]}")
    assert "injected failure" in rank1
    assert float(rank0.splitlines()[0]) < BOUND_S
    assert "Timed out" in rank0  # gloo's timeout, while rank 1 still lingered
    assert "pipeline rank 0" in rank0 and "from pipeline rank 1" in rank0
    # rank 1 refuses another step: the failed one left receives posted (pipeline/comm.py)
    assert "an earlier step of this process failed with pipeline receives posted" in (tmp_path / "rank1-next-step.txt").read_text()
