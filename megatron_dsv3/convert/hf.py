"""HF DeepSeek-V3 checkpoints <-> Megatron `dist_checkpointing` checkpoints, streamed.

Design note
-----------
What nvidia-modelopt 0.47 does (measured on this model, CPU, fp32, `preset("tiny")`):
  - `import_mcore_gpt_from_hf` fills a *live, materialised* GPTModel tensor by tensor from the
    safetensors files. For the decoder it is right: MLA with the q/kv latent norms, fused
    gate/up, `e_score_correction_bias` -> `expert_bias` (kept FP32 with
    `moe_router_dtype="fp32"`), our `LoadRecordingRouter` (a TopKRouter). With MTP it stops:
    `KeyError: 'mtp.eh_proj'` (its DeepSeek rule book has no `mtp.*` rows).
  - `export_mcore_gpt_to_hf` runs, but writes the MTP layer as `mtp.layers.0.*` without
    `enorm`, `hnorm`, `eh_proj`, `shared_head.*`: not DeepSeek's `model.layers.{N}.*` layout.
  - Its FP8 dequantisation (`get_safetensor(..., dequantize=True)`) multiplies in BF16 with
    `weight_scale_inv` rounded to BF16: on a 512x384 N(0, 0.02) weight, 22% of the elements
    differ from BF16(fp8 * scale) (max error 4.4e-4 against 2.4e-4 for correct rounding).
  - Both work on a live model, so the whole model is in memory (671B parameters), and
    nothing is checked against the file headers: a wrong kv_b_proj shape raises
    "RuntimeError: Error(s) in loading state_dict for ColumnParallelLinear: size mismatch for
    weight" (no tensor name, no file); an unknown tensor is silently ignored.
So the converter is ours; modelopt's importer serves as an independent check of our decoder
mapping in tests/unit/test_convert_hf.py.

What this module does:
  - `TABLE` maps each tensor kind, one row each (HF name, Megatron name, which rows of the
    Megatron tensor the HF tensor is, whether DeepSeek stores it in FP8). Megatron's
    `linear_fc1` is [gate; up]; every other tensor maps whole. Both directions read the table.
  - The Megatron model is built on the meta device: names, shapes and `sharded_state_dict()`
    without memory. Everything is checked against the safetensors headers (shard files,
    keys, shapes, dtypes) before a byte of output is written.
  - hf -> mcore streams (whose part is whose):
      safetensors  `safe_open` validates each shard's header once; the data is then read with
                   plain file reads at the header's offsets (`HFCheckpoint.read`): no memory
                   map, so no shard stays resident in this process;
      ours         each write item (a Megatron tensor, or one of linear_fc1's halves) is made
                   from its HF tensor when its turn comes (FP8 dequantised 128 rows at a time);
      torch DCP    `torch.distributed.checkpoint.save` plans and writes the torch_dist format;
                   our `_StreamingWriter` replaces FileSystemWriter's write step (DCP's own
                   `_write_item` per item, into one file per rank and ~`FILE_BYTES`): a thread
                   makes the next tensor while the last is written, both in one buffer of the
                   largest tensor's size, so memory does not grow with the shards;
      Megatron     `dist_checkpointing.save` (common.pt, metadata.json, and its check that every
                   tensor is written exactly once over all ranks).
    Under torchrun every rank checks everything, then writes a contiguous share of the write
    items (balanced by bytes; the others are marked as replicas, which dist_checkpointing
    does not write). The tensors are the single process's bit for bit.
  - mcore -> hf loads one layer at a time (`dist_checkpointing.load` of that layer's tensors
    only; `ShardedObject`s, which would be unpickled, are never loaded).
  - FP8: DeepSeek's 128x128 block format (`weight` float8_e4m3fn, `weight_scale_inv` FP32 of
    shape ceil(out/128) x ceil(in/128), weight = fp8 * scale) in plain PyTorch.
  - config.json: the input's is kept in the checkpoint as `hf_config.json` (plain JSON) and
    comes back from mcore -> hf as it was, but for the weights' format (`torch_dtype`/`dtype`,
    `quantization_config`); without it, config.json is made from the preset.
  - dtypes on export are what HF's `save_pretrained` writes for a BF16 model: BF16, but the
    router's `gate.weight` and `e_score_correction_bias` in FP32 (DeepseekV3's
    `_keep_in_fp32_modules_strict`; Megatron trains both in FP32 too). DeepSeek's release
    ships the gate in BF16: its round trip gives the same values in FP32.
  - Output goes to a temporary directory beside --out, renamed when complete.
  - The checkpoint has the local spec's names, TP=PP=EP=1 (dist_checkpointing reshards on
    load); `load_mcore_tensors` reads it back, and so does Megatron's own `dist_checkpointing.load`.

RoPE channel order: DeepSeek's weights produce the rotary channels as interleaved pairs
(x0, x1), (x2, x3), ...; Megatron's MLA de-interleaves them (`mla_rotary_interleaved=True`)
and HF with `rope_interleave=True` (its default) does the same, so q_b_proj and
kv_a_proj_with_mqa map unpermuted. HF's `rope_interleave=False` path assumes other weights
and is rejected.

Where HF transformers' DeepseekV3 differs from the paper (and from Megatron):
  - group score = sum of the top-2 affinities of a group, hard-coded; the paper and Megatron
    use the top K_r/M. Equal for the release (8/4 = 2), not for e.g. topk 2 of 2 groups.
  - `norm_topk_prob=False` skips the normalisation the paper (and Megatron) always does: rejected.
  - HF 5.x does not build the MTP module (`num_nextn_predict_layers` is config only), so
    only DeepSeek's release files carry `model.layers.{N}.*`.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, ShardedTensorFactory, apply_factories
from megatron.core.dist_checkpointing.strategies.torch import (
    MCoreSavePlanner,
    TorchDistSaveShardedStrategy,
    _replace_state_dict_keys_with_sharded_keys,
    mcore_to_pyt_state_dict,
)
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch.distributed.checkpoint import CheckpointException, FileSystemWriter
from torch.distributed.checkpoint.filesystem import DEFAULT_SUFFIX, SerializationFormat, _write_item
from torch.distributed.checkpoint.planner import WriteItemType
from torch.futures import Future
from tqdm import tqdm

from megatron_dsv3 import safe_load
from megatron_dsv3.config import FP8_TILE, DeepSeekV3Config, moe_layer_pattern, num_dense_prefix
from megatron_dsv3.fp8 import BlockwiseFP8, quantize_128x128
from megatron_dsv3.specs import gpt_model

SCALE_SUFFIX = "_scale_inv"  # "<name>.weight" -> "<name>.weight_scale_inv"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
HF_CONFIG_RECORD = "hf_config.json"  # in a converted checkpoint: the config.json it was converted from
FILE_BYTES = 4 << 30  # hf -> mcore starts a new .distcp file of its rank after this many bytes
SAFETENSORS_DTYPES = {
    "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F8_E4M3": torch.float8_e4m3fn,
}
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

GATE, UP = (0, 2), (1, 2)  # Megatron's linear_fc1 = [gate; up] along the output rows


class ConversionError(ValueError):
    """Bad input: names the tensor, the file and the fix."""


def _read_json(path: Path, what: str) -> dict:
    """A JSON file, or a ConversionError naming it and what is wrong."""
    try:
        loaded = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConversionError(f"{path}: not a readable JSON {what} ({error}). Fix: restore it from the checkpoint's source.") from None
    if not isinstance(loaded, dict):
        raise ConversionError(f"{path}: holds a JSON {type(loaded).__name__}, not the {what}'s object. Fix: restore it.")
    return loaded


@contextmanager
def _shard(path: Path):
    """`safe_open` of one safetensors file; a truncated or corrupted one is named."""
    try:
        with safe_open(path, "pt") as f:
            yield f
    except SafetensorError as error:
        raise ConversionError(f"{path}: not a readable safetensors file ({error}). Fix: re-download the shard.") from None


@dataclass(frozen=True)
class Rule:
    """One tensor kind.

    scope: where the names are instantiated. "model": once; "layer": every decoder layer and
      the MTP module's transformer layer; "dense" / "moe": the layers of that kind; "expert":
      each routed expert of each MoE layer; "mtp": each MTP module.
    hf / mcore: names with {L} (HF prefix "model.layers.{i}"), {M} (Megatron prefix) and {E}
      (expert index).
    rows: (i, n) when the HF tensor is row block i of n of the Megatron tensor.
    fp8: DeepSeek stores it as FP8 with 128x128 `weight_scale_inv` (linear weights of
      attention and MLPs; not embeddings, norms, the gate, lm_head or eh_proj).
    hf_dtype: the dtype export writes when it is not BF16: HF keeps the router's two tensors in
      FP32 (`_keep_in_fp32_modules_strict`). Import accepts any float dtype (the release's
      gate is BF16; its bias is FP32).
    copy_of_main: HF stores a copy of a main-model tensor that Megatron shares (MTP's
      embedding and head, report §2.2): import reads the main one, export writes the copy.
    """

    scope: str
    hf: str
    mcore: str
    rows: tuple[int, int] | None = None
    fp8: bool = False
    hf_dtype: torch.dtype | None = None
    copy_of_main: bool = False


TABLE: tuple[Rule, ...] = (
    Rule("model", "model.embed_tokens.weight", "embedding.word_embeddings.weight"),
    Rule("model", "model.norm.weight", "decoder.final_layernorm.weight"),
    Rule("model", "lm_head.weight", "output_layer.weight"),
    Rule("layer", "{L}.input_layernorm.weight", "{M}.input_layernorm.weight"),
    Rule("layer", "{L}.self_attn.q_a_proj.weight", "{M}.self_attention.linear_q_down_proj.weight", fp8=True),
    Rule("layer", "{L}.self_attn.q_a_layernorm.weight", "{M}.self_attention.q_layernorm.weight"),
    Rule("layer", "{L}.self_attn.q_b_proj.weight", "{M}.self_attention.linear_q_up_proj.weight", fp8=True),
    # [c^KV (kv_lora_rank) ; k^R (qk_rope_head_dim)] on both sides
    Rule("layer", "{L}.self_attn.kv_a_proj_with_mqa.weight", "{M}.self_attention.linear_kv_down_proj.weight", fp8=True),
    Rule("layer", "{L}.self_attn.kv_a_layernorm.weight", "{M}.self_attention.kv_layernorm.weight"),
    # per head [k^C (qk_nope_head_dim) ; v (v_head_dim)] on both sides
    Rule("layer", "{L}.self_attn.kv_b_proj.weight", "{M}.self_attention.linear_kv_up_proj.weight", fp8=True),
    Rule("layer", "{L}.self_attn.o_proj.weight", "{M}.self_attention.linear_proj.weight", fp8=True),
    Rule("layer", "{L}.post_attention_layernorm.weight", "{M}.pre_mlp_layernorm.weight"),
    Rule("dense", "{L}.mlp.gate_proj.weight", "{M}.mlp.linear_fc1.weight", rows=GATE, fp8=True),
    Rule("dense", "{L}.mlp.up_proj.weight", "{M}.mlp.linear_fc1.weight", rows=UP, fp8=True),
    Rule("dense", "{L}.mlp.down_proj.weight", "{M}.mlp.linear_fc2.weight", fp8=True),
    Rule("moe", "{L}.mlp.gate.weight", "{M}.mlp.router.weight", hf_dtype=torch.float32),
    Rule("moe", "{L}.mlp.gate.e_score_correction_bias", "{M}.mlp.router.expert_bias", hf_dtype=torch.float32),
    Rule("moe", "{L}.mlp.shared_experts.gate_proj.weight", "{M}.mlp.shared_experts.linear_fc1.weight", rows=GATE, fp8=True),
    Rule("moe", "{L}.mlp.shared_experts.up_proj.weight", "{M}.mlp.shared_experts.linear_fc1.weight", rows=UP, fp8=True),
    Rule("moe", "{L}.mlp.shared_experts.down_proj.weight", "{M}.mlp.shared_experts.linear_fc2.weight", fp8=True),
    Rule("expert", "{L}.mlp.experts.{E}.gate_proj.weight", "{M}.mlp.experts.local_experts.{E}.linear_fc1.weight", rows=GATE, fp8=True),
    Rule("expert", "{L}.mlp.experts.{E}.up_proj.weight", "{M}.mlp.experts.local_experts.{E}.linear_fc1.weight", rows=UP, fp8=True),
    Rule("expert", "{L}.mlp.experts.{E}.down_proj.weight", "{M}.mlp.experts.local_experts.{E}.linear_fc2.weight", fp8=True),
    # MTP (report §2.2): eh_proj's input is [enorm(Emb(t_{i+k})) ; hnorm(h)] on both sides
    Rule("mtp", "{L}.enorm.weight", "{M}.enorm.weight"),
    Rule("mtp", "{L}.hnorm.weight", "{M}.hnorm.weight"),
    Rule("mtp", "{L}.eh_proj.weight", "{M}.eh_proj.weight"),
    Rule("mtp", "{L}.shared_head.norm.weight", "{M}.final_layernorm.weight"),
    Rule("mtp", "{L}.embed_tokens.weight", "embedding.word_embeddings.weight", copy_of_main=True),
    Rule("mtp", "{L}.shared_head.head.weight", "output_layer.weight", copy_of_main=True),
)


@dataclass(frozen=True)
class Entry:
    """One HF tensor of this model: `rule` instantiated."""

    hf: str
    mcore: str
    rule: Rule
    group: str  # the HF shard it is exported to: "embed", "layer.<i>", "head"

    def rows_of(self, mcore_rows: int) -> slice:
        if self.rule.rows is None:
            return slice(0, mcore_rows)
        i, n = self.rule.rows
        return slice(i * mcore_rows // n, (i + 1) * mcore_rows // n)


def entries(config: DeepSeekV3Config) -> list[Entry]:
    """Every HF tensor of a model with `config`, in HF layer order."""
    n_layers = config.num_layers
    kinds = ["moe" if is_moe else "dense" for is_moe in moe_layer_pattern(config)]
    # (HF layer index, Megatron transformer-layer prefix, MTP module prefix or None, kind)
    layers = [(i, f"decoder.layers.{i}", None, kinds[i]) for i in range(n_layers)]
    mtp_kind = kinds[-1]  # the MTP block's layer is the last decoder layer's (specs.mtp_block_spec)
    layers += [
        (n_layers + d, f"mtp.layers.{d}.mtp_model_layer", f"mtp.layers.{d}", mtp_kind)
        for d in range(config.mtp_num_layers or 0)
    ]
    out = [Entry(r.hf, r.mcore, r, "embed" if r.hf == "model.embed_tokens.weight" else "head")
           for r in TABLE if r.scope == "model"]
    for i, layer_prefix, mtp_prefix, kind in layers:
        hf_prefix = f"model.layers.{i}"
        for rule in TABLE:
            if rule.scope in ("layer", kind):
                names = [(rule.hf.format(L=hf_prefix), rule.mcore.format(M=layer_prefix))]
            elif rule.scope == "expert" and kind == "moe":
                names = [(rule.hf.format(L=hf_prefix, E=e), rule.mcore.format(M=layer_prefix, E=e))
                         for e in range(config.num_moe_experts)]
            elif rule.scope == "mtp" and mtp_prefix is not None:
                names = [(rule.hf.format(L=hf_prefix), rule.mcore.format(M=mtp_prefix))]
            else:
                continue
            out += [Entry(hf, mcore, rule, f"layer.{i}") for hf, mcore in names]
    return out


# --- HF config.json <-> our config --------------------------------------------------------

class ConfigField(NamedTuple):
    hf: str  # config.json field; "rope_scaling.*" come from `rope_scaling` or `rope_parameters`
    ours: str  # the DeepSeekV3Config field that decides it (named in errors: --set it)
    value: Callable[[DeepSeekV3Config], object]  # what config.json must say for our config
    required: bool  # must config.json have it? (otherwise checked only when present)


# Import rejects a present field that disagrees; export writes every field.
HF_CONFIG_FIELDS: tuple[ConfigField, ...] = (
    ConfigField("vocab_size", "vocab_size", lambda c: c.vocab_size, True),
    ConfigField("hidden_size", "hidden_size", lambda c: c.hidden_size, True),
    ConfigField("num_hidden_layers", "num_layers", lambda c: c.num_layers, True),
    ConfigField("num_attention_heads", "num_attention_heads", lambda c: c.num_attention_heads, True),
    ConfigField("num_key_value_heads", "num_attention_heads", lambda c: c.num_attention_heads, False),
    ConfigField("intermediate_size", "ffn_hidden_size", lambda c: c.ffn_hidden_size, True),
    ConfigField("moe_intermediate_size", "moe_ffn_hidden_size", lambda c: c.moe_ffn_hidden_size, True),
    ConfigField("n_routed_experts", "num_moe_experts", lambda c: c.num_moe_experts, True),
    ConfigField("n_shared_experts", "moe_shared_expert_intermediate_size",
                lambda c: (c.moe_shared_expert_intermediate_size or 0) // c.moe_ffn_hidden_size, True),
    ConfigField("num_experts_per_tok", "moe_router_topk", lambda c: c.moe_router_topk, True),
    ConfigField("n_group", "moe_router_num_groups", lambda c: c.moe_router_num_groups, True),
    ConfigField("topk_group", "moe_router_group_topk", lambda c: c.moe_router_group_topk, True),
    ConfigField("routed_scaling_factor", "moe_router_topk_scaling_factor", lambda c: c.moe_router_topk_scaling_factor, True),
    ConfigField("first_k_dense_replace", "moe_layer_freq", lambda c: num_dense_prefix(moe_layer_pattern(c)), True),
    ConfigField("q_lora_rank", "q_lora_rank", lambda c: c.q_lora_rank, True),
    ConfigField("kv_lora_rank", "kv_lora_rank", lambda c: c.kv_lora_rank, True),
    ConfigField("qk_nope_head_dim", "qk_head_dim", lambda c: c.qk_head_dim, True),
    ConfigField("qk_rope_head_dim", "qk_pos_emb_head_dim", lambda c: c.qk_pos_emb_head_dim, True),
    ConfigField("v_head_dim", "v_head_dim", lambda c: c.v_head_dim, True),
    ConfigField("rms_norm_eps", "layernorm_epsilon", lambda c: c.layernorm_epsilon, False),
    ConfigField("num_nextn_predict_layers", "mtp_num_layers", lambda c: c.mtp_num_layers or 0, False),
    ConfigField("tie_word_embeddings", "share_embeddings_and_output_weights",
                lambda c: c.share_embeddings_and_output_weights, False),
    ConfigField("hidden_act", "activation_func", lambda c: c.activation_func.__name__, False),  # silu
    ConfigField("scoring_func", "moe_router_score_function", lambda c: c.moe_router_score_function, False),
    ConfigField("topk_method", "moe_router_enable_expert_bias",
                lambda c: "noaux_tc" if c.moe_router_enable_expert_bias else "greedy", False),
    ConfigField("norm_topk_prob", "(none: Megatron always normalises)", lambda c: True, False),
    ConfigField("rope_interleave", "(none: Megatron's MLA expects interleaved pairs)", lambda c: True, False),
    ConfigField("rope_theta", "rotary_base", lambda c: c.rotary_base, True),
    ConfigField("rope_scaling.type", "rope_type", lambda c: "yarn" if c.rope_type == "yarn" else "default", False),
)
HF_YARN_FIELDS: tuple[ConfigField, ...] = (
    ConfigField("rope_scaling.factor", "rotary_scaling_factor", lambda c: c.rotary_scaling_factor, True),
    ConfigField("rope_scaling.original_max_position_embeddings", "original_max_position_embeddings",
                lambda c: c.original_max_position_embeddings, True),
    ConfigField("rope_scaling.beta_fast", "beta_fast", lambda c: c.beta_fast, True),
    ConfigField("rope_scaling.beta_slow", "beta_slow", lambda c: c.beta_slow, True),
    ConfigField("rope_scaling.mscale", "mscale", lambda c: c.mscale, True),
    ConfigField("rope_scaling.mscale_all_dim", "mscale_all_dim", lambda c: c.mscale_all_dim, True),
)


def _config_fields(config: DeepSeekV3Config):
    return HF_CONFIG_FIELDS + (HF_YARN_FIELDS if config.rope_type == "yarn" else ())


def _flat_hf_config(raw: dict) -> dict:
    """config.json with the RoPE settings of either HF layout as `rope_theta`, `rope_scaling.*`."""
    rope = raw.get("rope_scaling") or raw.get("rope_parameters") or {}
    flat = {k: v for k, v in raw.items() if k not in ("rope_scaling", "rope_parameters")}
    flat.setdefault("rope_theta", rope.get("rope_theta"))
    kind = rope.get("rope_type", rope.get("type", "default"))
    flat["rope_scaling.type"] = "default" if kind in (None, "default") else kind
    flat.update({f"rope_scaling.{k}": v for k, v in rope.items() if k not in ("rope_theta", "rope_type", "type")})
    return flat


def _same(hf_value, ours) -> bool:
    if isinstance(ours, float) or isinstance(hf_value, float):
        return hf_value is not None and ours is not None and math.isclose(hf_value, ours, rel_tol=1e-9)
    return hf_value == ours


def check_hf_config(raw: dict, config: DeepSeekV3Config, where: str) -> None:
    """Reject a config.json that disagrees with `config`, naming the field and the fix."""
    flat = _flat_hf_config(raw)
    for field in _config_fields(config):
        ours, theirs = field.value(config), flat.get(field.hf)
        if theirs is None:
            if field.required and ours is not None:
                raise ConversionError(f"{where}: field {field.hf!r} is missing (the config gives {ours!r}). "
                                      "Fix: add it to config.json.")
            continue
        if not _same(theirs, ours):
            raise ConversionError(
                f"{where}: field {field.hf!r}={theirs!r} disagrees with preset {config.preset_name!r} "
                f"({field.ours} gives {ours!r}). Fix: choose the preset this checkpoint was made with, "
                f"or --set {field.ours}=<JSON> so that it gives {theirs!r}."
            )
    block = (raw.get("quantization_config") or {}).get("weight_block_size", [FP8_TILE, FP8_TILE])
    if list(block) != [FP8_TILE, FP8_TILE]:
        raise ConversionError(f"{where}: quantization_config.weight_block_size={block}: only DeepSeek's "
                              f"{FP8_TILE}x{FP8_TILE} blocks are supported. Fix: dequantise it first.")


FP8_QUANTIZATION_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                           "weight_block_size": [FP8_TILE, FP8_TILE]}  # DeepSeek's release


def max_position_embeddings(config: DeepSeekV3Config) -> int:
    """The context length config.json states: with YaRN, factor x original_max_position_embeddings
    (the release's 40 x 4096 = 163840; HF derives the YaRN factor from this quotient, so a smaller
    value would turn YaRN off), else the preset's sequence length."""
    if config.rope_type == "yarn":
        return round(config.rotary_scaling_factor * config.original_max_position_embeddings)
    return config.seq_length


def hf_config(config: DeepSeekV3Config, fp8: bool, recorded: dict | None = None) -> dict:
    """config.json for `config`'s weights, BF16 or (`fp8`) DeepSeek's FP8.

    `recorded`: the config.json the checkpoint was converted from (`hf_config.json` in it,
    checked against `config` by the caller). It comes back as it was, but for the weights'
    format: its `torch_dtype`/`dtype` say bfloat16 (`torch_dtype` is added when it has
    neither), `quantization_config` is DeepSeek's FP8 one (kept if it was one) or absent.
    Without it: the release's layout, from `config`.
    """
    if recorded is not None:
        out = copy.deepcopy(recorded)
        for key in [k for k in ("torch_dtype", "dtype") if k in out] or ["torch_dtype"]:
            out[key] = "bfloat16"
        if not fp8:
            out.pop("quantization_config", None)
        elif (out.get("quantization_config") or {}).get("quant_method") != "fp8":
            out["quantization_config"] = dict(FP8_QUANTIZATION_CONFIG)
        return out
    out = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
           "max_position_embeddings": max_position_embeddings(config), "torch_dtype": "bfloat16"}
    rope_scaling = {}
    for field in _config_fields(config):
        if field.hf.startswith("rope_scaling."):
            rope_scaling[field.hf.removeprefix("rope_scaling.")] = field.value(config)
        else:
            out[field.hf] = field.value(config)
    out["rope_scaling"] = rope_scaling if config.rope_type == "yarn" else None
    if fp8:
        out["quantization_config"] = dict(FP8_QUANTIZATION_CONFIG)
    return out


# --- FP8 128x128 blocks (DeepSeek's format) ---------------------------------------------------


def fp8_scale_shape(shape_OI: tuple[int, int]) -> tuple[int, int]:
    return tuple(-(-n // FP8_TILE) for n in shape_OI)


def _subnormal_inputs_kept() -> bool:
    """Whether FP32 multiplication sees subnormal inputs as they are (no denormals-are-zero mode,
    e.g. `torch.set_flush_denormal(True)`)."""
    return (torch.tensor([2.0**-130]) * 2.0**100).item() == 2.0**-30  # 2^-130: subnormal in FP32


def dequantize_fp8(weight_OI: torch.Tensor, scale_inv_BoBi: torch.Tensor, out: torch.Tensor | None = None,
                   scratch: ReusedMemory | None = None) -> torch.Tensor:
    """weight = FP8 weight * its block's `weight_scale_inv`, into `out` (default: a new FP32 tensor).

    DeepSeek's scale is our dequantisation multiplier (`fp8.BlockwiseFP8` with 128x128 tiles,
    whose `dequantize(float32)` gives the same values): each product is computed in FP32, where
    the code is exact, then stored in `out`'s dtype (one rounding for BF16). 128 rows at a
    time, in place in block-sized buffers (from `scratch` when given: no allocation at all),
    the scale broadcast over its block: no full-size FP32 scale or product is made.

    The codes are widened with integer operations, not torch's FP8 -> FP32 conversion (scalar
    on CPU, ~4x slower): E4M3 s.eeee.mmm becomes the BF16 bits s.0000eeee.mmm0000 (the int8
    code widened to int16, shifted left 4, masked with 0x87f0), which is the code's value
    times 2^-120 exactly (subnormal codes included: they become subnormal BF16), so its FP32
    product with scale * 2^120 (exact: a power of two) is the same real number as value * scale
    and rounds to the same bits. Where that could fail, torch's conversion is used instead: a
    block of rows with NaN codes (0x7f, 0xff), a |scale| >= 2^7 (scale * 2^120 would
    overflow), or a denormals-are-zero floating-point mode.
    """
    BlockwiseFP8(data=weight_OI, scale=scale_inv_BoBi, tile=(FP8_TILE, FP8_TILE), shape=tuple(weight_OI.shape))  # checks
    rows, cols = weight_OI.shape
    out = torch.empty((rows, cols), dtype=torch.float32) if out is None else out
    codes = weight_OI.view(torch.uint8)
    by_bits = scale_inv_BoBi.numel() > 0 and bool(scale_inv_BoBi.abs().max() < 2.0**7) and _subnormal_inputs_kept()
    scaled = scale_inv_BoBi * 2.0**120  # for codes widened by bits: their values x 2^-120
    n = min(FP8_TILE, rows) * cols  # elements of a block of rows
    work = scratch.tensor((7 * n,), torch.uint8) if scratch is not None else torch.empty(7 * n, dtype=torch.uint8)
    product_all, bits_all, marks_all = work[: 4 * n].view(torch.float32), work[4 * n : 6 * n].view(torch.int16), work[6 * n :]
    whole = cols - cols % FP8_TILE  # columns in whole 128-wide blocks
    for block, start in enumerate(range(0, rows, FP8_TILE)):
        stop = min(start + FP8_TILE, rows)
        shape = (stop - start, cols)
        product = out[start:stop] if out.dtype == torch.float32 else product_all[: math.prod(shape)].view(shape)
        scale = scale_inv_BoBi[block]
        if by_bits:
            marks = marks_all[: math.prod(shape)].view(shape)
            torch.bitwise_or(codes[start:stop], 0x80, out=marks)  # 0xff where a code is NaN (0x7f, 0xff)
        if by_bits and marks.max().item() != 0xFF:
            bits = bits_all[: math.prod(shape)].view(shape)
            bits.copy_(codes[start:stop].view(torch.int8))  # sign-extended
            bits.bitwise_left_shift_(4).bitwise_and_(0x87F0 - 0x10000)  # s.0000eeee.mmm0000 as int16
            product.copy_(bits.view(torch.bfloat16))
            scale = scaled[block]
        else:
            product.copy_(weight_OI[start:stop])
        if whole:
            product[:, :whole].unflatten(1, (whole // FP8_TILE, FP8_TILE)).mul_(scale[: whole // FP8_TILE, None])
        if whole < cols:
            product[:, whole:].mul_(scale[-1])
        if out.dtype != torch.float32:
            out[start:stop].copy_(product)
    return out


def quantize_fp8(weight_OI: torch.Tensor, name: str = "weight") -> tuple[torch.Tensor, torch.Tensor]:
    """(float8_e4m3fn weight, FP32 weight_scale_inv): DeepSeek's format is our 128x128 block
    quantisation (`fp8.quantize_128x128`: scale = block amax / 448, 1 for a zero block; codes
    clamped; a non-finite weight is an error naming `name`)."""
    blocks = quantize_128x128(weight_OI, name=name)
    return blocks.data, blocks.scale


# --- The Megatron side: a model on the meta device --------------------------------------------


def meta_model(config: DeepSeekV3Config):
    """The local-spec GPTModel of `config` with no storage: names, shapes, sharded_state_dict."""
    build = dataclasses.replace(
        config, transformer_impl="local", moe_token_dispatcher_type="allgather",
        use_cpu_initialization=True, perform_initialization=False,
        fp8_blockwise=None, fp8=None,  # the checkpoint holds master weights; FP8 is a runtime choice
    )
    with torch.device("meta"):
        return gpt_model(build)


def _tensor_specs(model) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    return {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


# --- The HF side: safetensors shards, read through their headers --------------------------------


class ReusedMemory:
    """Tensors carved from one buffer that is kept between calls (grown to the largest asked
    for); a tensor is valid until the next call. Memory in use again is already mapped:
    freshly allocated tensors cost the kernel a page fault per 4 KiB, about as much as
    dequantising them."""

    def __init__(self, nbytes: int = 0):
        self._storage = torch.UntypedStorage(0)
        self.reserve(nbytes)

    def reserve(self, nbytes: int) -> None:
        """Grow the buffer to `nbytes` (say the largest size first: each growth is a new buffer)."""
        if self._storage.nbytes() < nbytes:
            self._storage = torch.UntypedStorage(0)  # the old buffer goes first
            self._storage = torch.UntypedStorage(nbytes)

    def tensor(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        nbytes = math.prod(shape) * dtype.itemsize
        self.reserve(nbytes)
        return torch.empty(0, dtype=dtype).set_(self._storage[:nbytes], 0, shape)


def _data_spans(path: Path) -> dict[str, tuple[int, int]]:
    """Each tensor's byte range in a safetensors file, from its start. The format: an 8-byte
    little-endian header length, the JSON header, the data; `data_offsets` count from the data's
    start. Read after `safe_open` has validated the file (header, offsets within the file)."""
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(length))
    start = 8 + length
    return {name: (start + info["data_offsets"][0], start + info["data_offsets"][1])
            for name, info in header.items() if name != "__metadata__"}


@dataclass
class HFCheckpoint:
    """An HF checkpoint's tensors as its headers describe them; tensors are read one at a time."""

    directory: Path
    listing: Path  # the index (or the single file) that names the tensors
    file_of: dict[str, str]
    shape_of: dict[str, tuple[int, ...]]
    dtype_of: dict[str, str]  # safetensors dtype names ("BF16", "F8_E4M3", ...)
    span_of: dict[str, tuple[int, int]]  # byte range in its file

    @classmethod
    def open(cls, directory: str | os.PathLike) -> HFCheckpoint:
        directory = Path(directory)
        if (directory / INDEX_FILE).exists():
            listing = directory / INDEX_FILE
            file_of = _read_json(listing, "index").get("weight_map")
            if not isinstance(file_of, dict):
                raise ConversionError(f"{listing}: has no weight_map (tensor name -> shard file). Fix: re-download the index.")
        elif (directory / SINGLE_FILE).exists():
            listing = directory / SINGLE_FILE
            with _shard(listing) as f:
                file_of = dict.fromkeys(f.keys(), SINGLE_FILE)
        else:
            raise ConversionError(f"{directory}: neither {INDEX_FILE} nor {SINGLE_FILE}. Fix: point --hf at a "
                                  "directory saved with save_pretrained (safetensors).")
        names_in: dict[str, list[str]] = {}
        for name, file in file_of.items():
            names_in.setdefault(file, []).append(name)
        shape_of, dtype_of, span_of = {}, {}, {}
        for file, names in sorted(names_in.items()):
            path = directory / file
            if not path.exists():
                raise ConversionError(f"missing shard {path}: {listing.name} lists {len(names)} tensors in it, "
                                      f"e.g. {names[0]}. Fix: download the missing file.")
            with _shard(path) as f:
                present = set(f.keys())
                for name in names:
                    if name not in present:
                        raise ConversionError(f"tensor {name}: {listing.name} places it in {path}, which lacks it. "
                                              "Fix: re-download the shard or the index.")
                    header = f.get_slice(name)
                    shape_of[name], dtype_of[name] = tuple(header.get_shape()), header.get_dtype()
            spans = _data_spans(path)
            span_of.update((name, spans[name]) for name in names)
        return cls(directory, listing, file_of, shape_of, dtype_of, span_of)

    def where(self, name: str) -> Path:
        return self.directory / self.file_of[name]

    def nbytes(self, name: str) -> int:
        begin, end = self.span_of[name]
        return end - begin

    def dtype(self, name: str) -> torch.dtype:
        return SAFETENSORS_DTYPES[self.dtype_of[name]]

    def read(self, name: str, memory: ReusedMemory | None = None) -> torch.Tensor:
        """One tensor, in `memory`'s buffer when given (valid until its next use)."""
        nbytes = self.nbytes(name)
        data = memory.tensor((nbytes,), torch.uint8) if memory is not None else torch.empty(nbytes, dtype=torch.uint8)
        self.read_into(name, data)
        return data.view(self.dtype(name)).reshape(self.shape_of[name])

    def read_into(self, name: str, out: torch.Tensor) -> None:
        """Tensor `name`'s bytes into contiguous `out` (exactly as many bytes), by plain reads
        of its byte range: no memory map, so nothing of the shard stays in this process (the
        page cache keeps what the system can spare)."""
        path, (begin, end) = self.where(name), self.span_of[name]
        view, done = memoryview(out.view(-1).view(torch.uint8).numpy()), 0
        if len(view) != end - begin:
            raise ValueError(f"read_into({name}): {len(view)} bytes given for its {end - begin}")
        with open(path, "rb", buffering=0) as f:
            f.seek(begin)
            while done < len(view):  # one read returns at most ~2 GiB on Linux
                count = f.readinto(view[done:])
                if not count:
                    raise ConversionError(f"{path}: tensor {name} ends after {done} of its {end - begin} bytes. "
                                          "Fix: re-download the shard.")
                done += count


def _check_hf_tensors(hf: HFCheckpoint, expected: list[Entry], specs: dict) -> None:
    """Unknown, missing, mis-shaped and mis-typed tensors, each with its file and the fix."""
    problems = []
    wanted = {e.hf: e for e in expected}
    scales = {e.hf + SCALE_SUFFIX: e for e in expected if e.rule.fp8}
    for name in hf.file_of:
        if name not in wanted and name not in scales:
            problems.append(f"unknown tensor {name} in {hf.where(name)}: no DeepSeek-V3 tensor of this config "
                            "has that name. Fix: check the preset (layers, experts, MTP depth) against the checkpoint.")
    for entry in expected:
        name = entry.hf
        if name not in hf.file_of:
            problems.append(f"missing tensor {name}: not in {hf.listing}. Fix: use the complete "
                            "checkpoint, or a preset whose layers/experts/MTP depth match it.")
            continue
        shape = specs[entry.mcore][0]
        rows = entry.rows_of(shape[0])
        want_shape = (rows.stop - rows.start, *shape[1:])
        if hf.shape_of[name] != want_shape:
            problems.append(f"tensor {name} in {hf.where(name)} has shape {hf.shape_of[name]}; the config needs "
                            f"{want_shape}. Fix: choose the preset / --set values this checkpoint was made with.")
        got = SAFETENSORS_DTYPES.get(hf.dtype_of[name])
        scale = name + SCALE_SUFFIX
        if got == torch.float8_e4m3fn and entry.rule.fp8:
            if scale not in hf.file_of:
                problems.append(f"tensor {name} in {hf.where(name)} is FP8 but {scale} is missing. "
                                "Fix: use DeepSeek's files, which carry one scale per 128x128 block.")
            elif hf.shape_of[scale] != fp8_scale_shape(want_shape) or hf.dtype_of[scale] != "F32":
                problems.append(f"tensor {scale} in {hf.where(scale)} is {hf.dtype_of[scale]} "
                                f"{hf.shape_of[scale]}; expected F32 {fp8_scale_shape(want_shape)} "
                                f"(one per {FP8_TILE}x{FP8_TILE} block).")
        elif scale in hf.file_of:
            problems.append(f"tensor {scale} in {hf.where(scale)} scales {name}, which is not FP8. "
                            "Fix: remove the stray scale.")
        allowed = FLOAT_DTYPES + ((torch.float8_e4m3fn,) if entry.rule.fp8 else ())
        if got not in allowed:
            problems.append(f"tensor {name} in {hf.where(name)} has dtype {hf.dtype_of[name]}; expected one of "
                            f"{[str(d).removeprefix('torch.') for d in allowed]}. Fix: convert that tensor.")
    if problems:
        raise ConversionError(f"{len(problems)} problem(s) in {hf.directory}:\n  " + "\n  ".join(problems[:50]))


def _read_hf_into(hf: HFCheckpoint, name: str, out: torch.Tensor, memory: ReusedMemory | None = None,
                  scratch: ReusedMemory | None = None) -> None:
    """HF tensor `name` into `out` (its shape, the checkpoint's dtype); FP8 is dequantised.
    `memory` holds what is read (unless it is read into `out` itself), `scratch` the
    dequantisation's block buffers."""
    if hf.dtype(name) == out.dtype and out.is_contiguous():
        hf.read_into(name, out)
        return
    tensor = hf.read(name, memory)
    if tensor.dtype == torch.float8_e4m3fn:
        dequantize_fp8(tensor, hf.read(name + SCALE_SUFFIX), out=out, scratch=scratch)
    else:
        out.copy_(tensor)


# --- Output directory: temporary, renamed when complete ----------------------------------------


def _process_alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _rank_and_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _any_rank(flag: bool) -> bool:
    """Whether `flag` holds on any rank of the default group (a collective where there are several)."""
    _, world = _rank_and_world()
    if world == 1:
        return flag
    value = torch.tensor([int(flag)])
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return bool(value.item())


@contextmanager
def _atomic_directory(out: str | os.PathLike) -> Iterator[Path]:
    """A temporary directory beside `out`, renamed to `out` when the body succeeded on every rank.

    With several ranks (torchrun), rank 0 makes it and names it after its pid; a rank whose
    body failed makes every rank fail (no rank waits on one that is gone), and the directory
    is removed.
    """
    out = Path(out)
    rank, world = _rank_and_world()
    if out.exists():
        raise ConversionError(f"--out {out} exists. Fix: remove it or choose a new directory.")
    owner, failure = torch.tensor([os.getpid()]), None
    if rank == 0:
        try:
            for stale in out.parent.glob(f".{out.name}.partial-*"):  # left by a conversion that was killed
                if not _process_alive(stale.name.rpartition("-")[2]):
                    shutil.rmtree(stale, ignore_errors=True)
            tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        except OSError as error:
            owner[0], failure = -1, error
    if world > 1:
        torch.distributed.broadcast(owner, src=0)  # rank 0's pid names the directory; -1: it could not make it
    if failure is not None:
        raise failure
    if owner.item() < 0:
        raise ConversionError(f"rank 0 could not make the temporary directory beside {out} (its error is above).")
    tmp = out.parent / f".{out.name}.partial-{owner.item()}"
    try:
        try:
            yield tmp
        except BaseException:
            _any_rank(True)
            raise
        if _any_rank(False):
            raise ConversionError(f"another process of this conversion failed (its error is above); {out} was not written.")
        renaming = None
        if rank == 0:
            try:
                os.replace(tmp, out)
            except OSError as error:
                renaming = error
        if _any_rank(renaming is not None):  # also: every rank returns once `out` is there
            raise renaming or ConversionError(f"rank 0 could not rename its output to {out} (its error is above).")
    finally:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)


# --- hf -> mcore ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Chunk:
    """One tensor of the Megatron checkpoint as its write item sees it: rows [start, stop) of
    model tensor `model_key` (all of it, or one of linear_fc1's halves)."""

    model_key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    sources: tuple[tuple[Entry, slice], ...]  # each HF tensor and the rows of this chunk it fills

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _chunk_of(model_key: str, view: torch.Tensor, full_shape: tuple[int, ...], dtype: torch.dtype,
              sources: list[Entry]) -> _Chunk:
    """The chunk that meta tensor `view` (a row block of the model tensor) is, with its HF sources."""
    start = view.storage_offset() // math.prod(full_shape[1:])
    stop = start + view.shape[0]
    filled = []
    for entry in sources:
        rows = entry.rows_of(full_shape[0])
        if rows.start >= stop or rows.stop <= start:
            continue
        if rows.start < start or rows.stop > stop or not view.is_contiguous():
            raise ConversionError(f"{model_key}: write item rows [{start}, {stop}) cut HF tensor {entry.hf}: a mapping bug.")
        filled.append((entry, slice(rows.start - start, rows.stop - start)))
    if sum(rows.stop - rows.start for _, rows in filled) != stop - start:
        raise ConversionError(f"{model_key}: HF tensors {[e.hf for e, _ in filled]} do not fill rows [{start}, {stop}): a mapping bug.")
    return _Chunk(model_key, tuple(view.shape), dtype, tuple(filled))


class _MaterialisingPlanner(MCoreSavePlanner):
    """Megatron's DCP save planner whose tensor data is made when the writer asks for it.

    The state dict holds meta tensors; `chunks` maps each write item (sharded key, offset) to
    its `_Chunk`, and `materialise(chunk, out)` fills `out` with it.
    """

    def __init__(self, chunks: dict, materialise: Callable[[_Chunk, torch.Tensor], None], progress: tqdm):
        super().__init__(dedup_replicated_tensors=False, flatten_state_dict=False, flatten_sharded_tensors=False)
        self.chunks, self.materialise, self.progress = chunks, materialise, progress

    def chunk_of(self, write_item) -> _Chunk:
        return self.chunks[(write_item.index.fqn, tuple(write_item.index.offset))]

    def make(self, write_item, out: torch.Tensor) -> torch.Tensor:
        """The write item's tensor, made in `out` (its chunk's shape and dtype)."""
        self.materialise(self.chunk_of(write_item), out)
        self.progress.update()
        return out.reshape(write_item.tensor_data.chunk.sizes)

    def resolve_data(self, write_item):
        if write_item.type == WriteItemType.BYTE_IO:
            return super().resolve_data(write_item)
        chunk = self.chunk_of(write_item)
        return self.make(write_item, torch.empty(chunk.shape, dtype=chunk.dtype))


class _Arena:
    """One buffer of the largest chunk's size. It holds the chunk being written and, when both
    fit side by side, the next one being made; a tensor carved from it has a storage of exactly
    its own bytes (torch.save writes a tensor's whole storage). Memory in use again is already
    mapped: freshly allocated tensors cost the kernel a page fault per 4 KiB, about as much as
    dequantising them."""

    ALIGN = 64

    def __init__(self, nbytes: int):
        self.nbytes = nbytes
        self.storage = torch.UntypedStorage(nbytes)

    def place(self, nbytes: int, busy: tuple[int, int]) -> int | None:
        """Where a chunk of `nbytes` fits beside bytes `busy` = [start, stop), or None."""
        start, stop = busy
        after = -(-stop // self.ALIGN) * self.ALIGN
        if after + nbytes <= self.nbytes:
            return after
        return 0 if nbytes <= start else None

    def tensor(self, offset: int, chunk: _Chunk) -> torch.Tensor:
        return torch.empty(0, dtype=chunk.dtype).set_(self.storage[offset : offset + chunk.nbytes], 0, chunk.shape)


class _RankFiles:
    """This rank's .distcp files, `__<rank>_<n>.distcp`, a new one after `file_bytes`. Items are
    written by DCP's own `_write_item` (torch.save format, what DCP's reader reads). What is
    written goes to the kernel's writeback as it comes (`posix_fadvise(DONTNEED)` every
    `WRITEBACK_BYTES`: the disk writes while the next tensors are made, and the output does not
    crowd the page cache); each file is fsynced when complete."""

    WRITEBACK_BYTES = 64 << 20

    def __init__(self, directory: Path, prefix: str, transforms, file_bytes: int):
        self.directory, self.prefix, self.transforms, self.file_bytes = directory, prefix, transforms, file_bytes
        self.stream, self.name, self.count, self.handed, self.bytes_written = None, None, 0, 0, 0

    def write(self, item, data):
        if self.stream is None or self.stream.tell() >= self.file_bytes:
            self.close()
            self.name = f"{self.prefix}{self.count}{DEFAULT_SUFFIX}"
            self.stream, self.count, self.handed = open(self.directory / self.name, "wb"), self.count + 1, 0
        result = _write_item(self.transforms, self.stream, data, item, self.name, SerializationFormat.TORCH_SAVE)
        if self.stream.tell() - self.handed >= self.WRITEBACK_BYTES:
            self.stream.flush()
            os.posix_fadvise(self.stream.fileno(), self.handed, self.stream.tell() - self.handed, os.POSIX_FADV_DONTNEED)
            self.handed = self.stream.tell()
        return result

    def close(self) -> None:
        if self.stream is not None:
            self.stream.flush()
            os.fsync(self.stream.fileno())
            self.bytes_written += self.stream.tell()
            self.stream.close()
            self.stream = None

    def abandon(self) -> None:
        if self.stream is not None:
            self.stream.close()
            self.stream = None


class _StreamingWriter(FileSystemWriter):
    """torch DCP's FileSystemWriter with its write step replaced (FileSystemWriter's own loop
    keeps every tensor of a file until the file is closed): this rank's tensors are made one
    after the other, by one thread, in one `_Arena`, while the calling thread writes the one
    made before (`_RankFiles`). So about one chunk is in memory (the largest), and making,
    writing and the disk's writeback overlap.
    torch.save computes no CRC32 of the records here: it halves the write speed, and torch.load
    (hence DCP's reader and Megatron's) never checks it."""

    def __init__(self, path, file_bytes: int = FILE_BYTES):
        super().__init__(path, single_file_per_rank=True, sync_files=True, thread_count=1)
        self.file_bytes, self.bytes_written = file_bytes, 0

    def write_data(self, plan, planner: _MaterialisingPlanner) -> Future:
        objects = [item for item in plan.items if item.type == WriteItemType.BYTE_IO]
        tensors = [item for item in plan.items if item.type != WriteItemType.BYTE_IO]
        sizes = [planner.chunk_of(item).nbytes for item in tensors]
        arena = _Arena(max(sizes, default=0))
        files = _RankFiles(Path(self.path), plan.storage_data.prefix, self.transforms, self.file_bytes)
        crc32 = torch.serialization.get_crc32_options()
        torch.serialization.set_crc32_options(False)
        results = []
        try:
            with ThreadPoolExecutor(1, thread_name_prefix="hf-to-mcore") as maker:
                results += [files.write(item, planner.resolve_data(item)) for item in objects]
                made, at = None, 0  # the next tensor's future and its place in the arena
                for i, item in enumerate(tensors):
                    if made is None:
                        made, at = maker.submit(planner.make, item, arena.tensor(0, planner.chunk_of(item))), 0
                    data, made = made.result(), None
                    if i + 1 < len(tensors):  # make the next while this one is written, if both fit
                        place = arena.place(sizes[i + 1], (at, at + sizes[i]))
                        if place is not None:
                            made = maker.submit(planner.make, tensors[i + 1], arena.tensor(place, planner.chunk_of(tensors[i + 1])))
                    results.append(files.write(item, data))
                    if made is not None:
                        at = place
            files.close()
        finally:
            torch.serialization.set_crc32_options(crc32)
            files.abandon()
        self.bytes_written = files.bytes_written
        future = Future()
        future.set_result(results)
        return future


class _MaterialisingSave(TorchDistSaveShardedStrategy):
    """Megatron's torch_dist format, written by `_StreamingWriter`."""

    def __init__(self, chunks, materialise, progress):
        super().__init__("torch_dist", 1)
        self.planner_args = (chunks, materialise, progress)
        self.writer = None

    def save(self, sharded_state_dict, checkpoint_dir):
        by_key, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict, keep_only_main_replica=True)
        self.writer = _StreamingWriter(checkpoint_dir)
        try:
            torch.distributed.checkpoint.save(
                mcore_to_pyt_state_dict(by_key, is_loading=False),
                storage_writer=self.writer,
                planner=_MaterialisingPlanner(*self.planner_args),
            )
        except CheckpointException as error:  # DCP wraps what went wrong; show the reader's error itself
            exception, _stack = next(iter(error.failures.values()))
            raise exception from error


@dataclass(frozen=True)
class ConversionStats:
    """What one rank of `hf_to_mcore` did."""

    seconds: float  # from the call to the output's rename
    bytes_read: int  # safetensors data this rank read (weights and FP8 scales)
    bytes_written: int  # .distcp bytes this rank wrote
    tensors: int  # write items this rank made
    ranks: int


def _owners(chunks: list[_Chunk], world: int) -> list[int]:
    """The rank that writes each chunk: contiguous runs balanced by bytes (each rank reads about
    its own range of the HF shards)."""
    total = max(1, sum(c.nbytes for c in chunks))
    owners, before = [], 0
    for chunk in chunks:
        owners.append(min(world - 1, (before + chunk.nbytes // 2) * world // total))
        before += chunk.nbytes
    return owners


def hf_to_mcore(hf_dir: str | os.PathLike, out_dir: str | os.PathLike, config: DeepSeekV3Config,
                progress: bool = True) -> ConversionStats:
    """Convert an HF DeepSeek-V3 checkpoint (BF16/FP32 or DeepSeek FP8) to a dist_checkpointing one.

    Needs torch.distributed and Megatron's parallel state initialised: one process, or every
    process of a torchrun group, which then share the work (each writes its part; the output
    holds the same tensors). The checkpoint's dtype is the config's `params_dtype` (the
    router's expert bias stays FP32). The input config.json is kept as `hf_config.json`.
    torch runs on one intra-op thread meanwhile: a thread makes the next tensor while this one
    writes (torch's own threads would compete with both, and spin where cores are shared).
    """
    started = time.perf_counter()
    rank, world = _rank_and_world()
    hf_dir = Path(hf_dir)
    config_path = hf_dir / "config.json"
    if not config_path.exists():
        raise ConversionError(f"{config_path} is missing. Fix: point --hf at the directory with config.json.")
    raw_config = config_path.read_bytes()
    check_hf_config(_read_json(config_path, "config"), config, str(config_path))
    hf = HFCheckpoint.open(hf_dir)
    model = meta_model(config)
    specs = _tensor_specs(model)
    expected = entries(config)
    _check_hf_tensors(hf, expected, specs)

    sources: dict[str, list[Entry]] = {}
    for entry in expected:
        if not entry.rule.copy_of_main:
            sources.setdefault(entry.mcore, []).append(entry)
    if set(sources) != set(specs):
        raise ConversionError(f"TABLE does not cover Megatron tensors {sorted(set(specs) - set(sources))[:5]} "
                              f"(or names absent ones {sorted(set(sources) - set(specs))[:5]}): a mapping bug.")

    sharded = model.sharded_state_dict()
    apply_factories(sharded)  # linear_fc1 -> its gate and up chunks, as dist_checkpointing.save would
    tensors, objects = [], []
    for model_key, value in sharded.items():
        for sh in nested_values([value]):
            (tensors if isinstance(sh, ShardedTensor) else objects).append((model_key, sh))
    chunk_list = [_chunk_of(key, sh.data, *specs[key], sources[key]) for key, sh in tensors]
    owners = _owners(chunk_list, world)
    chunks = {}
    for (key, sh), chunk, owner in zip(tensors, chunk_list, owners):
        sh.replica_id = 0 if owner == rank else 1  # dist_checkpointing writes main replicas (0) only
        if owner == rank:
            chunks[(sh.key, tuple(sh.global_offset))] = chunk
    for _, sh in objects:
        if isinstance(sh, ShardedObject):
            sh.replica_id = 0 if rank == 0 else 1

    bytes_read = 0
    # what is read, when it is not read into the chunk itself, and dequantize_fp8's block buffers
    # (one chunk is made at a time)
    read_memory = ReusedMemory(max((hf.nbytes(e.hf) for c in chunks.values() for e, _ in c.sources
                                    if hf.dtype(e.hf) != c.dtype), default=0))
    scratch = ReusedMemory()

    def materialise(chunk: _Chunk, out: torch.Tensor) -> None:
        nonlocal bytes_read
        for entry, rows in chunk.sources:
            _read_hf_into(hf, entry.hf, out[rows], read_memory, scratch)
            bytes_read += hf.nbytes(entry.hf) + (hf.nbytes(entry.hf + SCALE_SUFFIX) if entry.hf + SCALE_SUFFIX in hf.span_of else 0)

    description = "hf -> mcore" if world == 1 else f"hf -> mcore (rank 0 of {world})"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the parallelism is the making thread beside the writing one (and the ranks)
    try:
        with (_atomic_directory(out_dir) as tmp,
              tqdm(total=len(chunks), desc=description, unit="tensor", disable=not progress or rank != 0) as bar):
            strategy = _MaterialisingSave(chunks, materialise, bar)
            dist_checkpointing.save(sharded, str(tmp), sharded_strategy=strategy)
            if rank == 0:
                (tmp / HF_CONFIG_RECORD).write_bytes(raw_config)  # the input's bytes, for mcore -> hf
    finally:
        torch.set_num_threads(threads)
    return ConversionStats(time.perf_counter() - started, bytes_read, strategy.writer.bytes_written, len(chunks), world)


# --- mcore -> hf ----------------------------------------------------------------------------


def recorded_hf_config(mcore_dir: str | os.PathLike) -> dict | None:
    """The config.json a converted checkpoint was made from (`hf_config.json`), or None."""
    path = Path(mcore_dir) / HF_CONFIG_RECORD
    return _read_json(path, "recorded config") if path.exists() else None


def check_recorded_hf_config(mcore_dir: str | os.PathLike, config: DeepSeekV3Config) -> None:
    """A converted checkpoint's recorded config.json against `config` (ConversionError naming the
    field): it catches what no tensor shape shows, e.g. the router's top-k. Nothing without one."""
    recorded = recorded_hf_config(mcore_dir)
    if recorded is not None:
        check_hf_config(recorded, config, f"{Path(mcore_dir) / HF_CONFIG_RECORD} (the config.json it was converted from)")


def model_tensor_shapes(models) -> dict[str, tuple[int, ...]]:
    """Every ShardedTensor that `models` (one model or a rank's chunks) load, by checkpoint key,
    with its global shape (linear_fc1 as its gate and up halves, as stored)."""
    shapes = {}
    for model in models if isinstance(models, (list, tuple)) else [models]:
        sharded = model.sharded_state_dict()
        apply_factories(sharded)
        shapes.update({t.key: tuple(t.global_shape) for t in nested_values(sharded) if isinstance(t, ShardedTensor)})
    return shapes


def tensor_fit_problems(mcore_dir: str | os.PathLike, needed: dict[str, tuple[int, ...]],
                        extra_prefixes: tuple[str, ...] = ()) -> list[str]:
    """What keeps a dist_checkpointing checkpoint's tensors from fitting a model whose tensors are
    `needed` (key -> global shape), read from its metadata only: missing keys, other shapes, and
    the checkpoint's keys under `extra_prefixes` that the model lacks. Empty when it fits."""
    with safe_load.reading(mcore_dir):
        stored = dist_checkpointing.load_tensors_metadata(str(mcore_dir))
    problems = []
    for key, shape in needed.items():
        if key not in stored:
            problems.append(f"{key} is missing")
        elif tuple(stored[key].global_shape) != tuple(shape):
            problems.append(f"{key} has shape {tuple(stored[key].global_shape)}, the model needs {tuple(shape)}")
    extra = sorted(key for key in stored if extra_prefixes and key.startswith(extra_prefixes) and key not in needed)
    return problems + [f"{key} is in the checkpoint but not in the model" for key in extra]


DCP_METADATA = "metadata.json"  # what marks a dist_checkpointing directory
TRACKERS = ("latest", "latest_checkpointed_iteration.txt")  # the compact loop's, Megatron-LM's


def tracked_checkpoint(directory: str | os.PathLike) -> Path:
    """A checkpoint root's newest checkpoint (the `iter_N` or `release` its tracker file names), or
    `directory` itself when it has no tracker; a tracker naming no dist_checkpointing directory is
    a ConversionError. Used by everything that reads weights (training's --init-from, generate)."""
    directory = Path(directory)
    for tracker in TRACKERS:
        if (directory / tracker).is_file():
            step = (directory / tracker).read_text().strip()
            chosen = directory / ("release" if step == "release" else f"iter_{int(step):07d}" if step.isdigit() else step)
            if not (chosen / DCP_METADATA).is_file():
                raise ConversionError(f"{directory}: {tracker} names {step!r}, but {chosen} is not a dist_checkpointing "
                                      "checkpoint. Fix: point at one iter_N directory.")
            return chosen
    return directory


def load_mcore_tensors(mcore_dir: str | os.PathLike, config: DeepSeekV3Config, keys=None, model=None) -> dict[str, torch.Tensor]:
    """The tensors (all, or `keys`) of a dist_checkpointing checkpoint by model state-dict name.

    Only tensors are loaded (no ShardedObject, which DCP would unpickle); load them into a
    model with `load_state_dict(..., strict=False)` (the missing keys are `_extra_state`).
    """
    model = model or meta_model(config)
    wanted = {}
    for key, value in model.sharded_state_dict().items():
        if (keys is not None and key not in keys) or not isinstance(value, (ShardedTensor, ShardedTensorFactory)):
            continue
        value.data = torch.empty(value.data.shape, dtype=value.data.dtype)
        wanted[key] = value
    with safe_load.reading(mcore_dir):  # nothing in the checkpoint runs code
        loaded = dist_checkpointing.load(wanted, str(mcore_dir))
    return {key: loaded[key] for key in wanted}  # without the common state (a Megatron-LM checkpoint's args, iteration, ...)


def _hf_tensors(entry: Entry, tensor: torch.Tensor, fp8: bool) -> dict[str, torch.Tensor]:
    block = tensor[entry.rows_of(tensor.shape[0])]
    if entry.rule.hf_dtype is not None:
        return {entry.hf: block.to(entry.rule.hf_dtype).contiguous()}
    if fp8 and entry.rule.fp8:
        weight, scale_inv = quantize_fp8(block, name=entry.hf)
        return {entry.hf: weight, entry.hf + SCALE_SUFFIX: scale_inv}
    return {entry.hf: block.to(torch.bfloat16).contiguous()}


def mcore_to_hf(mcore_dir: str | os.PathLike, out_dir: str | os.PathLike, config: DeepSeekV3Config, fp8: bool = False, progress: bool = True) -> None:
    """Convert a dist_checkpointing checkpoint to HF DeepSeek-V3: BF16, or DeepSeek's FP8 with `fp8`.

    One HF shard per decoder/MTP layer (plus one for the embedding and one for the head); one
    layer's tensors are in memory at a time. config.json is the one hf-to-mcore recorded
    (`hf_config.json`), checked against `config`, else made from `config` (`hf_config`).
    """
    if not (Path(mcore_dir) / "metadata.json").exists():
        raise ConversionError(f"{mcore_dir} is not a dist_checkpointing checkpoint (no metadata.json). "
                              "Fix: point --mcore at the directory hf-to-mcore (or Megatron) wrote.")
    recorded = recorded_hf_config(mcore_dir)
    if recorded is not None:
        check_hf_config(recorded, config, f"{Path(mcore_dir) / HF_CONFIG_RECORD} (the config.json it was converted from)")
    model = meta_model(config)
    groups: dict[str, list[Entry]] = {}
    for entry in entries(config):
        groups.setdefault(entry.group, []).append(entry)
    order = ["embed"] + [g for g in groups if g.startswith("layer.")] + ["head"]
    weight_map, total_bytes = {}, 0
    with _atomic_directory(out_dir) as tmp, tqdm(total=sum(map(len, groups.values())), desc="mcore -> hf", unit="tensor", disable=not progress) as bar:
        for number, group in enumerate(order, start=1):
            file = f"model-{number:05d}-of-{len(order):05d}.safetensors"
            loaded = load_mcore_tensors(mcore_dir, config, {e.mcore for e in groups[group]}, model)
            shard = {}
            for entry in groups[group]:
                shard.update(_hf_tensors(entry, loaded[entry.mcore], fp8))
                bar.update()
            save_file(shard, tmp / file, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, file))
            total_bytes += sum(t.nbytes for t in shard.values())
            del loaded, shard
        (tmp / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total_bytes}, "weight_map": weight_map}, indent=2))
        (tmp / "config.json").write_text(json.dumps(hf_config(config, fp8, recorded), indent=2))
