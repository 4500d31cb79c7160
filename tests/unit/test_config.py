"""Presets, parameter counts and config-time validation (report §4.2)."""

import pytest
import torch

from megatron_dsv3.config import (
    PAPER_GAMMA_SCHEDULE,
    PAPER_MTP_LAMBDA_SCHEDULE,
    PRESETS,
    ConfigError,
    StepSchedule,
    check_runs_on_cpu,
    count_parameters,
    fp8_inner_dims,
    moe_layer_pattern,
    num_dense_prefix,
    preset,
)
from megatron_dsv3.specs import gpt_model


def test_deepseek_v3_has_the_papers_parameter_counts():
    total, active = count_parameters(preset("deepseek-v3"))
    assert abs(total - 671e9) / 671e9 < 0.01, total
    assert abs(active - 37e9) / 37e9 < 0.03, active


def test_deepseek_v3_preset_is_the_papers_table():
    c = preset("deepseek-v3")
    assert (c.num_layers, c.hidden_size, c.num_attention_heads) == (61, 7168, 128)
    assert num_dense_prefix(moe_layer_pattern(c)) == 3 and c.ffn_hidden_size == 18432
    assert (c.num_moe_experts, c.moe_router_topk, c.moe_ffn_hidden_size) == (256, 8, 2048)
    assert (c.moe_router_num_groups, c.moe_router_group_topk) == (8, 4)
    assert (c.q_lora_rank, c.kv_lora_rank, c.qk_head_dim, c.qk_pos_emb_head_dim, c.v_head_dim) == (1536, 512, 128, 64, 128)
    assert c.mtp_num_layers == 1 and c.vocab_size == 129280 and c.moe_router_topk_scaling_factor == 2.5
    assert c.moe_router_score_function == "sigmoid" and c.moe_router_enable_expert_bias and c.qk_layernorm


@pytest.mark.parametrize("name", ["tiny", "proxy"])
def test_count_matches_the_built_megatron_model(name, seeded):
    """The closed-form count equals the parameters Megatron actually allocates (MTP excluded)."""
    overrides = {} if name == "tiny" else dict(
        num_layers=2, hidden_size=128, ffn_hidden_size=256, num_attention_heads=2, q_lora_rank=64,
        kv_lora_rank=64, qk_head_dim=32, qk_pos_emb_head_dim=16, v_head_dim=32, num_moe_experts=16,
        moe_ffn_hidden_size=64, moe_shared_expert_intermediate_size=64, vocab_size=300, seq_length=64,
        transformer_impl="local", moe_token_dispatcher_type="allgather", use_cpu_initialization=True,
    )
    config = preset(name, **overrides)
    model = gpt_model(config)
    built = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("mtp."))
    assert count_parameters(config)[0] == built


def test_deepseek_v2_lite_has_its_published_size():
    total, _ = count_parameters(preset("deepseek-v2-lite"))  # without query compression
    assert abs(total - 15.7e9) / 15.7e9 < 0.01, total


def test_local_backend_rejects_mla_without_query_compression():
    with pytest.raises(ValueError, match="q_lora_rank=None.*Fix:"):
        gpt_model(preset("tiny", q_lora_rank=None))


def test_every_preset_validates():
    for name in PRESETS:
        preset(name)


INVALID = [
    # (overrides, the field the error must name)
    (dict(moe_router_topk=9), "moe_router_topk"),  # topk > experts
    (dict(moe_router_num_groups=3), "moe_router_num_groups"),  # groups do not divide experts
    (dict(moe_router_group_topk=5), "moe_router_group_topk"),  # group_topk > groups
    (dict(moe_router_topk=3, moe_router_group_topk=2), "moe_router_topk"),  # topk not divisible over groups
    (dict(moe_router_topk=4, moe_router_num_groups=4, moe_router_group_topk=1), "moe_router_topk"),  # 4 from a 2-expert group
    (dict(moe_router_group_topk=None), "moe_router_group_topk"),  # groups without group_topk
    (dict(qk_pos_emb_head_dim=7), "qk_pos_emb_head_dim"),  # odd rope dim
    (dict(qk_pos_emb_head_dim=0), "qk_pos_emb_head_dim"),
    (dict(kv_lora_rank=0), "kv_lora_rank"),
    (dict(q_lora_rank=10_000), "q_lora_rank"),
    (dict(mtp_num_layers=-1), "mtp_num_layers"),
    (dict(mtp_num_layers=200), "mtp_num_layers"),  # depth beyond the sequence
    (dict(mtp_loss_scaling_factor=-0.3), "mtp_loss_scaling_factor"),
    (dict(fp8_blockwise="emulate"), "hidden_size"),  # 64 is not a multiple of 128
    (dict(fp8="e4m3", fp8_recipe="blockwise"), "fp8"),  # a silent no-op without TE
    (dict(fp8_blockwise="te"), "transformer_impl"),  # TE's recipe on the local backend
    (dict(fp8_blockwise="fp4"), "fp8_blockwise"),
    (dict(moe_expert_capacity_factor=1.0), "moe_expert_capacity_factor"),  # the paper drops no token
    (dict(moe_router_score_function="softmax"), "moe_router_enable_expert_bias"),
    (dict(expert_model_parallel_size=3), "expert_model_parallel_size"),
    (dict(fb_overlap=True), "fb_overlap"),  # no expert parallelism: no all-to-all to overlap
    (dict(fb_overlap=True, expert_model_parallel_size=2, moe_token_dispatcher_type="allgather"), "fb_overlap"),
    (dict(moe_layer_freq=[0, 1]), "moe_layer_freq"),  # wrong length
    (dict(seq_length=1), "seq_length"),
    (dict(bias_update_rate_schedule=StepSchedule(((0.0, -0.001),))), "bias_update_rate_schedule"),
    (dict(moe_router_bias_update_rate=0.05), "moe_router_bias_update_rate"),  # disagrees with the schedule
    (dict(moe_aux_loss_coeff=[1e-3, -1e-4]), "moe_aux_loss_coeff"),
    # sizes and counts that crashed inside torch or Megatron (ZeroDivisionError, empty tensors), or trained nonsense
    (dict(hidden_size=0), "hidden_size"),
    (dict(ffn_hidden_size=-1), "ffn_hidden_size"),
    (dict(num_attention_heads=0), "num_attention_heads"),
    (dict(layernorm_epsilon=0.0), "layernorm_epsilon"),
    (dict(tensor_model_parallel_size=0), "tensor_model_parallel_size"),
    (dict(expert_model_parallel_size=0), "expert_model_parallel_size"),
    (dict(moe_router_num_groups=0), "moe_router_num_groups"),
    (dict(moe_layer_freq=0), "moe_layer_freq"),
    (dict(moe_ffn_hidden_size=0), "moe_ffn_hidden_size"),
    (dict(moe_router_topk_scaling_factor=-2.5), "moe_router_topk_scaling_factor"),
    (dict(moe_router_bias_update_rate=-0.001, bias_update_rate_schedule=None), "moe_router_bias_update_rate"),  # constant gamma
    (dict(moe_router_load_balancing_type="balanced"), "moe_router_load_balancing_type"),
    # --set values of the wrong JSON type
    (dict(seq_length=32.5), "seq_length"),
    (dict(moe_router_topk="4"), "moe_router_topk"),
    (dict(qk_layernorm="yes"), "qk_layernorm"),
    (dict(num_moe_experts="8"), "num_moe_experts"),
]


@pytest.mark.parametrize("overrides,field", INVALID, ids=[f for _, f in INVALID])
def test_impossible_configs_are_rejected_naming_field_value_and_fix(overrides, field):
    with pytest.raises(ConfigError) as err:
        preset("tiny", **overrides)
    message = str(err.value)
    assert err.value.field_name == field
    assert message.startswith(f"{field}=") and "Fix:" in message


def test_fp8_inner_dims_of_the_gpu_presets_are_whole_tiles():
    for name in ("deepseek-v3", "proxy"):
        dims = fp8_inner_dims(preset(name))
        assert {"hidden_size", "q_lora_rank", "kv_lora_rank", "moe_ffn_hidden_size"} <= set(dims)
        assert all(size % 128 == 0 for size in dims.values()), (name, dims)


def test_a_wrong_json_type_names_the_type_and_for_strings_the_quoting():
    with pytest.raises(ConfigError, match="seq_length=32.5: is a number; the field takes an integer. Fix: pass an integer."):
        preset("tiny", seq_length=32.5)
    with pytest.raises(ConfigError, match="""rope_type=1: is an integer; the field takes a string. Fix: --set values are JSON: """
                                          """quote a string, e.g. --set 'rope_type="yarn"'"""):
        preset("tiny", rope_type=1)
    assert preset("tiny", q_lora_rank=None).q_lora_rank is None  # Megatron annotates it int; None is no query compression


def test_unknown_preset_and_unknown_field_are_named():
    with pytest.raises(ConfigError, match="name='deepseek-v4'"):
        preset("deepseek-v4")
    with pytest.raises(ConfigError, match="moe_router_tpok=2"):
        preset("tiny", moe_router_tpok=2)


def test_cpu_rejects_cuda_only_choices_before_building():
    with pytest.raises(ConfigError, match="moe_token_dispatcher_type='flex'.*DeepEP.*'alltoall'"):
        check_runs_on_cpu(preset("tiny", moe_token_dispatcher_type="flex"))
    with pytest.raises(ConfigError, match="transformer_impl='transformer_engine'"):
        check_runs_on_cpu(preset("tiny", transformer_impl="transformer_engine"))
    check_runs_on_cpu(preset("tiny"))


def test_paper_schedules_switch_where_the_paper_does():
    total = 14_800  # in billions of tokens: the paper's 14.8T run
    assert PAPER_GAMMA_SCHEDULE.value_at(0, total) == 0.001
    assert PAPER_GAMMA_SCHEDULE.value_at(14_299, total) == 0.001
    assert PAPER_GAMMA_SCHEDULE.value_at(14_300, total) == 0.0
    assert PAPER_MTP_LAMBDA_SCHEDULE.value_at(9_999, total) == 0.3
    assert PAPER_MTP_LAMBDA_SCHEDULE.value_at(10_000, total) == 0.1
    # scaled to any run length: a 1B-token run switches lambda at 10/14.8 of it
    assert PAPER_MTP_LAMBDA_SCHEDULE.value_at(675_000_000, 10**9) == 0.3
    assert PAPER_MTP_LAMBDA_SCHEDULE.value_at(676_000_000, 10**9) == 0.1


def test_apply_token_schedules_sets_the_fields_megatron_reads_each_step():
    c = preset("deepseek-v3")
    c.apply_token_schedules(consumed_tokens=14_500, total_tokens=14_800)
    assert c.moe_router_bias_update_rate == 0.0 and c.mtp_loss_scaling_factor == 0.1
    c.apply_token_schedules(consumed_tokens=0, total_tokens=14_800)
    assert c.moe_router_bias_update_rate == 0.001 and c.mtp_loss_scaling_factor == 0.3


def test_dtype_fields_accept_names_from_the_command_line():
    assert preset("deepseek-v3", params_dtype="bfloat16").params_dtype is torch.bfloat16
    assert preset("tiny", moe_router_dtype="fp64").moe_router_dtype == "fp64"  # Megatron's own strings
    with pytest.raises(ConfigError, match="params_dtype='bf17'"):
        preset("tiny", params_dtype="bf17")


def test_bad_schedule_is_rejected():
    with pytest.raises(ConfigError, match="steps="):
        StepSchedule(((0.5, 0.1),))
