"""Presets for DeepSeek-V3-style models and config-time validation (DeepSeek-V3 report §4.2).

`preset(name, **overrides)` returns a `DeepSeekV3Config`, a subclass of Megatron's
`MLATransformerConfig` that adds the fields Megatron keeps elsewhere (vocab size, sequence
length) and the paper's token schedules for gamma and lambda. Every config is validated
when it is built: an impossible combination raises `ConfigError` naming the field, the value
and the fix, before Megatron's own (terser) assertions and before any work starts.

Validation is one function per section of the report (`VALIDATORS`, run in order by
`validate`). Each reads only the fields named in its docstring, by attribute, so any object
with those attributes can be checked, not only a `DeepSeekV3Config`.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import types
import typing
from dataclasses import dataclass

import torch
from megatron.core.transformer.transformer_config import MLATransformerConfig

# DeepSeek-V3 report §3.3: 1x128 activation tiles, 128x128 weight blocks.
FP8_TILE = 128
# The backends of our blockwise FP8 GEMM (`fp8.blockwise_gemm`), and the config's choices for
# `fp8_blockwise`: those, or "te" for Transformer Engine's own blockwise recipe.
FP8_GEMM_BACKENDS = ("emulate", "scaled_mm", "auto")
FP8_BLOCKWISE_BACKENDS = ("te", *FP8_GEMM_BACKENDS)
FP8_BACKENDS_ON_CPU = ("emulate", "auto")  # "auto" resolves to "emulate" without a Hopper GPU


class ConfigError(ValueError):
    """An impossible configuration: names the field, the value and the fix."""

    def __init__(self, field_name: str, value, rule: str, fix: str):
        self.field_name = field_name
        super().__init__(f"{field_name}={value!r}: {rule}. Fix: {fix}.")


@dataclass(frozen=True)
class StepSchedule:
    """A piecewise-constant value over the fraction of the run's tokens consumed.

    `steps` is ((start_fraction, value), ...) with the first start at 0.0; the paper's
    schedules are in tokens of a 14.8T run and are scaled to any run length this way.
    """

    steps: tuple[tuple[float, float], ...]

    def __post_init__(self):
        starts = [s for s, _ in self.steps]
        if not starts or starts[0] != 0.0 or starts != sorted(starts) or starts[-1] >= 1.0:
            raise ConfigError(
                "steps", self.steps, "a schedule starts at fraction 0.0 and increases below 1.0",
                "give ((0.0, v0), (f1, v1), ...) with 0 < f1 < ... < 1",
            )

    def value_at(self, consumed_tokens: int, total_tokens: int) -> float:
        fraction = consumed_tokens / total_tokens
        value = self.steps[0][1]
        for start, step_value in self.steps:
            if fraction >= start:
                value = step_value
        return value


# DeepSeek-V3 report §4.2: gamma = 0.001 for the first 14.3T of 14.8T tokens, then 0.
PAPER_GAMMA_SCHEDULE = StepSchedule(((0.0, 0.001), (14.3 / 14.8, 0.0)))
# DeepSeek-V3 report §4.2: lambda = 0.3 for the first 10T of 14.8T tokens, then 0.1.
PAPER_MTP_LAMBDA_SCHEDULE = StepSchedule(((0.0, 0.3), (10.0 / 14.8, 0.1)))
# The constant Megatron reads each step -> the schedule that sets it (`apply_token_schedules`).
SCHEDULED_FIELDS = {
    "moe_router_bias_update_rate": "bias_update_rate_schedule",
    "mtp_loss_scaling_factor": "mtp_loss_scaling_schedule",
}

DISPATCHERS_ON_CPU = ("allgather", "alltoall")
TORCH_DTYPE_FIELDS = ("params_dtype", "pipeline_dtype", "autocast_dtype")  # not moe_router_dtype: a string


@dataclass
class DeepSeekV3Config(MLATransformerConfig):
    """Megatron's MLATransformerConfig plus what a DeepSeek-V3 run also needs."""

    vocab_size: int = 129280
    seq_length: int = 4096
    share_embeddings_and_output_weights: bool = False  # DeepSeek-V3 unties them
    # FP8 with 1x128 / 128x128 tiles (DeepSeek-V3 report §3.3), and which GEMM runs it: "te" (TE's
    # Float8BlockScaling recipe; sets fp8="e4m3", fp8_recipe="blockwise"), or on the local
    # backend our FP8 Linear with "emulate" (any device), "scaled_mm" (Hopper) or "auto".
    # None trains in high precision.
    fp8_blockwise: str | None = None
    # DualPipe's FB step (report §3.2.1): one micro-batch's forward and another's backward take
    # turns at their expert-parallel all-to-alls, each exchange in flight while the other
    # computes (megatron_dsv3/overlap/handover.py). Read by the DualPipe and DualPipeV executors.
    fb_overlap: bool = False
    bias_update_rate_schedule: StepSchedule | None = PAPER_GAMMA_SCHEDULE
    mtp_loss_scaling_schedule: StepSchedule | None = PAPER_MTP_LAMBDA_SCHEDULE
    preset_name: str = "custom"

    def __post_init__(self):
        validate(self)
        if self.fp8_blockwise == "te":  # Megatron maps this pair to TE Float8BlockScaling(E4M3)
            self.fp8, self.fp8_recipe = "e4m3", "blockwise"
        super().__post_init__()

    def apply_token_schedules(self, consumed_tokens: int, total_tokens: int) -> None:
        """Set gamma and lambda for the step about to run (both are read every step)."""
        if self.bias_update_rate_schedule is not None:
            self.moe_router_bias_update_rate = self.bias_update_rate_schedule.value_at(
                consumed_tokens, total_tokens
            )
        if self.mtp_loss_scaling_schedule is not None and self.mtp_num_layers:
            self.mtp_loss_scaling_factor = self.mtp_loss_scaling_schedule.value_at(
                consumed_tokens, total_tokens
            )


def moe_layer_pattern(config: MLATransformerConfig) -> list[int]:
    """1 for an MoE layer, 0 for a dense one, as Megatron reads `moe_layer_freq`."""
    if config.num_moe_experts is None:
        return [0] * config.num_layers
    freq = config.moe_layer_freq
    if isinstance(freq, int):
        return [1 if i % freq == 0 else 0 for i in range(config.num_layers)]
    return list(freq)


def first_k_dense_freq(num_layers: int, k: int) -> list[int]:
    """`moe_layer_freq` for 'the first k layers dense, the rest MoE' (DeepSeek-V3 report §4.2)."""
    return [0] * k + [1] * (num_layers - k)


def num_dense_prefix(pattern: list[int]) -> int:
    """How many dense layers come before the first MoE layer of a 0/1 layer pattern (the k of
    `first_k_dense_freq`; all of them when there is no MoE layer)."""
    return pattern.index(1) if 1 in pattern else len(pattern)


_COMMON = dict(
    normalization="RMSNorm",
    layernorm_epsilon=1e-6,
    gated_linear_unit=True,
    activation_func=torch.nn.functional.silu,
    add_bias_linear=False,
    qk_layernorm=True,  # the RMSNorms after c^Q and c^KV (DeepSeek-V3 report §4.2)
    rope_type="rope",  # 4K pre-training; YaRN is the context extension (DeepSeek-V3 report §4.3)
    rotary_base=10000,
    attention_dropout=0.0,
    hidden_dropout=0.0,
    moe_router_dtype="fp32",
    moe_grouped_gemm=False,
    bf16=False,
    params_dtype=torch.float32,
)

_DEEPSEEK_V3_ROUTER = dict(
    moe_router_score_function="sigmoid",
    moe_router_enable_expert_bias=True,
    moe_router_load_balancing_type="seq_aux_loss",
    moe_aux_loss_coeff=1e-4,
    moe_router_topk_scaling_factor=2.5,
    moe_router_pre_softmax=True,
)

# DeepSeek-V3 report §4.2, the 671B model. gamma and lambda are the default schedules' first
# values (`preset` sets them).
_DEEPSEEK_V3 = dict(
    **_COMMON,
    **_DEEPSEEK_V3_ROUTER,
    num_layers=61,
    moe_layer_freq=first_k_dense_freq(61, 3),
    hidden_size=7168,
    ffn_hidden_size=18432,
    num_attention_heads=128,
    q_lora_rank=1536,
    kv_lora_rank=512,
    qk_head_dim=128,
    qk_pos_emb_head_dim=64,
    v_head_dim=128,
    num_moe_experts=256,
    moe_ffn_hidden_size=2048,
    moe_shared_expert_intermediate_size=2048,  # 1 shared expert
    moe_router_topk=8,
    moe_router_num_groups=8,
    moe_router_group_topk=4,
    mtp_num_layers=1,
    init_method_std=0.006,
    vocab_size=129280,
    seq_length=4096,
    transformer_impl="transformer_engine",
    moe_token_dispatcher_type="alltoall",
)

# One table, one row a preset: the smaller DeepSeek-V3 shapes list only what they change.
PRESETS: dict[str, dict] = {
    "deepseek-v3": _DEEPSEEK_V3,
    # The public DeepSeek-V2-Lite config (16B): softmax router with an auxiliary loss.
    "deepseek-v2-lite": dict(
        **_COMMON,
        num_layers=27,
        moe_layer_freq=first_k_dense_freq(27, 1),
        hidden_size=2048,
        ffn_hidden_size=10944,
        num_attention_heads=16,
        q_lora_rank=None,
        kv_lora_rank=512,
        qk_head_dim=128,
        qk_pos_emb_head_dim=64,
        v_head_dim=128,
        num_moe_experts=64,
        moe_ffn_hidden_size=1408,
        moe_shared_expert_intermediate_size=2 * 1408,  # 2 shared experts
        moe_router_topk=6,
        moe_router_score_function="softmax",
        moe_router_pre_softmax=True,
        moe_router_load_balancing_type="aux_loss",
        moe_aux_loss_coeff=1e-3,
        mtp_num_layers=None,
        init_method_std=0.006,
        vocab_size=102400,
        seq_length=4096,
        bias_update_rate_schedule=None,
        mtp_loss_scaling_schedule=None,
        transformer_impl="transformer_engine",
        moe_token_dispatcher_type="alltoall",
    ),
    # DeepSeek-V3's shape at about 1.5B parameters (0.5B active), for one-GPU benchmarks.
    "proxy": {
        **_DEEPSEEK_V3,
        **dict(
            num_layers=12,
            moe_layer_freq=first_k_dense_freq(12, 1),
            hidden_size=1024,
            ffn_hidden_size=4096,
            num_attention_heads=16,
            q_lora_rank=384,
            kv_lora_rank=256,
            num_moe_experts=64,
            moe_ffn_hidden_size=512,
            moe_shared_expert_intermediate_size=512,
        ),
    },
    # Trains on CPU in minutes: every feature of the 671B model at toy width.
    "tiny": {
        **_DEEPSEEK_V3,
        **dict(
            num_layers=3,
            moe_layer_freq=first_k_dense_freq(3, 1),
            hidden_size=64,
            ffn_hidden_size=192,
            num_attention_heads=4,
            q_lora_rank=48,
            kv_lora_rank=32,
            qk_head_dim=16,
            qk_pos_emb_head_dim=8,
            v_head_dim=16,
            num_moe_experts=8,
            moe_ffn_hidden_size=32,
            moe_shared_expert_intermediate_size=32,
            moe_router_topk=2,
            moe_router_num_groups=4,
            moe_router_group_topk=2,
            init_method_std=0.02,
            vocab_size=257,  # 256 bytes + end-of-document
            seq_length=128,
            # A CPU run of a few hundred steps, not 100K+: the bias must cross the O(1) spread of
            # sigmoid affinities within tens of steps, so gamma is 10x the paper's (same shape).
            bias_update_rate_schedule=StepSchedule(((0.0, 0.01), (14.3 / 14.8, 0.0))),
            transformer_impl="local",
            moe_token_dispatcher_type="alltoall",  # the expert-parallel dispatcher; on one rank it equals allgather bit for bit
            use_cpu_initialization=True,
        ),
    },
}
# tiny widened so every GEMM's inner dimension is whole 128-wide tiles, in emulated FP8 (DeepSeek-V3 report §3.3)
PRESETS["tiny-fp8"] = {
    **PRESETS["tiny"],
    **dict(
        hidden_size=128,
        ffn_hidden_size=384,
        q_lora_rank=128,
        kv_lora_rank=128,
        qk_head_dim=32,
        qk_pos_emb_head_dim=16,
        v_head_dim=32,
        moe_ffn_hidden_size=128,
        moe_shared_expert_intermediate_size=128,
        fp8_blockwise="emulate",
    ),
}


def preset_moe_layer_freq(name: str, num_layers: int) -> list[int]:
    """Preset `name`'s first-k-dense pattern for `num_layers` layers: its dense prefix k (at most
    num_layers), then MoE. What `preset(name, num_layers=...)` uses when `moe_layer_freq` is not
    overridden, and the launch's `--num-layers` after `--dsv3-preset`."""
    k = num_dense_prefix(PRESETS[name]["moe_layer_freq"])
    return first_k_dense_freq(num_layers, min(k, num_layers))


def preset(name: str, **overrides) -> DeepSeekV3Config:
    """The named preset with `overrides` applied, validated.

    A scheduled constant (`SCHEDULED_FIELDS`) that neither the row nor `overrides` gives is the
    first value of its schedule: the one in `overrides`, else the preset's own (so switching a
    schedule off keeps its starting value as the constant). A constant that is given must agree
    with a schedule that is set (`validate_schedules`).
    """
    if name not in PRESETS:
        raise ConfigError("name", name, "no such preset", f"use one of {sorted(PRESETS)}")
    defaults = {f.name: f.default for f in dataclasses.fields(DeepSeekV3Config)}
    for key in overrides:
        if key not in defaults:
            raise ConfigError(
                key, overrides[key], "not a field of DeepSeekV3Config / MLATransformerConfig",
                "check the spelling against megatron.core's TransformerConfig",
            )
    for key, value in overrides.items():  # "bfloat16" from a command line's --set
        if key in TORCH_DTYPE_FIELDS and isinstance(value, str):
            _check(isinstance(getattr(torch, value, None), torch.dtype), key, value, "not a torch dtype", "use e.g. 'bfloat16' or 'float32'")
            overrides[key] = getattr(torch, value)
        else:
            check_field_type(key, value)
    fields = {**PRESETS[name], **overrides, "preset_name": name}
    if "num_layers" in overrides and "moe_layer_freq" not in overrides:
        fields["moe_layer_freq"] = preset_moe_layer_freq(name, overrides["num_layers"])
    for constant, schedule_name in SCHEDULED_FIELDS.items():
        schedule = fields.get(schedule_name)
        if schedule is None:
            schedule = PRESETS[name].get(schedule_name, defaults[schedule_name])
        if constant not in fields and schedule is not None:
            fields[constant] = schedule.steps[0][1]
    return DeepSeekV3Config(**fields)


def parse_override(text: str) -> tuple[str, object]:
    """A command line's `--set FIELD=JSON`, as (field, value) for `preset(name, **overrides)`
    (an argparse `type`: a malformed one is a usage error naming the option)."""
    field_name, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"--set {text!r}: expected FIELD=JSON, e.g. --set moe_router_topk=4")
    try:
        return field_name, json.loads(value)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"--set {text!r}: the value is not JSON ({error}); quote strings: "
                                         "--set 'rope_type=\"yarn\"'") from error


@functools.cache
def _field_types() -> dict:
    return typing.get_type_hints(DeepSeekV3Config)


def _matches(value, hint) -> bool | None:
    """Whether `value` (JSON-shaped: a --set value) is of type `hint`; None where no JSON value
    could say (callables, modules, dataclasses)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is typing.Any:
        return True
    if origin in (typing.Union, types.UnionType):
        answers = [_matches(value, arg) for arg in args]
        return True if True in answers else (None if None in answers else False)
    if hint is type(None):
        return value is None
    if origin is typing.Literal:
        return value in args
    if origin in (list, tuple) or hint in (list, tuple):
        return isinstance(value, (list, tuple)) and all(_matches(item, args[0]) is not False for item in value) if args else isinstance(value, (list, tuple))
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    return None


# Fields whose Megatron annotation omits None though None is a value Megatron reads.
NULLABLE_FIELDS = {"q_lora_rank"}  # None: no query compression (MLASelfAttention)
_JSON_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "null",
               list: "a list", tuple: "a list", dict: "an object"}


def _type_name(hint) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(arg) for arg in typing.get_args(hint))
    if typing.get_origin(hint) in (list, tuple):
        return "a list"
    return _JSON_NAMES.get(hint, getattr(hint, "__name__", str(hint)))


def check_field_type(field_name: str, value) -> None:
    """An override's value against its field's annotation (`--set` values are JSON)."""
    hint = _field_types()[field_name]
    if (value is None and field_name in NULLABLE_FIELDS) or _matches(value, hint) is not False:
        return
    fix = ("--set values are JSON: quote a string, e.g. --set 'rope_type=\"yarn\"'" if _matches("", hint)
           else f"pass {_type_name(hint)}")
    raise ConfigError(field_name, value, f"is {_JSON_NAMES.get(type(value), type(value).__name__)}; the field takes "
                                         f"{_type_name(hint)}", fix)


def _check(ok: bool, field_name: str, value, rule: str, fix: str) -> None:
    if not ok:
        raise ConfigError(field_name, value, rule, fix)


def validate_basics(c) -> None:
    """Sizes every model needs, and the parallel sizes, before any rule divides by one.

    Reads num_layers, vocab_size, seq_length, hidden_size, ffn_hidden_size,
    num_attention_heads, layernorm_epsilon and the `PARALLEL_SIZES`.
    """
    _check(c.num_layers >= 1, "num_layers", c.num_layers, "needs at least one layer", "set num_layers >= 1")
    _check(c.vocab_size >= 2, "vocab_size", c.vocab_size, "needs at least two tokens", "set vocab_size to the tokenizer's size")
    _check(c.seq_length >= 2, "seq_length", c.seq_length, "a next-token loss needs 2 or more tokens", "set seq_length >= 2")
    for name in ("hidden_size", "ffn_hidden_size", "num_attention_heads"):
        _check(getattr(c, name) >= 1, name, getattr(c, name), "a size must be positive", f"set {name} >= 1")
    _check(c.layernorm_epsilon > 0, "layernorm_epsilon", c.layernorm_epsilon, "RMSNorm divides by sqrt(mean + epsilon)",
           "use a small positive value such as 1e-6")
    for name in PARALLEL_SIZES:
        value = getattr(c, name)
        _check(value is None or value >= 1, name, value, "a parallel size counts ranks: at least 1", f"set {name} >= 1")


# The parallel sizes every config has (None: Megatron's default, the tensor-parallel size).
PARALLEL_SIZES = ("tensor_model_parallel_size", "pipeline_model_parallel_size", "context_parallel_size",
                  "expert_model_parallel_size", "expert_tensor_parallel_size")
# Megatron's router: the load-balancing types it knows (TopKRouter).
LOAD_BALANCING_TYPES = ("aux_loss", "seq_aux_loss", "global_aux_loss", "sinkhorn", "quantile_balancing", "none")


def validate_parallelism(c) -> None:
    """The parallel layout fits the model: TP divides the heads, EP divides the experts, and
    the FB overlap has expert-parallel all-to-alls to overlap.

    Reads tensor_model_parallel_size, num_attention_heads, num_moe_experts, and
    expert_model_parallel_size when there are experts; fb_overlap, moe_token_dispatcher_type.
    """
    _check(
        c.num_attention_heads % c.tensor_model_parallel_size == 0,
        "num_attention_heads", c.num_attention_heads,
        f"not divisible by tensor_model_parallel_size={c.tensor_model_parallel_size}",
        "choose a TP size that divides the heads",
    )
    if c.num_moe_experts:
        _check(
            c.num_moe_experts % c.expert_model_parallel_size == 0,
            "expert_model_parallel_size", c.expert_model_parallel_size,
            f"does not divide num_moe_experts={c.num_moe_experts}", "choose an EP size that divides the experts",
        )
    if c.fb_overlap:
        _check(
            bool(c.num_moe_experts) and c.expert_model_parallel_size > 1 and c.moe_token_dispatcher_type == "alltoall",
            "fb_overlap", c.fb_overlap,
            "the FB step hands over at expert-parallel all-to-alls, and this model has none "
            f"(num_moe_experts={c.num_moe_experts}, expert_model_parallel_size={c.expert_model_parallel_size}, "
            f"moe_token_dispatcher_type={c.moe_token_dispatcher_type!r})",
            "set expert_model_parallel_size > 1 with moe_token_dispatcher_type='alltoall', or fb_overlap=False",
        )


def validate_mla(c) -> None:
    """Multi-head latent attention (DeepSeek-V3 report §2.1.1).

    Reads qk_pos_emb_head_dim, qk_head_dim, v_head_dim, kv_lora_rank, q_lora_rank,
    num_attention_heads.
    """
    _check(
        c.qk_pos_emb_head_dim > 0 and c.qk_pos_emb_head_dim % 2 == 0,
        "qk_pos_emb_head_dim", c.qk_pos_emb_head_dim,
        "RoPE rotates pairs of channels, so the decoupled RoPE dim must be even and positive",
        "use an even value such as 64 (the paper's d_h^R)",
    )
    _check(c.qk_head_dim > 0, "qk_head_dim", c.qk_head_dim, "must be positive", "use the paper's 128")
    _check(c.v_head_dim > 0, "v_head_dim", c.v_head_dim, "must be positive", "use the paper's 128")
    _check(
        0 < c.kv_lora_rank < c.num_attention_heads * (c.qk_head_dim + c.v_head_dim),
        "kv_lora_rank", c.kv_lora_rank,
        "the KV latent must be positive and smaller than the keys and values it compresses",
        f"use 0 < kv_lora_rank < {c.num_attention_heads * (c.qk_head_dim + c.v_head_dim)} (paper: 512)",
    )
    _check(
        c.q_lora_rank is None or 0 < c.q_lora_rank < c.num_attention_heads * (c.qk_head_dim + c.qk_pos_emb_head_dim),
        "q_lora_rank", c.q_lora_rank,
        "the query latent must be positive and smaller than the queries it compresses",
        "use None for no query compression or a rank like the paper's 1536",
    )


def validate_moe(c) -> None:
    """DeepSeekMoE layers and their routing (DeepSeek-V3 report §2.1.2).

    Reads num_layers, moe_layer_freq, num_moe_experts, and when there are experts
    moe_router_topk, moe_expert_capacity_factor, moe_router_num_groups, moe_router_group_topk,
    moe_router_enable_expert_bias, moe_router_score_function, moe_aux_loss_coeff.
    """
    _check(not isinstance(c.moe_layer_freq, int) or c.moe_layer_freq >= 1, "moe_layer_freq", c.moe_layer_freq,
           "an integer N means one MoE layer every N layers: at least 1", "use first_k_dense_freq(num_layers, k)")
    pattern = moe_layer_pattern(c)
    _check(
        len(pattern) == c.num_layers and set(pattern) <= {0, 1},
        "moe_layer_freq", c.moe_layer_freq,
        f"must give 0 (dense) or 1 (MoE) for each of the {c.num_layers} layers",
        "use first_k_dense_freq(num_layers, k)",
    )
    if not c.num_moe_experts:
        return
    for name in ("moe_ffn_hidden_size", "moe_shared_expert_intermediate_size"):
        value = getattr(c, name)
        _check(value is None or value >= 1, name, value, "a size must be positive", f"set {name} >= 1 (or None)")
    types = c.moe_router_load_balancing_type if isinstance(c.moe_router_load_balancing_type, list) else [c.moe_router_load_balancing_type]
    _check(set(types) <= set(LOAD_BALANCING_TYPES), "moe_router_load_balancing_type", c.moe_router_load_balancing_type,
           "not a load-balancing type Megatron's router knows", f"use one of {LOAD_BALANCING_TYPES} (paper: 'seq_aux_loss')")
    _check(c.moe_router_topk_scaling_factor is None or c.moe_router_topk_scaling_factor > 0, "moe_router_topk_scaling_factor",
           c.moe_router_topk_scaling_factor, "scales the gates of the chosen experts: must be positive", "paper: 2.5; None for 1")
    _check(c.bias_update_rate_schedule is not None or c.moe_router_bias_update_rate >= 0,  # else validate_schedules
           "moe_router_bias_update_rate", c.moe_router_bias_update_rate,
           "gamma, the bias update speed, cannot be negative (the bias would move away from balance)", "paper: 0.001")
    E, K = c.num_moe_experts, c.moe_router_topk
    _check(0 < K <= E, "moe_router_topk", K, f"must be between 1 and num_moe_experts={E}", f"set moe_router_topk <= {E}")
    _check(
        c.moe_expert_capacity_factor is None,
        "moe_expert_capacity_factor", c.moe_expert_capacity_factor,
        "the paper drops no token in training or inference", "leave it None",
    )
    groups, group_topk = c.moe_router_num_groups, c.moe_router_group_topk
    _check(
        (groups is None) == (group_topk is None),
        "moe_router_group_topk", group_topk,
        f"node-limited routing needs both moe_router_num_groups (={groups}) and moe_router_group_topk",
        "set both (paper: 8 groups, top-4) or neither",
    )
    if groups is not None:
        _check(groups >= 1, "moe_router_num_groups", groups, "counts groups: at least 1", "paper: 8 (one per node)")
        _check(E % groups == 0, "moe_router_num_groups", groups, f"does not divide num_moe_experts={E}", "choose a group count that divides the experts")
        _check(
            0 < group_topk <= groups, "moe_router_group_topk", group_topk,
            f"must be between 1 and moe_router_num_groups={groups}", f"set moe_router_group_topk <= {groups}",
        )
        _check(
            K % group_topk == 0, "moe_router_topk", K,
            f"is not divisible over moe_router_group_topk={group_topk} chosen groups "
            "(each group is scored by its top topk/group_topk affinities)",
            "make topk a multiple of group_topk (paper: 8 over 4)",
        )
        _check(
            K // group_topk <= E // groups, "moe_router_topk", K,
            f"needs {K // group_topk} experts from each chosen group but a group has {E // groups}",
            "lower topk or use fewer, larger groups",
        )
    _check(
        not c.moe_router_enable_expert_bias or c.moe_router_score_function == "sigmoid",
        "moe_router_enable_expert_bias", c.moe_router_enable_expert_bias,
        f"bias-balanced routing is defined on sigmoid affinities, not {c.moe_router_score_function!r}",
        "set moe_router_score_function='sigmoid'",
    )
    coefficients = c.moe_aux_loss_coeff if isinstance(c.moe_aux_loss_coeff, (list, tuple)) else [c.moe_aux_loss_coeff]
    _check(
        all(v is None or v >= 0 for v in coefficients),
        "moe_aux_loss_coeff", c.moe_aux_loss_coeff, "a loss weight cannot be negative", "paper: alpha = 0.0001",
    )


def validate_mtp(c) -> None:
    """Multi-token prediction (DeepSeek-V3 report §2.2).

    Reads mtp_num_layers, seq_length, and mtp_loss_scaling_factor when the depth is not 0.
    """
    depth = c.mtp_num_layers or 0
    _check(depth >= 0, "mtp_num_layers", c.mtp_num_layers, "the MTP depth D cannot be negative", "use 0 (or None) for no MTP, 1 as in the paper")
    _check(
        depth < c.seq_length - 1, "mtp_num_layers", c.mtp_num_layers,
        f"depth D predicts D+1 tokens ahead, which seq_length={c.seq_length} cannot hold",
        "lower the depth or lengthen the sequence",
    )
    if depth:
        _check(
            c.mtp_loss_scaling_factor is not None and c.mtp_loss_scaling_factor >= 0,
            "mtp_loss_scaling_factor", c.mtp_loss_scaling_factor, "lambda cannot be negative", "paper: 0.3 then 0.1",
        )


def validate_schedules(c) -> None:
    """The token schedules of gamma and lambda (DeepSeek-V3 report §4.2): no negative value,
    and each constant Megatron reads starts at its schedule's first value.

    Reads bias_update_rate_schedule and mtp_loss_scaling_schedule; with a gamma schedule,
    moe_router_bias_update_rate; with a lambda schedule, mtp_num_layers and (for a depth above
    0) mtp_loss_scaling_factor.
    """
    for field_name, name in SCHEDULED_FIELDS.items():
        schedule = getattr(c, name)
        if schedule is None:
            continue
        _check(all(v >= 0 for _, v in schedule.steps), name, schedule, "gamma and lambda cannot be negative", "use the paper's schedules")
        if field_name == "mtp_loss_scaling_factor" and not c.mtp_num_layers:
            continue
        _check(
            getattr(c, field_name) == schedule.steps[0][1], field_name, getattr(c, field_name),
            f"disagrees with {name}, which starts at {schedule.steps[0][1]}",
            f"set {field_name} to the schedule's first value, or {name}=None for a constant",
        )


def validate_fp8(c) -> None:
    """Blockwise FP8 training (DeepSeek-V3 report §3.3): every GEMM's inner dimension is cut
    into 128-wide tiles.

    Reads fp8_blockwise, fp8, fp8_recipe, transformer_impl, tensor_model_parallel_size, and
    with fp8_blockwise set the inner dimensions of `fp8_inner_dims`.
    """
    _check(
        c.fp8_blockwise in (None, *FP8_BLOCKWISE_BACKENDS), "fp8_blockwise", c.fp8_blockwise,
        "unknown FP8 GEMM backend", f"use one of {FP8_BLOCKWISE_BACKENDS} or None",
    )
    _check(
        not (c.fp8 and c.transformer_impl == "local"), "fp8", c.fp8,
        "Megatron's fp8 flags only act through Transformer Engine; on the local backend they are a silent no-op",
        "use fp8_blockwise='emulate' (or 'scaled_mm' on Hopper) for FP8 on the local backend",
    )
    if c.fp8_blockwise is None:
        return
    if c.fp8_blockwise == "te":
        _check(
            c.transformer_impl == "transformer_engine", "transformer_impl", c.transformer_impl,
            "fp8_blockwise='te' is TE's Float8BlockScaling recipe, which runs inside TE modules",
            "set transformer_impl='transformer_engine', or fp8_blockwise='emulate' on the local backend",
        )
        _check(
            c.fp8 in (None, "e4m3") and c.fp8_recipe in ("delayed", "blockwise"), "fp8_recipe", c.fp8_recipe,
            "the paper uses E4M3 with 1x128 / 128x128 block scaling for every tensor",
            "leave fp8 and fp8_recipe unset; fp8_blockwise='te' sets them",
        )
    else:
        _check(
            c.transformer_impl == "local", "transformer_impl", c.transformer_impl,
            f"fp8_blockwise={c.fp8_blockwise!r} is our FP8 Linear, which replaces the local backend's linears",
            "set transformer_impl='local', or fp8_blockwise='te' with Transformer Engine",
        )
        _check(
            c.tensor_model_parallel_size == 1, "tensor_model_parallel_size", c.tensor_model_parallel_size,
            "our FP8 Linear does no tensor-parallel communication", "use TP=1 (the paper uses none) or fp8_blockwise='te'",
        )
    for name, size in fp8_inner_dims(c).items():
        _check(
            size % FP8_TILE == 0, name, size,
            f"blockwise FP8 scales 1x{FP8_TILE} / {FP8_TILE}x{FP8_TILE} tiles along this GEMM's inner dimension",
            f"use a multiple of {FP8_TILE} or train this preset without fp8_blockwise",
        )


VALIDATORS = (
    validate_basics,
    validate_parallelism,
    validate_mla,
    validate_moe,
    validate_mtp,
    validate_schedules,
    validate_fp8,
)


def validate(c) -> None:
    """Reject impossible combinations with the field, the value and the fix: each of
    `VALIDATORS` in turn, so the first broken rule is the one reported."""
    for validator in VALIDATORS:
        validator(c)


def fp8_inner_dims(c: DeepSeekV3Config) -> dict[str, int]:
    """The inner (reduction) dimension of every Linear that runs in FP8."""
    dims = {
        "hidden_size": c.hidden_size,
        "kv_lora_rank": c.kv_lora_rank,
        "num_attention_heads*v_head_dim": c.num_attention_heads * c.v_head_dim,
        "ffn_hidden_size": c.ffn_hidden_size,
    }
    if c.q_lora_rank is not None:
        dims["q_lora_rank"] = c.q_lora_rank
    if c.num_moe_experts:
        dims["moe_ffn_hidden_size"] = c.moe_ffn_hidden_size
        if c.moe_shared_expert_intermediate_size:
            dims["moe_shared_expert_intermediate_size"] = c.moe_shared_expert_intermediate_size
    return dims


def check_runs_on_cpu(c) -> None:
    """Reject what cannot run on CPU, before any model is built.

    Reads moe_token_dispatcher_type, transformer_impl, bf16, fp16, use_cpu_initialization,
    moe_router_fusion, fp8_blockwise.
    """
    _check(
        c.moe_token_dispatcher_type in DISPATCHERS_ON_CPU,
        "moe_token_dispatcher_type", c.moe_token_dispatcher_type,
        "the flex dispatcher runs DeepEP's (or HybridEP's) CUDA kernels",
        "use moe_token_dispatcher_type='alltoall' (expert parallelism) or 'allgather' on CPU",
    )
    _check(
        c.transformer_impl == "local", "transformer_impl", c.transformer_impl,
        "Transformer Engine modules need a GPU", "use transformer_impl='local' on CPU",
    )
    _check(not c.bf16 and not c.fp16, "bf16", c.bf16, "the CPU path trains in fp32", "set bf16=False, fp16=False")
    _check(c.use_cpu_initialization, "use_cpu_initialization", c.use_cpu_initialization,
           "weights must be created on the CPU", "set use_cpu_initialization=True")
    _check(not c.moe_router_fusion, "moe_router_fusion", c.moe_router_fusion,
           "the fused router is a TE CUDA kernel", "set moe_router_fusion=False")
    _check(c.fp8_blockwise in (None, *FP8_BACKENDS_ON_CPU), "fp8_blockwise", c.fp8_blockwise,
           "this FP8 GEMM needs a Hopper GPU", "use fp8_blockwise='emulate' on CPU")


def count_parameters(c: MLATransformerConfig) -> tuple[int, int]:
    """(total, active per token) from the config alone, MTP modules excluded (DeepSeek-V3 report §4.2).

    Counts weights and norm scales; the expert bias is a buffer, not a parameter.
    Embedding and output head are counted in both (the paper's 671B / 37B do).
    """
    h, n_h = c.hidden_size, c.num_attention_heads
    q_head = c.qk_head_dim + c.qk_pos_emb_head_dim
    if c.q_lora_rank:
        attention = h * c.q_lora_rank + c.q_lora_rank + c.q_lora_rank * n_h * q_head
    else:
        attention = h * n_h * q_head
    attention += h * (c.kv_lora_rank + c.qk_pos_emb_head_dim) + c.kv_lora_rank
    attention += c.kv_lora_rank * n_h * (c.qk_head_dim + c.v_head_dim)
    attention += n_h * c.v_head_dim * h
    norms = 2 * h
    glu = 3 if c.gated_linear_unit else 2

    total = active = 0
    for is_moe in moe_layer_pattern(c):
        layer = attention + norms
        if is_moe:
            expert = glu * h * c.moe_ffn_hidden_size
            shared = glu * h * (c.moe_shared_expert_intermediate_size or 0)
            router = h * c.num_moe_experts
            total += layer + router + shared + c.num_moe_experts * expert
            active += layer + router + shared + c.moe_router_topk * expert
        else:
            dense = glu * h * c.ffn_hidden_size
            total += layer + dense
            active += layer + dense
    tied = getattr(c, "share_embeddings_and_output_weights", False)
    embedding_and_head = c.vocab_size * h * (1 if tied else 2) + h  # + final norm
    return total + embedding_and_head, active + embedding_and_head
