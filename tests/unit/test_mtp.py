"""The MTP loss against report §2.2 computed independently, in value and in gradient.

The reference assembles §4 from the model's building blocks (embedding, decoder layers, the
MTP layer's norms, projection and transformer block, the shared output head) with its own
shifting, masking and lambda / D weighting. Two conventions follow the released DeepSeek-V3
weights, as Megatron does: M_k's input is [RMSNorm(Emb); RMSNorm(h)] (the paper writes the
halves in the other order, a permutation of M_k's columns), and h^0 is the main model's
output after its final RMSNorm.
"""

import torch
import torch.nn.functional as F
from megatron.core.transformer.multi_token_prediction import MTPLossAutoScaler, MTPLossLoggingHelper

from megatron_dsv3.config import StepSchedule, preset
from megatron_dsv3.specs import gpt_model

DEPTH, LAMBDA = 2, 0.3


def mtp_reference(model, ids_BS, labels_BS):
    """(L_main, [L_MTP^1, ..., L_MTP^D]) with report §2.2's shifts, as mean cross-entropies."""
    B, T = ids_BS.shape
    positions = torch.arange(T).expand(B, T)
    h = model.embedding(input_ids=ids_BS, position_ids=positions)  # [S, B, d]
    for layer in model.decoder.layers:
        h, _ = layer(h, attention_mask=None)
    h = model.decoder.final_layernorm(h)
    logits = model.output_layer(h)[0]  # [S, B, V]
    main = F.cross_entropy(logits.flatten(0, 1), labels_BS.T.flatten())

    losses = []
    for k in range(1, DEPTH + 1):
        mtp = model.mtp.layers[k - 1]
        shifted_ids = torch.cat([ids_BS[:, k:], torch.zeros(B, k, dtype=ids_BS.dtype)], dim=1)  # t_{i+k}
        e = model.embedding(input_ids=shifted_ids, position_ids=positions)
        h_prime = mtp.eh_proj(torch.cat([mtp.enorm(e), mtp.hnorm(h)], dim=-1))[0]  # M_k [.;.]
        h, _ = mtp.mtp_model_layer(h_prime, attention_mask=None)  # TRM_k
        h = mtp.final_layernorm(h)
        logits_k = model.output_layer(h)[0]  # the shared OutHead
        # position i predicts t_{i+k+1} = labels[i+k]; the last k positions have no target
        valid = T - k
        target = labels_BS[:, k:]  # [B, T-k]
        losses.append(F.cross_entropy(logits_k[:valid].transpose(0, 1).flatten(0, 1), target.flatten()))
    return main, losses


def test_mtp_loss_value_and_gradient_match_section_4(seeded):
    config = preset(
        "tiny", seq_length=32, mtp_num_layers=DEPTH, mtp_loss_scaling_factor=LAMBDA,
        mtp_loss_scaling_schedule=StepSchedule(((0.0, LAMBDA),)), moe_router_load_balancing_type="none",
    )
    model = gpt_model(config).train()
    ids = torch.randint(0, config.vocab_size, (2, 32))
    labels = torch.randint(0, config.vocab_size, (2, 32))

    MTPLossLoggingHelper.tracker.clear()  # sized by the first model that logged into it
    MTPLossAutoScaler.set_loss_scale(torch.tensor(1.0))
    per_token = model(ids, torch.arange(32).expand(2, 32), None, labels=labels)
    per_token.mean().backward()  # the MTP losses ride along through MTPLossAutoScaler
    model_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    reported = MTPLossLoggingHelper.tracker["loss_values"].clone()
    MTPLossLoggingHelper.clean_metrics_in_tracker()

    model.zero_grad(set_to_none=True)
    main, mtp_losses = mtp_reference(model, ids, labels)
    torch.testing.assert_close(per_token.mean(), main, rtol=1e-6, atol=0)
    torch.testing.assert_close(reported, torch.stack(mtp_losses).detach(), rtol=1e-6, atol=0)
    (main + LAMBDA / DEPTH * sum(mtp_losses)).backward()  # L = L_main + (lambda / D) sum_k L_MTP^k
    for name, param in model.named_parameters():
        torch.testing.assert_close(model_grads[name], param.grad, rtol=1e-5, atol=1e-8, msg=name)
    assert model_grads["mtp.layers.1.eh_proj.weight"].abs().sum() > 0  # depth 2 is trained
