"""Text generation: an MLA latent KV cache and MTP speculative decoding (report §2.1.1, §2.2, §5.4.3).

CLI: `python -m megatron_dsv3.generate --help` (generate/__main__.py).

Design note
-----------
Upstream first: what megatron-core 0.19.2 offers for decoding this model, measured on CPU with
our local specs (`preset("tiny")`, fp32):
  - `StaticInferenceContext` through `GPTModel.forward(..., inference_context=ctx)`, the static
    engine's path: runs on CPU with our specs, and its logits equal the full forward's (max abs
    error 2e-7 over 8 decode steps). It caches MLA uncompressed: per layer
    `key_value_memory_dict` holds K [S, B, n_h, d_h + d_R] and V [S, B, n_h, d_v], i.e.
    n_h (d_h + d_R + d_v) values per token and layer (160 for tiny, 40960 for DeepSeek-V3),
    not the 576 that MLA's latents need.
  - `cache_mla_latents=True` (MLASelfAttention's latent cache, absorbed decode): asserts the
    dynamic engine ("Caching MLA latents only works with dynamic backend inference"), whose
    `DynamicInferenceContext` and FlashMLA kernels need CUDA; and `prepare_for_absorption`
    splits TE's fused norm+linear (`split_te_layernorm_column_parallel_linear` is None without
    TE: TypeError on our local spec). Not usable on CPU or with the local spec.
  - `AbsorbedMLASelfAttention` (transformer/experimental_attention_variant/absorbed_mla.py):
    a training-time module; it asserts "Inference is not supported for AbsorbedMLA" and
    `cache_mla_latents` off, and calls its core attention with keyword arguments (x=, qr=,
    up_v_weight=) that our SDPA core attention does not take. No cache.
  - MTP speculative decoding exists only in the dynamic engine (`TextGenerationController`,
    Triton kernels, CUDA events at construction): GPU only. Its verification accepts a draft
    only when it equals the token the main model sampled (`verify_speculative_tokens`), not by
    the speculative-sampling rule; its draft (`GPTModel.compute_mtp_single_step` ->
    `MultiTokenPredictionLayer.forward_single_position`) runs the MTP layer without a cache,
    so the MTP layer's attention sees the new position only, not the sequence the training
    forward shows it.
So, whose part is whose here. Megatron's: every module and its weights (the embedding, each
TransformerLayer with its norms, residual adds and MLP, dense or MoE, run as they are on the new
tokens; MLASelfAttention's projections, latent norms, rotary table and `apply_rotary_pos_emb`,
softmax scale and linear_proj; the MTP layer's enorm/hnorm/eh_proj/transformer layer/final norm;
the output layer). Ours: the caches and the attention over them (`latent_cache`), the cached
forward of the model and of its MTP module (`decoder`), the sampling and the speculative loop
(`sampling`, `engine`), checkpoint/tokenizer/prompt checks (`loading`), the CLI.
Upstream's static context serves as a reference row in `python -m megatron_dsv3.bench decode`.

The latent cache (`latent_cache.LatentCache`) holds per token and layer c^KV (kv_lora_rank,
after kv_layernorm) and the RoPE'd k^R (qk_pos_emb_head_dim): (d_c + d_R) x dtype bytes, one
[B, S_max, d_c + d_R] tensor per layer. Decoding absorbs W^UK into the query and W^UV into the
output projection, so attention runs as multi-query attention over the latents and per-head keys
and values are never made. `--no-absorb` caches per-head K and V instead (upstream's layout).
Both equal the model's full forward at every position (tests/unit/test_generate.py, <= 1e-5
relative in fp32), the MTP module's logits included; greedy output equals HF transformers'
DeepseekV3ForCausalLM.generate on converted weights.

Generation builds the model with the local spec and without FP8 (`loading.generation_config`):
the checkpoint holds the master weights, and `fp8_blockwise` is a training-time choice.
"""

from megatron_dsv3.generate.decoder import CachedDecoder
from megatron_dsv3.generate.engine import Stats, generate
from megatron_dsv3.generate.latent_cache import FullKVCache, LatentCache
from megatron_dsv3.generate.loading import GenerateError
from megatron_dsv3.generate.sampling import Sampling, verify_draft

__all__ = ["CachedDecoder", "FullKVCache", "GenerateError", "LatentCache", "Sampling", "Stats", "generate", "verify_draft"]
