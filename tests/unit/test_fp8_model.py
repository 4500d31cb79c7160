"""The local backend really trains in (emulated) FP8 when the config asks (report §3.3)."""

import torch
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

from megatron_dsv3.config import preset
from megatron_dsv3.fp8.linear import FP8AttentionOutputLinear, FP8ColumnParallelLinear, FP8RowParallelLinear
from megatron_dsv3.specs import gpt_model


def build(fp8, **overrides):
    torch.manual_seed(0)
    from megatron.core import tensor_parallel

    tensor_parallel.random.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
    overrides = {"seq_length": 32, **overrides, "fp8_blockwise": fp8}
    return gpt_model(preset("tiny-fp8", **overrides))


def test_every_decoder_linear_is_fp8_and_the_paper_s_exceptions_are_not():
    model = build("emulate")
    fp8_types = (FP8ColumnParallelLinear, FP8RowParallelLinear)
    for name, module in model.named_modules():
        if not isinstance(module, (ColumnParallelLinear, RowParallelLinear)):
            continue
        high_precision = name == "output_layer" or name.endswith("eh_proj")  # output head; MTP projection
        assert isinstance(module, fp8_types) != high_precision, name
    attention = model.decoder.layers[0].self_attention
    assert isinstance(attention.linear_proj, FP8AttentionOutputLinear)  # power-of-2 input scales
    assert not isinstance(attention.linear_q_down_proj, FP8AttentionOutputLinear)
    moe = model.decoder.layers[1].mlp
    assert isinstance(moe.experts.local_experts[0].linear_fc1, FP8ColumnParallelLinear)
    assert isinstance(moe.shared_experts.linear_fc2, FP8RowParallelLinear)
    assert type(moe.router.weight) is torch.nn.Parameter and moe.router.weight.dtype == torch.float32


def test_fp8_model_tracks_the_fp32_model_and_keeps_fp32_master_weights():
    """All-dense layers: with MoE, FP8 noise flips some routing decisions, and the routed
    experts' gradients then legitimately differ (the convergence benchmark covers MoE)."""
    dense = dict(moe_layer_freq=[0, 0, 0])
    fp32, fp8 = build(None, **dense), build("emulate", **dense)
    fp8.load_state_dict(fp32.state_dict())
    tokens = torch.randint(0, 257, (2, 32))
    positions = torch.arange(32).expand(2, 32)
    logits = {}
    for label, model in (("fp32", fp32), ("fp8", fp8)):
        model.eval()
        out = model(tokens, positions, None)
        out.float().pow(2).mean().backward()
        logits[label] = out.detach()
    rel = (logits["fp8"] - logits["fp32"]).norm() / logits["fp32"].norm()
    assert 1e-3 < rel < 0.1, rel  # really quantised; E4M3 ~3% per GEMM, a dozen GEMMs in series
    for (name, p32), (_, p8) in zip(fp32.named_parameters(), fp8.named_parameters()):
        assert p8.dtype == torch.float32, name
        if p32.grad is not None and p32.grad.norm() > 0:
            cosine = torch.nn.functional.cosine_similarity(p8.grad.flatten(), p32.grad.flatten(), dim=0)
            assert cosine > 0.99, (name, float(cosine))
