"""A tiny HF transformers DeepseekV3 and its directory as DeepSeek releases it, for the tests that
start from HF weights (tests/unit/test_convert_hf.py, tests/e2e/test_init_from.py).

HF 5.x builds no MTP module (`num_nextn_predict_layers` is config only), so `release_like` writes
one at HF layer index num_hidden_layers, as DeepSeek's files carry it. Where HF differs from the
paper the config avoids the difference: HF scores a group by the sum of its top-2 affinities, the
paper and Megatron by the top topk/topk_group, so topk=4 with topk_group=2 (both 2).
"""

import json
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file, save_file

from megatron_dsv3.config import preset

INDEX = "model.safetensors.index.json"
MTP = 3  # HF layer index of the MTP module = num_hidden_layers (of tiny_hf_config)
OVERRIDES = dict(moe_router_topk=4)  # the preset "tiny" as tiny_hf_config (see the module note)
# Resolved now, at collection: transformers imports its modelling code lazily, and that code's
# annotations use torch.cuda.Stream, which the CPU layer (enabled by tests/conftest.py) replaces.
DeepseekV3Config, DeepseekV3ForCausalLM = transformers.DeepseekV3Config, transformers.DeepseekV3ForCausalLM


def tiny_hf_config(**changes):
    return DeepseekV3Config(**{
        **dict(vocab_size=257, hidden_size=64, intermediate_size=192, moe_intermediate_size=32,
               num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4,
               n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=4, n_shared_experts=1,
               q_lora_rank=48, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
               rope_theta=10000, max_position_embeddings=128, rms_norm_eps=1e-6, norm_topk_prob=True,
               routed_scaling_factor=2.5, tie_word_embeddings=False, num_nextn_predict_layers=1),
        **changes,
    })


def config(**changes):
    """Our preset for tiny_hf_config."""
    return preset("tiny", **OVERRIDES, **changes)


def tiny_hf_model(seed: int = 0, **changes):
    """A random tiny DeepseekV3ForCausalLM in fp32 whose weights are BF16-exact (but the FP32
    e_score_correction_bias), with norm weights and biases far from their init so that a
    mapping error shows, and decisive routing (no near-ties that rounding could flip)."""
    torch.manual_seed(seed)
    hf_model = DeepseekV3ForCausalLM(tiny_hf_config(**changes)).eval()
    with torch.no_grad():
        for name, tensor in list(hf_model.named_parameters()) + list(hf_model.named_buffers()):
            if name.endswith("e_score_correction_bias"):
                tensor.copy_(0.1 * torch.randn_like(tensor))  # FP32 on disk, not rounded
                continue
            if name.endswith("norm.weight"):
                tensor.copy_(1 + 0.2 * torch.randn_like(tensor))
            elif name.endswith("gate.weight"):
                tensor.normal_(0, 0.3)
            tensor.copy_(tensor.bfloat16().float())
    return hf_model


def hf_files(directory: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def release_like(hf_model, directory: Path) -> None:
    """save_pretrained in ~6 shards, then BF16 but the bias, plus an MTP shard, as DeepSeek ships."""
    hf_model.save_pretrained(directory, max_shard_size="150KB")
    for file in directory.glob("*.safetensors"):
        tensors = load_file(file)
        save_file({k: v if k.endswith("e_score_correction_bias") else v.bfloat16() for k, v in tensors.items()}, file)
    tensors = hf_files(directory)
    last, mtp_index = hf_model.config.num_hidden_layers - 1, hf_model.config.num_hidden_layers
    generator = torch.Generator().manual_seed(1)
    mtp = {}
    for name, value in tensors.items():  # the MTP block is a copy of the last (MoE) layer's shape
        if name.startswith(f"model.layers.{last}."):
            fresh = torch.randn(value.shape, generator=generator) * (0.1 if value.ndim == 1 else 0.05)
            fresh += 1.0 if name.endswith("norm.weight") else 0.0
            mtp[name.replace(f"model.layers.{last}.", f"model.layers.{mtp_index}.")] = fresh.to(value.dtype)
    for norm in ("enorm", "hnorm", "shared_head.norm"):
        mtp[f"model.layers.{mtp_index}.{norm}.weight"] = (1 + 0.2 * torch.randn(64, generator=generator)).bfloat16()
    mtp[f"model.layers.{mtp_index}.eh_proj.weight"] = (0.05 * torch.randn(64, 128, generator=generator)).bfloat16()
    mtp[f"model.layers.{mtp_index}.embed_tokens.weight"] = tensors["model.embed_tokens.weight"].clone()
    mtp[f"model.layers.{mtp_index}.shared_head.head.weight"] = tensors["lm_head.weight"].clone()
    save_file(mtp, directory / "model-mtp.safetensors")
    index = json.loads((directory / INDEX).read_text())
    index["weight_map"].update(dict.fromkeys(mtp, "model-mtp.safetensors"))
    (directory / INDEX).write_text(json.dumps(index))
