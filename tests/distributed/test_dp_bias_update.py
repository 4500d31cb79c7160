"""The bias update counts the load over the *global* batch: two data-parallel gloo ranks.

Each rank routes different tokens; forward hooks record each rank's routing, the counts are
summed across ranks by the test itself, and report §2.1.2's sign rule on that sum must give
the biases both ranks end up with (identical on both).
"""

import torch
import torch.multiprocessing as mp

from megatron_dsv3.distributed import free_port

WORLD = 2


def _rank_main(rank: int, port: int, results):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from megatron_dsv3 import cpu
    from megatron_dsv3.config import preset
    from megatron_dsv3.pipeline.no_pipelining import forward_backward_no_pipelining
    from megatron_dsv3.routing import LoadRecordingRouter, finalize_model_grads_with_load
    from megatron_dsv3.specs import gpt_model
    from megatron_dsv3.distributed import init_distributed, local_process_env, seed_everything
    from megatron_dsv3.training.forward_step import forward_step

    local_process_env(rank, WORLD, port)
    init_distributed()
    config = preset("tiny", seq_length=32)
    cpu.enable(config)
    seed_everything(0)  # same weights on both ranks
    model = DistributedDataParallel(config, DistributedDataParallelConfig(), gpt_model(config))
    config.no_sync_func = model.no_sync
    config.finalize_model_grads_func = finalize_model_grads_with_load
    routers = [m for m in model.modules() if isinstance(m, LoadRecordingRouter)]
    before = [r.expert_bias.clone() for r in routers]
    local = [torch.zeros(config.num_moe_experts) for _ in routers]
    def record_routing(router, inputs, outputs):
        local[routers.index(router)] += outputs[1].sum(0)  # this rank's routing_map [tokens, experts]

    for r in routers:
        r.register_forward_hook(record_routing)

    generator = torch.Generator().manual_seed(100 + rank)  # different data per rank
    def batches():
        while True:
            tokens = torch.randint(0, config.vocab_size, (2, 32), generator=generator)
            yield {"tokens": tokens, "labels": torch.roll(tokens, -1, 1), "loss_mask": torch.ones(2, 32),
                   "position_ids": torch.arange(32).expand(2, 32)}

    forward_backward_no_pipelining(forward_step_func=forward_step, data_iterator=batches(), model=[model],
                                   num_microbatches=2, seq_length=32, micro_batch_size=2)
    results[rank] = {
        "before": [b.tolist() for b in before],
        "after": [r.expert_bias.tolist() for r in routers],
        "local": [c.tolist() for c in local],
        "recorded": [r.last_tokens_per_expert.tolist() for r in routers],
        "gamma": config.moe_router_bias_update_rate,
    }
    torch.distributed.destroy_process_group()


def test_bias_update_uses_the_load_summed_over_data_parallel_ranks():
    port = free_port()
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_rank_main, args=(port, results), nprocs=WORLD, join=True)
        results = dict(results)
    r0, r1 = results[0], results[1]
    assert r0["after"] == r1["after"]  # one update, applied identically everywhere
    for layer in range(len(r0["before"])):
        local0, local1 = torch.tensor(r0["local"][layer]), torch.tensor(r1["local"][layer])
        assert not torch.equal(local0, local1)  # the ranks really saw different tokens
        global_load = local0 + local1
        expected = torch.tensor(r0["before"][layer])
        expected[global_load > global_load.mean()] -= r0["gamma"]
        expected[global_load < global_load.mean()] += r0["gamma"]
        assert torch.equal(torch.tensor(r0["after"][layer]), expected)
        assert torch.equal(torch.tensor(r0["recorded"][layer]), global_load)
