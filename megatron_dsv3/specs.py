"""Decoder-block and MTP-block specs for DeepSeek-V3 models, backend "local" or "te".

Both backends start from Megatron's own `get_gpt_decoder_layer_specs` (first-k dense layers
from `moe_layer_freq`, MLA with the q/kv latent RMSNorms when `qk_layernorm`, shared experts)
and change three things:
  - the router becomes `routing.LoadRecordingRouter` (upstream TopKRouter + load statistics);
  - the MoE layer becomes `overlap.dispatch.ExpertParallelMoELayer` (upstream MoELayer whose
    alltoall dispatcher sends a dispatch and a combine as one all-to-all each, asynchronously,
    the dispatch in FP8 with fp8_blockwise; the FB overlap's hand-over points);
  - on "local", MLA's core attention becomes `attention.MLASDPAttention`, because the local
    `DotProductAttention` rejects MLA's `k_channels`/`v_channels` (docs/architecture.md).

Use from Python: `gpt_model(config)` or `decoder_block_spec(config)` + `mtp_block_spec(...)`.
Use from Megatron-LM: `--spec megatron_dsv3.specs local_layer_spec` (or `te_layer_spec`).
Megatron-LM passes the named object to GPTModel without calling it and without the config,
so these two are layer specs (not functions) whose layer picks a dense or an MoE MLP from
its global layer number and `--moe-layer-freq`, as `decoder_block_spec` does. Megatron-LM
builds the MTP block apart from `--spec`, from upstream's specs; for these two objects this
module routes that to `mtp_block_spec` (see `_route_builder_mtp`).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.abc
import importlib.util
import sys

from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import (
    LNImpl,
    get_gpt_decoder_layer_specs,
    get_gpt_layer_local_spec,
    get_gpt_mtp_block_spec,
    get_mlp_module_spec,
)
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_layer import (
    BaseTransformerLayer,
    TransformerLayer,
    get_transformer_layer_offset,
)
from megatron.core.utils import get_pg_rank

from megatron_dsv3.attention import MLASDPAttention
from megatron_dsv3.config import moe_layer_pattern
from megatron_dsv3.overlap.dispatch import ExpertParallelMoELayer
from megatron_dsv3.routing import LoadRecordingRouter

BACKENDS = {"local": "local", "te": "transformer_engine"}

try:
    import transformer_engine  # noqa: F401

    HAVE_TE = True
except ImportError:
    HAVE_TE = False


def _backend(config, backend: str | None) -> str:
    if backend is None:
        backend = {v: k for k, v in BACKENDS.items()}.get(config.transformer_impl)
        if backend is None:
            raise ValueError(
                f"transformer_impl={config.transformer_impl!r}: no DeepSeek-V3 spec for it. "
                f"Fix: use one of {sorted(BACKENDS.values())}."
            )
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: unknown. Fix: use one of {sorted(BACKENDS)}.")
    if backend == "te" and not HAVE_TE:
        raise ImportError(
            "backend='te' needs Transformer Engine, which is not installed. "
            "Fix: pip install 'megatron_dsv3[te]' on a GPU machine, or use backend='local'."
        )
    return backend


def _replace_modules(spec, table: dict[type, type]):
    """A copy of `spec` with every class in `table` replaced, through ModuleSpecs, partials and
    submodule dataclasses (upstream nests MoE experts three levels deep)."""
    if isinstance(spec, type):
        return table.get(spec, spec)
    if isinstance(spec, functools.partial):
        return functools.partial(
            _replace_modules(spec.func, table), *spec.args,
            **{k: _replace_modules(v, table) for k, v in spec.keywords.items()},
        )
    if dataclasses.is_dataclass(spec) and not isinstance(spec, type):
        changes = {f.name: _replace_modules(getattr(spec, f.name), table) for f in dataclasses.fields(spec) if f.init}
        return dataclasses.replace(spec, **changes)
    return spec


def _with_our_modules(layer_spec: ModuleSpec, backend: str) -> ModuleSpec:
    """An upstream layer spec with our router, our MoE layer (one all-to-all per dispatch and
    per combine, FP8 dispatch: overlap/dispatch.py) and, on the local backend, our MLA attention."""
    table = {TopKRouter: LoadRecordingRouter, MoELayer: ExpertParallelMoELayer}
    if backend == "local":
        table[DotProductAttention] = MLASDPAttention
    return _replace_modules(layer_spec, table)


def decoder_layer_specs(config, backend: str | None = None) -> list[ModuleSpec]:
    """One spec per decoder layer of the whole model (dense for the first k)."""
    backend = _backend(config, backend)
    if not config.multi_latent_attention:
        raise ValueError("multi_latent_attention=False: these specs are for MLA models. Fix: use a preset.")
    if backend == "local" and config.q_lora_rank is None and config.qk_layernorm:
        # Megatron 0.19 (mla_qk_norm_config.py) then wants a fused norm+linear q projection,
        # which only TE provides.
        raise ValueError(
            "q_lora_rank=None: without query compression Megatron's MLA needs TE's fused "
            "norm+linear for the query. Fix: set q_lora_rank, or use backend 'te'."
        )
    upstream = get_gpt_decoder_layer_specs(
        config, use_transformer_engine=backend == "te", normalization=config.normalization
    )
    converted = {}  # upstream shares one spec object between the layers of one kind
    for spec in upstream:
        if id(spec) not in converted:
            converted[id(spec)] = _with_our_modules(spec, backend)
    return [converted[id(spec)] for spec in upstream]


def decoder_block_spec(config, backend: str | None = None, vp_stage=None, pp_rank=None) -> TransformerBlockSubmodules:
    """The block spec of this pipeline stage's decoder layers."""
    if config.pipeline_model_parallel_layout is not None:
        raise NotImplementedError(
            "pipeline_model_parallel_layout is set: explicit layouts belong to megatron_dsv3.pipeline.layout"
        )
    backend = _backend(config, backend)
    layers = decoder_layer_specs(config, backend)
    offset = get_transformer_layer_offset(config, vp_stage=vp_stage, pp_rank=pp_rank)
    count = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    if backend == "te":
        from megatron.core.extensions.transformer_engine import TENorm as layer_norm
    else:
        layer_norm = LNImpl  # upstream's local norm: apex if installed, else torch
    return TransformerBlockSubmodules(layer_specs=layers[offset : offset + count], layer_norm=layer_norm)


def mtp_block_spec(config, backend: str | None = None, vp_stage=None, pp_rank=None):
    """The MTP block (report §2.2): its transformer layer is the model's last (MoE) layer."""
    if not config.mtp_num_layers:
        return None
    backend = _backend(config, backend)
    last_layer = decoder_layer_specs(config, backend)[-1]
    return get_gpt_mtp_block_spec(
        config, last_layer, use_transformer_engine=backend == "te", vp_stage=vp_stage, pp_rank=pp_rank
    )


def gpt_model(config, pre_process: bool = True, post_process: bool = True, vp_stage=None, pp_rank=None, backend=None, pg_collection=None) -> GPTModel:
    """A Megatron GPTModel with MLA, DeepSeekMoE and MTP as `config` describes.

    With `config.fp8_blockwise` on the local backend, the transformer layers' linears then
    run in block-scaled FP8 (`fp8.linear.convert_to_fp8_linears`).
    """
    model = GPTModel(
        config=config,
        transformer_layer_spec=decoder_block_spec(config, backend, vp_stage=vp_stage, pp_rank=pp_rank),
        vocab_size=config.vocab_size,
        max_sequence_length=config.seq_length,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=config.share_embeddings_and_output_weights,
        position_embedding_type="rope",  # MLA applies its own decoupled RoPE
        mtp_block_spec=mtp_block_spec(config, backend, vp_stage=vp_stage, pp_rank=pp_rank),
        vp_stage=vp_stage,
        pg_collection=pg_collection,
    )
    return use_fp8_linears(model, config, backend)


def use_fp8_linears(model: GPTModel, config, backend=None) -> GPTModel:
    """With `config.fp8_blockwise` on the local backend, switch the transformer layers' linears
    of a built model to block-scaled FP8 (`fp8.linear.convert_to_fp8_linears`); else as is."""
    if config.fp8_blockwise is not None and _backend(config, backend) == "local":
        from megatron_dsv3.fp8.linear import convert_to_fp8_linears

        convert_to_fp8_linears(model)
    return model


# --- For Megatron-LM's `--spec megatron_dsv3.specs <name>` -------------------------------


class FirstKDenseLayer(TransformerLayer):
    """A TransformerLayer whose MLP is dense or MoE by its global number and `moe_layer_freq`.

    Megatron-LM builds every layer from the one `--spec` object; this layer makes that object
    express DeepSeek-V3's first-k-dense layout. MTP layers take the MoE MLP, like the last
    decoder layer.
    """

    def __init__(self, config, submodules, layer_number=1, *, dense_mlp, moe_grouped_gemm, vp_stage=None, is_mtp_layer=False, pg_collection=None, **kwargs):
        if config.num_moe_experts and config.moe_grouped_gemm != moe_grouped_gemm:
            raise ValueError(
                f"moe_grouped_gemm={config.moe_grouped_gemm}: this --spec builds its experts with "
                f"moe_grouped_gemm={moe_grouped_gemm}. Fix: {'add' if moe_grouped_gemm else 'drop'} "
                "--moe-grouped-gemm, or use the other layer spec."
            )
        if not is_mtp_layer:
            pp_rank = get_pg_rank(pg_collection.pp) if pg_collection is not None else None
            index = layer_number - 1 + get_transformer_layer_offset(config, vp_stage, pp_rank)
            if moe_layer_pattern(config)[index] == 0:
                submodules = dataclasses.replace(submodules, mlp=dense_mlp)
        super().__init__(config, submodules, layer_number, vp_stage=vp_stage, is_mtp_layer=is_mtp_layer, pg_collection=pg_collection, **kwargs)


class _TransformerEngineMissing(BaseTransformerLayer):
    def __init__(self, *args, **kwargs):
        _backend(None, "te")


def _first_k_dense_layer_spec(backend: str) -> ModuleSpec:
    if backend == "te":
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        upstream = get_gpt_layer_with_transformer_engine_spec(
            num_experts=1, moe_grouped_gemm=True, qk_layernorm=True, multi_latent_attention=True
        )
    else:
        upstream = get_gpt_layer_local_spec(
            num_experts=1, qk_layernorm=True, multi_latent_attention=True, normalization="RMSNorm"
        )
    moe = _with_our_modules(upstream, backend)
    dense = get_mlp_module_spec(use_te=backend == "te", num_experts=None)
    params = {"dense_mlp": dense, "moe_grouped_gemm": backend == "te"}
    return ModuleSpec(module=FirstKDenseLayer, params=params, submodules=moe.submodules)


local_layer_spec = _first_k_dense_layer_spec("local")
te_layer_spec = _first_k_dense_layer_spec("te") if HAVE_TE else ModuleSpec(module=_TransformerEngineMissing)


# --- Megatron-LM's MTP block for these two objects ----------------------------------------
# pretrain_gpt.py (Megatron-LM core_r0.19) builds the model with GPTModelBuilder
# (megatron/training/models/gpt.py). Its helper `mtp_block_spec(config, transformer_layer_spec,
# vp_stage)` does not use the --spec object for MTP: it takes the last of upstream's
# `get_gpt_decoder_layer_specs(...)`, i.e. upstream's TopKRouter and, on local, upstream's
# DotProductAttention, which rejects MLA's k_channels. No spec content can change that, so for
# our two objects the helper is routed to our `mtp_block_spec` (the MTP block `gpt_model`
# builds); every other spec goes to upstream's helper as before. Megatron-LM is not always
# installed (it is not on PyPI; some megatron-core wheels ship it), nor cheap to import, so the
# module is patched if already imported, else as soon as it is.

_MEGATRON_LM_BUILDER = "megatron.training.models.gpt"


def _our_spec_backend(spec) -> str | None:
    if spec is local_layer_spec:
        return "local"
    if spec is te_layer_spec:
        return "te"
    return None


def _route_builder_mtp(builder_module) -> None:
    """Make the builder module's `mtp_block_spec` build ours for our --spec objects."""
    upstream = builder_module.mtp_block_spec
    if getattr(upstream, "routes_dsv3_specs", False):
        return

    @functools.wraps(upstream)
    def builder_mtp_block_spec(config, transformer_layer_spec, vp_stage=None):
        backend = _our_spec_backend(transformer_layer_spec)
        if backend is None:
            return upstream(config, transformer_layer_spec, vp_stage=vp_stage)
        return mtp_block_spec(config.transformer, backend, vp_stage=vp_stage)

    builder_mtp_block_spec.routes_dsv3_specs = True
    builder_module.mtp_block_spec = builder_mtp_block_spec


class _RouteBuilderMtpOnImport(importlib.abc.MetaPathFinder):
    """One-shot: patches Megatron-LM's builder module right after it is first executed."""

    def find_spec(self, name, path=None, target=None):
        if name != _MEGATRON_LM_BUILDER:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            exec_module = spec.loader.exec_module

            def exec_and_route(module):
                exec_module(module)
                _route_builder_mtp(module)

            spec.loader.exec_module = exec_and_route
        return spec


if _MEGATRON_LM_BUILDER in sys.modules:
    _route_builder_mtp(sys.modules[_MEGATRON_LM_BUILDER])
elif not any(isinstance(finder, _RouteBuilderMtpOnImport) for finder in sys.meta_path):
    sys.meta_path.insert(0, _RouteBuilderMtpOnImport())
