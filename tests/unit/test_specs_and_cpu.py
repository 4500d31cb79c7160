"""Specs for both entry points (Python and Megatron-LM's --spec) and the CPU layer's contract."""

import pytest
import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.moe.moe_layer import MoELayer

from megatron_dsv3 import cpu
from megatron_dsv3.attention import MLASDPAttention
from megatron_dsv3.config import ConfigError, moe_layer_pattern, preset
from megatron_dsv3.routing import LoadRecordingRouter
from megatron_dsv3.specs import HAVE_TE, decoder_block_spec, gpt_model, local_layer_spec, te_layer_spec


def layer_kinds(model):
    return [isinstance(layer.mlp, MoELayer) for layer in model.decoder.layers]


def test_model_has_first_k_dense_layers_mla_norms_and_our_modules(seeded):
    config = preset("tiny", num_layers=4)  # first layer dense, as the preset's first-k
    model = gpt_model(config)
    assert layer_kinds(model) == [False, True, True, True] == [bool(p) for p in moe_layer_pattern(config)]
    for layer in model.decoder.layers:
        attention = layer.self_attention
        assert isinstance(attention.core_attention, MLASDPAttention)
        assert isinstance(attention.q_layernorm, torch.nn.RMSNorm) and isinstance(attention.kv_layernorm, torch.nn.RMSNorm)
    moe = model.decoder.layers[1].mlp
    assert isinstance(moe.router, LoadRecordingRouter) and moe.shared_experts is not None
    assert moe.router.expert_bias is not None and moe.router.score_function == "sigmoid"
    assert isinstance(model.mtp.layers[0].mtp_model_layer.mlp.router, LoadRecordingRouter)


def test_megatron_lm_spec_object_builds_the_same_layer_kinds(seeded):
    """`--spec megatron_dsv3.specs local_layer_spec`: Megatron-LM hands GPTModel the object as is."""
    config = preset("tiny", num_layers=4, mtp_num_layers=None)  # Megatron-LM builds MTP from its own spec
    model = GPTModel(config=config, transformer_layer_spec=local_layer_spec, vocab_size=config.vocab_size,
                     max_sequence_length=config.seq_length, position_embedding_type="rope")
    assert layer_kinds(model) == layer_kinds(gpt_model(config))
    assert isinstance(model.decoder.layers[1].mlp.router, LoadRecordingRouter)
    assert isinstance(model.decoder.layers[0].self_attention.core_attention, MLASDPAttention)
    out = model(torch.randint(0, 257, (1, 16)), torch.arange(16)[None], None)
    assert out.shape == (1, 16, config.vocab_size)


@pytest.mark.skipif(HAVE_TE, reason="checks the message when Transformer Engine is missing")
def test_te_backend_without_te_says_how_to_fix_it():
    with pytest.raises(ImportError, match="Transformer Engine.*Fix:"):
        decoder_block_spec(preset("tiny"), backend="te")
    with pytest.raises(ImportError, match="Transformer Engine"):
        GPTModel(config=preset("tiny"), transformer_layer_spec=te_layer_spec, vocab_size=257, max_sequence_length=128)


def test_cpu_layer_is_idempotent_and_checks_the_config():
    assert cpu.enable() and cpu.enable()
    assert torch.cuda.current_device() == torch.device("cpu")
    with pytest.raises(ConfigError, match="flex"):
        cpu.enable(preset("tiny", moe_token_dispatcher_type="flex"))
    with pytest.raises(ConfigError, match="transformer_engine"):
        cpu.enable(preset("tiny", transformer_impl="transformer_engine"))


def test_cpu_layer_is_a_no_op_where_cuda_exists(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    patched = torch.cuda.current_device
    assert cpu.enable(preset("tiny", moe_token_dispatcher_type="flex")) is False  # no CPU checks either
    assert torch.cuda.current_device is patched


def test_megatron_lm_spec_rejects_a_grouped_gemm_mismatch():
    config = preset("tiny", mtp_num_layers=None, moe_grouped_gemm=True)
    with pytest.raises(ValueError, match="moe_grouped_gemm=True.*Fix: drop --moe-grouped-gemm"):
        GPTModel(config=config, transformer_layer_spec=local_layer_spec, vocab_size=257, max_sequence_length=128)


def test_training_loop_rejects_precision_it_cannot_train_before_building():
    from megatron_dsv3.training.loop import TrainArgs, train

    with pytest.raises(ConfigError, match="params_dtype=torch.bfloat16.*Fix:"):
        train(TrainArgs(overrides={"params_dtype": "bfloat16"}, steps=2, warmup_steps=0))


def test_training_loop_rejects_the_fb_overlap_without_fb_steps():
    from megatron_dsv3.training.loop import TrainArgs

    with pytest.raises(ValueError, match="fb_overlap with pipeline_schedule='1f1b': FB steps are the two-chunk schedules'"):
        TrainArgs(fb_overlap=True)
