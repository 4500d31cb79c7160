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
  - hf -> mcore streams: `dist_checkpointing.save` runs with a save strategy whose DCP planner
    materialises each Megatron tensor from its HF tensors when the writer asks for it, so
    about one tensor is in memory at a time, whatever the number of shards. mcore -> hf
    loads one layer at a time (`dist_checkpointing.load` of that layer's tensors only;
    `ShardedObject`s, which would be unpickled, are never loaded).
  - FP8: DeepSeek's 128x128 block format (`weight` float8_e4m3fn, `weight_scale_inv` FP32 of
    shape ceil(out/128) x ceil(in/128), weight = fp8 * scale) in plain PyTorch.
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

import dataclasses
import functools
import json
import math
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory, apply_factories
from megatron.core.dist_checkpointing.strategies.torch import (
    MCoreSavePlanner,
    TorchDistSaveShardedStrategy,
    _replace_state_dict_keys_with_sharded_keys,
    mcore_to_pyt_state_dict,
)
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch.distributed.checkpoint import CheckpointException, FileSystemWriter
from torch.distributed.checkpoint.planner import WriteItemType
from tqdm import tqdm

from megatron_dsv3 import safe_load
from megatron_dsv3.config import FP8_TILE, DeepSeekV3Config, moe_layer_pattern, num_dense_prefix
from megatron_dsv3.fp8 import BlockwiseFP8, quantize_128x128
from megatron_dsv3.specs import gpt_model

SCALE_SUFFIX = "_scale_inv"  # "<name>.weight" -> "<name>.weight_scale_inv"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
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
    hf_dtype: the dtype on HF's side when it is fixed (the expert bias stays FP32).
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
    Rule("moe", "{L}.mlp.gate.weight", "{M}.mlp.router.weight"),
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


def hf_config(config: DeepSeekV3Config, fp8: bool) -> dict:
    """A DeepSeek-V3 config.json for `config` (release layout)."""
    out = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
           "max_position_embeddings": config.seq_length, "torch_dtype": "bfloat16"}
    rope_scaling = {}
    for field in _config_fields(config):
        if field.hf.startswith("rope_scaling."):
            rope_scaling[field.hf.removeprefix("rope_scaling.")] = field.value(config)
        else:
            out[field.hf] = field.value(config)
    out["rope_scaling"] = rope_scaling if config.rope_type == "yarn" else None
    if fp8:
        out["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                      "weight_block_size": [FP8_TILE, FP8_TILE]}
    return out


# --- FP8 128x128 blocks (DeepSeek's format) ---------------------------------------------------


def fp8_scale_shape(shape_OI: tuple[int, int]) -> tuple[int, int]:
    return tuple(-(-n // FP8_TILE) for n in shape_OI)


def dequantize_fp8(weight_OI: torch.Tensor, scale_inv_BoBi: torch.Tensor) -> torch.Tensor:
    """FP32 weight = FP8 weight * its block's `weight_scale_inv` (DeepSeek's scale is our
    dequantisation multiplier: `fp8.BlockwiseFP8` with 128x128 tiles)."""
    blocks = BlockwiseFP8(data=weight_OI, scale=scale_inv_BoBi, tile=(FP8_TILE, FP8_TILE), shape=tuple(weight_OI.shape))
    return blocks.dequantize(torch.float32)


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


@dataclass
class HFCheckpoint:
    """An HF checkpoint's tensors as its headers describe them; tensors are read one at a time."""

    directory: Path
    listing: Path  # the index (or the single file) that names the tensors
    file_of: dict[str, str]
    shape_of: dict[str, tuple[int, ...]]
    dtype_of: dict[str, str]  # safetensors dtype names ("BF16", "F8_E4M3", ...)

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
        shape_of, dtype_of = {}, {}
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
        return cls(directory, listing, file_of, shape_of, dtype_of)

    def where(self, name: str) -> Path:
        return self.directory / self.file_of[name]

    def read(self, name: str) -> torch.Tensor:
        """One tensor; the shard is mapped only while it is read, so nothing stays resident."""
        with _shard(self.where(name)) as f:
            try:
                return f.get_tensor(name)
            except SafetensorError as error:  # the header was whole, the data is not
                raise ConversionError(f"{self.where(name)}: tensor {name} is unreadable ({error}). Fix: re-download the shard.") from None


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
        allowed = (entry.rule.hf_dtype,) if entry.rule.hf_dtype else FLOAT_DTYPES + ((torch.float8_e4m3fn,) if entry.rule.fp8 else ())
        if got not in allowed:
            problems.append(f"tensor {name} in {hf.where(name)} has dtype {hf.dtype_of[name]}; expected one of "
                            f"{[str(d).removeprefix('torch.') for d in allowed]}. Fix: convert that tensor.")
    if problems:
        raise ConversionError(f"{len(problems)} problem(s) in {hf.directory}:\n  " + "\n  ".join(problems[:50]))


def _read_hf(hf: HFCheckpoint, name: str) -> torch.Tensor:
    tensor = hf.read(name)
    if tensor.dtype == torch.float8_e4m3fn:
        return dequantize_fp8(tensor, hf.read(name + SCALE_SUFFIX))
    return tensor


# --- Output directory: temporary, renamed when complete ----------------------------------------


def _process_alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:  # another user's process
        return True
    return True


@contextmanager
def _atomic_directory(out: str | os.PathLike) -> Iterator[Path]:
    out = Path(out)
    if out.exists():
        raise ConversionError(f"--out {out} exists. Fix: remove it or choose a new directory.")
    for stale in out.parent.glob(f".{out.name}.partial-*"):  # left by a conversion that was killed
        if not _process_alive(stale.name.rpartition("-")[2]):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --- hf -> mcore ----------------------------------------------------------------------------


class _MaterialisingPlanner(MCoreSavePlanner):
    """Megatron's DCP save planner whose tensor data is produced when the writer asks for it.

    The state dict holds meta tensors; `chunks` maps each write item (sharded key, offset) to
    the model tensor it is a view of, and `materialise` makes that model tensor.
    """

    def __init__(self, chunks, materialise: Callable[[str], torch.Tensor], progress: tqdm):
        super().__init__(dedup_replicated_tensors=False, flatten_state_dict=False, flatten_sharded_tensors=False)
        self.chunks, self.materialise, self.progress = chunks, materialise, progress

    def resolve_data(self, write_item):
        if write_item.type == WriteItemType.BYTE_IO:
            return super().resolve_data(write_item)
        model_key, meta_view = self.chunks[(write_item.index.fqn, tuple(write_item.index.offset))]
        full = self.materialise(model_key)
        self.progress.update()
        view = full.as_strided(meta_view.shape, meta_view.stride(), meta_view.storage_offset())
        return view.reshape(write_item.tensor_data.chunk.sizes)


class _MaterialisingSave(TorchDistSaveShardedStrategy):
    """Megatron's torch_dist format, written by torch's serial FileSystemWriter one tensor at a time.

    One .distcp file per tensor chunk: torch 2.14's writer keeps every tensor of a file alive
    until that file is closed, so a single file per rank would hold the whole model.
    """

    def __init__(self, chunks, materialise, progress):
        super().__init__("torch_dist", 1)
        self.planner_args = (chunks, materialise, progress)

    def save(self, sharded_state_dict, checkpoint_dir):
        by_key, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict, keep_only_main_replica=True)
        try:
            torch.distributed.checkpoint.save(
                mcore_to_pyt_state_dict(by_key, is_loading=False),
                storage_writer=FileSystemWriter(checkpoint_dir, single_file_per_rank=False, thread_count=1),
                planner=_MaterialisingPlanner(*self.planner_args),
            )
        except CheckpointException as error:  # DCP wraps what went wrong; show the reader's error itself
            exception, _stack = next(iter(error.failures.values()))
            raise exception from error


def hf_to_mcore(hf_dir: str | os.PathLike, out_dir: str | os.PathLike, config: DeepSeekV3Config, progress: bool = True) -> None:
    """Convert an HF DeepSeek-V3 checkpoint (BF16/FP32 or DeepSeek FP8) to a dist_checkpointing one.

    Needs torch.distributed and Megatron's parallel state initialised (one process).
    """
    hf_dir = Path(hf_dir)
    config_path = hf_dir / "config.json"
    if not config_path.exists():
        raise ConversionError(f"{config_path} is missing. Fix: point --hf at the directory with config.json.")
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

    @functools.lru_cache(maxsize=1)  # linear_fc1's two halves are written as two chunks
    def materialise(model_key: str) -> torch.Tensor:
        shape, dtype = specs[model_key]
        tensor = torch.empty(shape, dtype=dtype)
        for entry in sources[model_key]:
            tensor[entry.rows_of(shape[0])].copy_(_read_hf(hf, entry.hf))
        return tensor

    sharded = model.sharded_state_dict()
    apply_factories(sharded)  # linear_fc1 -> its gate and up chunks, as dist_checkpointing.save would
    chunks = {
        (sh.key, tuple(sh.global_offset)): (model_key, sh.data)
        for model_key, value in sharded.items()
        for sh in nested_values([value])
        if isinstance(sh, ShardedTensor)
    }
    with _atomic_directory(out_dir) as tmp, tqdm(total=len(chunks), desc="hf -> mcore", unit="tensor", disable=not progress) as bar:
        dist_checkpointing.save(sharded, str(tmp), sharded_strategy=_MaterialisingSave(chunks, materialise, bar))


# --- mcore -> hf ----------------------------------------------------------------------------


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
    layer's tensors are in memory at a time.
    """
    if not (Path(mcore_dir) / "metadata.json").exists():
        raise ConversionError(f"{mcore_dir} is not a dist_checkpointing checkpoint (no metadata.json). "
                              "Fix: point --mcore at the directory hf-to-mcore (or Megatron) wrote.")
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
        (tmp / "config.json").write_text(json.dumps(hf_config(config, fp8), indent=2))
