"""Presets as Megatron-LM flags: one table from `DeepSeekV3Config` fields to Megatron-LM's flags.

`expand_argv` puts the flags of `--dsv3-preset` (the table `PRESET_FLAGS`, its switches and
what they imply) and of `--dsv3-fp8 te` before the command line's own, so a later flag
overrides a preset's; a `--num-layers` without `--moe-layer-freq` gets the preset's
first-k-dense pattern for that many layers, as `config.preset(name, num_layers=...)` does.
`FLAG_OF_FIELD` names the flag of a config field in launch errors.
The way back: `model_config(args)` is the `DeepSeekV3Config` of Megatron-LM's parsed flags.
"""

from __future__ import annotations

import argparse
import dataclasses

from megatron.core.transformer.transformer_config import MLATransformerConfig
from megatron.training.arguments import core_transformer_config_from_args

from megatron_dsv3.config import (
    FP8_BLOCKWISE_BACKENDS,
    PRESETS,
    DeepSeekV3Config,
    StepSchedule,
    preset,
    preset_moe_layer_freq,
)
from megatron_dsv3.launch.errors import require

# DeepSeekV3Config field -> the Megatron-LM flag(s) taking its value.
PRESET_FLAGS = {
    "num_layers": ("--num-layers",),
    "hidden_size": ("--hidden-size",),
    "ffn_hidden_size": ("--ffn-hidden-size",),
    "num_attention_heads": ("--num-attention-heads",),
    "normalization": ("--normalization",),
    "layernorm_epsilon": ("--norm-epsilon",),
    "rope_type": ("--rope-type",),
    "rotary_base": ("--rotary-base",),
    "attention_dropout": ("--attention-dropout",),
    "hidden_dropout": ("--hidden-dropout",),
    "init_method_std": ("--init-method-std",),
    "q_lora_rank": ("--q-lora-rank",),
    "kv_lora_rank": ("--kv-lora-rank",),
    "qk_head_dim": ("--qk-head-dim",),
    "qk_pos_emb_head_dim": ("--qk-pos-emb-head-dim",),
    "v_head_dim": ("--v-head-dim",),
    "num_moe_experts": ("--num-experts",),
    "moe_layer_freq": ("--moe-layer-freq",),
    "moe_ffn_hidden_size": ("--moe-ffn-hidden-size",),
    "moe_shared_expert_intermediate_size": ("--moe-shared-expert-intermediate-size",),
    "moe_router_topk": ("--moe-router-topk",),
    "moe_router_num_groups": ("--moe-router-num-groups",),
    "moe_router_group_topk": ("--moe-router-group-topk",),
    "moe_router_score_function": ("--moe-router-score-function",),
    "moe_router_bias_update_rate": ("--moe-router-bias-update-rate",),
    "moe_router_load_balancing_type": ("--moe-router-load-balancing-type",),
    "moe_aux_loss_coeff": ("--moe-aux-loss-coeff",),
    "moe_router_topk_scaling_factor": ("--moe-router-topk-scaling-factor",),
    "moe_router_dtype": ("--moe-router-dtype",),
    "moe_token_dispatcher_type": ("--moe-token-dispatcher-type",),
    "mtp_num_layers": ("--mtp-num-layers",),
    "mtp_loss_scaling_factor": ("--mtp-loss-scaling-factor",),
    "transformer_impl": ("--transformer-impl",),
    "seq_length": ("--seq-length", "--max-position-embeddings"),
    "vocab_size": ("--padded-vocab-size",),  # the embedding's rows, whatever the tokenizer
    "bias_update_rate_schedule": ("--dsv3-gamma-schedule",),
    "mtp_loss_scaling_schedule": ("--dsv3-lambda-schedule",),
    "fp8_blockwise": ("--dsv3-fp8",),  # a preset's own FP8 (tiny-fp8: emulate); "te" needs --dsv3-fp8 te given
}
# Bool fields Megatron-LM spells as a switch: (switch, the value the switch means). The
# field's other value is Megatron-LM's default, and gives no flag.
PRESET_SWITCHES = {
    "qk_layernorm": ("--qk-layernorm", True),
    "moe_router_pre_softmax": ("--moe-router-pre-softmax", True),
    "moe_router_enable_expert_bias": ("--moe-router-enable-expert-bias", True),
    "moe_grouped_gemm": ("--moe-grouped-gemm", True),
    "use_cpu_initialization": ("--use-cpu-initialization", True),
    "attention_softmax_in_fp32": ("--attention-softmax-in-fp32", True),
    "bf16": ("--bf16", True),
    "gated_linear_unit": ("--swiglu", True),  # --swiglu also sets activation_func=silu
    "add_bias_linear": ("--disable-bias-linear", False),
    "share_embeddings_and_output_weights": ("--untie-embeddings-and-output-weights", False),
}
# Preset fields that follow from another flag above.
PRESET_IMPLIED = {"activation_func": "--swiglu", "params_dtype": "--bf16"}
# The flag of a config field, for errors: the tables above, and the parallel layout's.
FLAG_OF_FIELD = {
    **{field_name: flags[0] for field_name, flags in PRESET_FLAGS.items()},
    **{field_name: switch for field_name, (switch, _) in PRESET_SWITCHES.items()},
    "tensor_model_parallel_size": "--tensor-model-parallel-size",
    "expert_model_parallel_size": "--expert-model-parallel-size",
    "gradient_accumulation_fusion": "--no-gradient-accumulation-fusion",
    "fp16": "--fp16",
    "moe_router_fusion": "--moe-router-fusion",
    "fb_overlap": "--dsv3-fb-overlap",
}
# What our specs build, whatever the preset: MLA, with MLA's own RoPE, unfused (the config's
# default; Megatron-LM's fuses, which MLA allows with YaRN only).
MODEL_FLAGS = ("--multi-latent-attention", "--position-embedding-type", "rope", "--no-rope-fusion")
# By the preset's transformer_impl: without Apex, the local backend's norms and linears have no
# fused kernels (Megatron-LM's defaults ask for them); TE brings its own.
BACKEND_FLAGS = {
    "local": ("--no-persist-layer-norm", "--no-gradient-accumulation-fusion"),
    "transformer_engine": (),
}


def flag_value(value) -> str:
    if isinstance(value, StepSchedule):
        return ",".join(f"{start!r}:{v!r}" for start, v in value.steps)
    if isinstance(value, list):
        return "[" + ",".join(map(str, value)) + "]"
    return str(value)


def preset_argv(name: str) -> list[str]:
    """The Megatron-LM flags of preset `name`: its config's values (the preset's row of
    PRESETS, and DeepSeekV3Config's defaults for the rest) of every field in the tables."""
    require(name in PRESETS, f"--dsv3-preset={name}: no such preset", f"use one of {sorted(PRESETS)}")
    unmapped = set(PRESETS[name]) - set(PRESET_FLAGS) - set(PRESET_SWITCHES) - set(PRESET_IMPLIED)
    require(not unmapped, f"--dsv3-preset={name}: fields {sorted(unmapped)} have no Megatron-LM flag", "add them to megatron_dsv3.launch.PRESET_FLAGS")
    config = preset(name)
    argv = [*MODEL_FLAGS, *BACKEND_FLAGS[config.transformer_impl]]
    for field_name, flags in PRESET_FLAGS.items():
        value = getattr(config, field_name)
        if value is not None:
            for flag in flags:
                argv += [flag, flag_value(value)]
    for field_name, (switch, meaning) in PRESET_SWITCHES.items():
        if getattr(config, field_name) == meaning:
            argv.append(switch)
    return argv


# --dsv3-fp8 -> (DeepSeekV3Config.fp8_blockwise, Megatron-LM flags): "none", or one of the
# config's blockwise backends. "te" is TE's Float8BlockScaling recipe, which Megatron-LM's own
# flags select; the others are our FP8 Linear on the local backend (config.py).
TE_FP8_FLAGS = ("--fp8-format", "e4m3", "--fp8-recipe", "blockwise")
FP8_CHOICES = {
    "none": (None, ()),
    **{backend: (backend, TE_FP8_FLAGS if backend == "te" else ()) for backend in FP8_BLOCKWISE_BACKENDS},
}


def _positive_int(text: str | None) -> int | None:
    try:
        value = int(text)
    except (TypeError, ValueError):
        return None  # not given, or Megatron-LM's parser names the bad value
    return value if value > 0 else None


def expand_argv(argv: list[str]) -> list[str]:
    """`argv` with the flags of its `--dsv3-preset` and `--dsv3-fp8` put before it.

    With a preset, a `--num-layers` on the command line and no `--moe-layer-freq`, the
    preset's `--moe-layer-freq` is its first-k-dense pattern recomputed for that many layers
    (`preset_moe_layer_freq`), as `config.preset` does for a `num_layers` override."""
    early = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    early.add_argument("--dsv3-preset")
    early.add_argument("--dsv3-fp8", choices=FP8_CHOICES, default="none")
    early.add_argument("--num-layers")
    early.add_argument("--moe-layer-freq")
    known, _ = early.parse_known_args(argv)
    prefix = preset_argv(known.dsv3_preset) if known.dsv3_preset else []
    num_layers = _positive_int(known.num_layers)
    if prefix and num_layers and known.moe_layer_freq is None and "--moe-layer-freq" in prefix:
        prefix[prefix.index("--moe-layer-freq") + 1] = flag_value(preset_moe_layer_freq(known.dsv3_preset, num_layers))
    return prefix + list(FP8_CHOICES[known.dsv3_fp8][1]) + list(argv)


def model_config(args: argparse.Namespace) -> DeepSeekV3Config:
    """The model config of Megatron-LM's parsed args, with what Megatron keeps elsewhere.

    `core_transformer_config_from_args` builds an `MLATransformerConfig` whatever class it is
    given when `--multi-latent-attention` is on, so its fields are carried over into ours."""
    mla = core_transformer_config_from_args(args, config_class=MLATransformerConfig)
    fields = {f.name: getattr(mla, f.name) for f in dataclasses.fields(MLATransformerConfig) if f.init}
    require(args.padded_vocab_size is not None, "the vocabulary size is unknown before the tokenizer is built",
             "pass --padded-vocab-size (a --dsv3-preset does)")
    return DeepSeekV3Config(
        **fields,
        vocab_size=args.padded_vocab_size,
        seq_length=args.seq_length,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        fp8_blockwise=FP8_CHOICES[args.dsv3_fp8][0],
        fb_overlap=args.dsv3_fb_overlap,
        bias_update_rate_schedule=args.dsv3_gamma_schedule,
        mtp_loss_scaling_schedule=args.dsv3_lambda_schedule,
        preset_name=args.dsv3_preset or "custom",
    )
