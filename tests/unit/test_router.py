"""The bias-balanced router against report §2.1.2 computed independently."""

import pytest
import torch
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.moe.moe_utils import (
    MoEAuxLossAutoScaler,
    clear_aux_losses_tracker,
    get_moe_layer_wise_logging_tracker,
)

from megatron_dsv3.config import preset
from megatron_dsv3.routing import LoadRecordingRouter, max_violation

E, K, GROUPS, M = 16, 4, 4, 2  # 16 experts in 4 groups; top-4 experts within the top-2 groups


def router_config(**overrides):
    return preset(
        "tiny", num_moe_experts=E, moe_router_topk=K, moe_router_num_groups=GROUPS, moe_router_group_topk=M, **overrides
    )


def make_router(config, bias_scale=0.3):
    router = LoadRecordingRouter(config=config, pg_collection=ProcessGroupCollection.use_mpu_process_groups())
    router.set_layer_number(1)
    with torch.no_grad():
        router.weight.normal_(0, 0.5)
        router.expert_bias.copy_(torch.randn(E) * bias_scale)
    return router


def route_reference(x_TD, weight_ED, bias_E, scale):
    """Report §2.1.2 with node-limited routing, in float64: (gates [T, E], chosen [T, E])."""
    s = torch.sigmoid(x_TD.double() @ weight_ED.double().T)  # s_i,t
    choice = s + bias_E.double()  # the bias only decides which experts are chosen
    T = s.shape[0]
    per_group = choice.view(T, GROUPS, E // GROUPS)
    group_score = per_group.topk(K // M, dim=-1).values.sum(-1)  # sum of the highest K/M per node
    group_mask = torch.zeros(T, GROUPS, dtype=torch.bool)
    group_mask.scatter_(1, group_score.topk(M, dim=-1).indices, True)
    expert_mask = group_mask.repeat_interleave(E // GROUPS, dim=1)
    top = choice.masked_fill(~expert_mask, float("-inf")).topk(K, dim=-1).indices
    chosen = torch.zeros(T, E, dtype=torch.bool).scatter_(1, top, True)
    g_prime = torch.where(chosen, s, torch.zeros_like(s))  # gate from the unbiased s
    return g_prime / g_prime.sum(-1, keepdim=True) * scale, chosen


def test_router_selects_by_biased_score_and_gates_by_unbiased_score(seeded):
    config = router_config()
    router = make_router(config).eval()
    x = torch.randn(24, 2, config.hidden_size)
    with torch.no_grad():
        probs, routing_map = router(x)
    gates, chosen = route_reference(x.view(-1, config.hidden_size), router.weight, router.expert_bias, 2.5)
    assert torch.equal(routing_map, chosen)
    torch.testing.assert_close(probs.double(), gates, rtol=1e-6, atol=1e-7)
    # Each token's gates sum to the routed scaling factor.
    torch.testing.assert_close(probs.sum(-1).double(), torch.full((48,), 2.5, dtype=torch.float64))

    # The test can tell s + b from s: the bias changes some selections...
    unbiased_gates, unbiased_chosen = route_reference(x.view(-1, config.hidden_size), router.weight, torch.zeros(E), 2.5)
    assert not torch.equal(chosen, unbiased_chosen)
    # ...and gating by s + b would give other values.
    s = torch.sigmoid(x.view(-1, config.hidden_size).double() @ router.weight.double().T)
    biased = torch.where(chosen, s + router.expert_bias.double(), torch.zeros_like(s))
    assert not torch.allclose(probs.double(), biased / biased.sum(-1, keepdim=True) * 2.5, atol=1e-3)


def test_no_token_reaches_more_than_group_topk_groups(seeded):
    config = router_config()
    router = make_router(config, bias_scale=1.0).eval()
    with torch.no_grad():
        _, routing_map = router(torch.randn(256, 1, config.hidden_size))
    groups_per_token = routing_map.view(-1, GROUPS, E // GROUPS).any(-1).sum(-1)
    assert groups_per_token.max() <= M
    assert (routing_map.sum(-1) == K).all()  # and no token is dropped


def sequence_balance_loss_reference(x_SBD, weight_ED, alpha):
    """Eq. 17-20 for each sequence, then the mean over the batch's sequences."""
    losses = []
    for b in range(x_SBD.shape[1]):
        s = torch.sigmoid(x_SBD[:, b].double() @ weight_ED.T)  # [T, E]
        T = s.shape[0]
        in_topk = torch.zeros_like(s).scatter_(1, s.topk(K, dim=-1).indices, 1.0)  # 1(s in TopK(s, K))
        f = E / (K * T) * in_topk.sum(0)
        P = (s / s.sum(-1, keepdim=True)).mean(0)  # s' normalised over experts, averaged over t
        losses.append(alpha * (f * P).sum())
    return torch.stack(losses).mean()


def test_sequence_wise_loss_matches_eq_17_to_20_in_value_and_gradient(seeded):
    alpha = 1e-4
    config = router_config(moe_aux_loss_coeff=alpha)
    router = make_router(config).train()
    x = torch.randn(32, 3, config.hidden_size)  # 3 sequences of 32 tokens
    clear_aux_losses_tracker()
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0))
    probs, _ = router(x)
    (probs * 0).sum().backward()  # only the attached balance loss reaches the router weight

    weight = router.weight.detach().double().requires_grad_()
    expected = sequence_balance_loss_reference(x, weight, alpha)
    expected.backward()
    recorded = get_moe_layer_wise_logging_tracker()["seq_load_balancing_loss"]["values"][0]
    torch.testing.assert_close(recorded.double() * alpha, expected.detach(), rtol=1e-5, atol=0)
    torch.testing.assert_close(router.weight.grad.double(), weight.grad, rtol=1e-4, atol=1e-12)
    clear_aux_losses_tracker()


def test_max_violation_is_max_over_mean_minus_one():
    assert max_violation(torch.tensor([2.0, 2.0, 2.0, 2.0])) == 0.0
    assert max_violation(torch.tensor([4.0, 2.0, 1.0, 1.0])) == pytest.approx(4 / 2 - 1)
