"""`pretrain_gpt.py --spec megatron_dsv3.specs local_layer_spec --mtp-num-layers 1`, on this CPU.

Megatron-LM's pretrain_gpt.py (core_r0.19) parses with `parse_and_validate_args`, makes a
`GPTModelConfig` with `gpt_config_from_args` (which imports the --spec object), and `pretrain`
builds it with the config's builder, `GPTModelBuilder.build_distributed_models`. That builder
makes the MTP block apart from --spec (megatron/training/models/gpt.py, `mtp_block_spec`), so
these tests drive it and check the model against ours, `specs.gpt_model(preset("tiny"))`.
"""

import dataclasses
import functools
import importlib
import sys

import megatron.training.models
import pytest
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.router import TopKRouter
from megatron.training.argument_utils import gpt_config_from_args
from megatron.training.arguments import parse_and_validate_args
from megatron.training.global_vars import unset_global_variables
from megatron.training.models import gpt as megatron_lm_gpt

from megatron_dsv3 import specs
from megatron_dsv3.attention import MLASDPAttention
from megatron_dsv3.config import preset
from megatron_dsv3.launch import preset_argv
from megatron_dsv3.routing import LoadRecordingRouter
from megatron_dsv3.specs import HAVE_TE, gpt_model, local_layer_spec, te_layer_spec


def _megatron_lm_flags(name: str) -> list[str]:
    """The preset's flags without our own `--dsv3-*` ones, which pretrain_gpt.py's parser lacks
    (the gamma/lambda schedules, not part of the model)."""
    argv, flags = preset_argv(name), []
    for i, flag in enumerate(argv):
        if flag.startswith("--dsv3-") or (i and argv[i - 1].startswith("--dsv3-")):
            continue
        flags.append(flag)
    return flags


@pytest.fixture
def pretrain_gpt_model_config(monkeypatch):
    """pretrain_gpt.py's `GPTModelConfig` for its flags after the tiny preset's; globals unset after."""

    def parse(*extra):
        monkeypatch.setenv("RANK", "0")
        monkeypatch.setenv("WORLD_SIZE", "1")
        monkeypatch.setattr(sys, "argv", [
            "pretrain_gpt.py", *_megatron_lm_flags("tiny"),
            "--micro-batch-size", "2", "--global-batch-size", "2", "--train-iters", "10", "--mock-data",
            "--tokenizer-type", "NullTokenizer", "--vocab-size", "256",
            "--no-bias-swiglu-fusion", "--no-bias-dropout-fusion",  # compiled on first use: seconds on a CPU
            *extra,
        ])
        args = parse_and_validate_args(args_defaults={"tokenizer_type": "GPT2BPETokenizer"})  # as pretrain_gpt.py
        return gpt_config_from_args(args)

    yield parse
    unset_global_variables()


def _build_as_pretrain(model_config):
    """`setup_model_and_optimizer`'s build (megatron/training/training.py), without the DDP wrap."""
    builder = model_config.get_builder_cls()(model_config)
    assert isinstance(builder, megatron_lm_gpt.GPTModelBuilder)
    (chunk,) = builder.build_distributed_models(pg_collection=ProcessGroupCollection.use_mpu_process_groups(), wrap_with_ddp=False)
    assert isinstance(chunk, GPTModel)  # the tiny preset is fp32: no Float16Module around it
    return chunk


def _shapes(model):
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def _classes(spec) -> set[type]:
    """Every class in a spec, through ModuleSpecs, partials and submodule dataclasses."""
    if isinstance(spec, type):
        return {spec}
    if isinstance(spec, functools.partial):
        return _classes(spec.func) | {c for v in spec.keywords.values() for c in _classes(v)}
    if dataclasses.is_dataclass(spec):
        return {c for f in dataclasses.fields(spec) for c in _classes(getattr(spec, f.name))}
    if isinstance(spec, (list, tuple)):
        return {c for v in spec for c in _classes(v)}
    return set()


def _layer_kinds(model):
    return [isinstance(layer.mlp, MoELayer) for layer in model.decoder.layers]


def test_pretrain_gpt_with_local_layer_spec_builds_our_mtp_layer(seeded, pretrain_gpt_model_config):
    model_config = pretrain_gpt_model_config("--spec", "megatron_dsv3.specs", "local_layer_spec", "--mtp-num-layers", "1")
    assert model_config.transformer_layer_spec is local_layer_spec
    model = _build_as_pretrain(model_config)

    ours = gpt_model(preset("tiny"))
    assert ours.config.mtp_num_layers == 1
    assert _shapes(model) == _shapes(ours)  # MTP included
    assert _layer_kinds(model) == _layer_kinds(ours)
    mtp_layer = model.mtp.layers[0].mtp_model_layer
    assert isinstance(mtp_layer.self_attention.core_attention, MLASDPAttention)
    assert isinstance(mtp_layer.mlp.router, LoadRecordingRouter)
    assert [(n, type(m)) for n, m in model.mtp.named_modules()] == [(n, type(m)) for n, m in ours.mtp.named_modules()]


def test_builder_mtp_routing_leaves_other_specs_to_upstream(pretrain_gpt_model_config):
    model_config = pretrain_gpt_model_config("--mtp-num-layers", "1")
    upstream_spec = get_gpt_layer_local_spec(num_experts=8, qk_layernorm=True, multi_latent_attention=True, normalization="RMSNorm")
    classes = _classes(megatron_lm_gpt.mtp_block_spec(model_config, upstream_spec))
    assert TopKRouter in classes and LoadRecordingRouter not in classes


@pytest.mark.skipif(HAVE_TE, reason="checks the routing where Transformer Engine is missing")
def test_builder_mtp_for_te_layer_spec_is_ours(pretrain_gpt_model_config):
    """Without TE, upstream's helper fails inside its TE specs (TypeError: 'NoneType' object is
    not callable); routed, our `mtp_block_spec(config, "te")` says that TE is missing."""
    model_config = pretrain_gpt_model_config("--spec", "megatron_dsv3.specs", "te_layer_spec", "--mtp-num-layers", "1")
    assert model_config.transformer_layer_spec is te_layer_spec
    with pytest.raises(ImportError, match="backend='te' needs Transformer Engine"):
        megatron_lm_gpt.mtp_block_spec(model_config, te_layer_spec)


def test_builder_imported_after_specs_is_routed_too(monkeypatch):
    """Imported before Megatron-LM's builder module, specs patches it when it is imported."""
    monkeypatch.delitem(sys.modules, megatron_lm_gpt.__name__)  # both put back after the test
    monkeypatch.setattr(megatron.training.models, "gpt", megatron_lm_gpt)
    monkeypatch.setattr(sys, "meta_path", [specs._RouteBuilderMtpOnImport(), *sys.meta_path])
    fresh = importlib.import_module(megatron_lm_gpt.__name__)
    assert fresh is not megatron_lm_gpt and fresh.mtp_block_spec.routes_dsv3_specs
    assert not any(isinstance(finder, specs._RouteBuilderMtpOnImport) for finder in sys.meta_path)  # one-shot
