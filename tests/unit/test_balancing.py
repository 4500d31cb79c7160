"""The end-of-step bias update and the load statistics, through a real training step.

A step of the tiny model runs over several micro-batches with Megatron DDP and our
finalize function; forward hooks record every routing decision independently of the code
under test. Report §2.1.2: each bias moves by exactly gamma, down if its expert got more than
the mean load over the global batch, up if less.
"""

import pytest
import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

from megatron_dsv3.config import preset
from megatron_dsv3.pipeline.no_pipelining import forward_backward_no_pipelining
from megatron_dsv3.routing import LoadRecordingRouter, expert_load, finalize_model_grads_with_load
from megatron_dsv3.specs import gpt_model
from megatron_dsv3.training.forward_step import forward_step

MICROBATCHES, BATCH, SEQ = 3, 2, 32


def random_batches(vocab):
    while True:
        tokens = torch.randint(0, vocab, (BATCH, SEQ))
        yield {
            "tokens": tokens,
            "labels": torch.roll(tokens, -1, 1),
            "loss_mask": torch.ones(BATCH, SEQ),
            "position_ids": torch.arange(SEQ).expand(BATCH, SEQ),
        }


def test_one_step_moves_each_bias_by_gamma_by_the_sign_rule(seeded):
    config = preset("tiny", seq_length=SEQ)
    gamma = config.moe_router_bias_update_rate
    model = DistributedDataParallel(config, DistributedDataParallelConfig(), gpt_model(config))
    config.no_sync_func = model.no_sync
    config.finalize_model_grads_func = finalize_model_grads_with_load
    routers = [m for m in model.modules() if isinstance(m, LoadRecordingRouter)]
    assert len(routers) == 3  # layers 2 and 3, and the MTP layer
    with torch.no_grad():  # distinct starting biases, so "exactly +-gamma" is not trivially 0 +- gamma
        for r in routers:
            r.expert_bias.copy_(torch.randn_like(r.expert_bias) * 0.1)
    before = [r.expert_bias.clone() for r in routers]

    seen = {id(r): torch.zeros(config.num_moe_experts) for r in routers}

    def record_routing(router, inputs, outputs):
        seen[id(router)] += outputs[1].sum(0)  # routing_map [tokens, experts]

    hooks = [r.register_forward_hook(record_routing) for r in routers]
    forward_backward_no_pipelining(
        forward_step_func=forward_step, data_iterator=random_batches(config.vocab_size), model=[model],
        num_microbatches=MICROBATCHES, seq_length=SEQ, micro_batch_size=BATCH,
    )
    for h in hooks:
        h.remove()

    for router, old in zip(routers, before):
        load = seen[id(router)]
        assert load.sum() == MICROBATCHES * BATCH * SEQ * config.moe_router_topk  # the whole global batch
        mean = load.mean()
        expected = old.clone()
        expected[load > mean] -= gamma
        expected[load < mean] += gamma
        assert torch.equal(router.expert_bias, expected)
        moved = (router.expert_bias - old).abs()
        torch.testing.assert_close(moved[load != mean], torch.full_like(moved[load != mean], gamma), rtol=1e-5, atol=0)
        # the load statistics of the step are the same counts
        assert torch.equal(router.last_tokens_per_expert, load)
        assert router.last_max_violation == pytest.approx(float(load.max()) / float(mean) - 1, rel=1e-12)
        assert router.step_tokens_per_expert.sum() == 0  # reset for the next step

    layers = expert_load([model])
    assert [l.name for l in layers] == ["decoder.2", "decoder.3", "mtp.1"]


def test_evaluation_forwards_do_not_count_towards_the_load(seeded):
    config = preset("tiny", seq_length=SEQ)
    model = gpt_model(config).eval()
    batch = next(random_batches(config.vocab_size))
    with torch.no_grad():
        model(batch["tokens"], batch["position_ids"], None)
    routers = [m for m in model.modules() if isinstance(m, LoadRecordingRouter)]
    assert all(r.step_tokens_per_expert.sum() == 0 for r in routers)
