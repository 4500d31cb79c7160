"""Model chunks for pipeline placements: DualPipeV's two chunks per rank.

DualPipeV (schedule.py) cuts the model into 2P stages of equal depth and puts stage r
(chunk 0, the way down) and stage 2P-1-r (chunk 1, the way up) on pipeline rank r of P.
Each chunk is a Megatron `GPTModel` holding the decoder layers of its stage:
  - stage 0 (rank 0, chunk 0) has the embedding (`pre_process`);
  - stage 2P-1 (rank 0, chunk 1) has the final norm, the output head (`post_process`) and
    the MTP block, whose embedding is the *same module object* as chunk 0's: one embedding
    on rank 0, physically shared, no copy on another stage to keep in sync (PAPER.md §6).
    Chunk 0 owns it (it is registered in chunk 0 only), so DDP, the optimizer and
    checkpoints see it once; chunk 1 only refers to it.
  - every other chunk is decoder layers only.

Megatron numbers a layer `layer_number + offset`, the offset from its pipeline rank and
`pipeline_model_parallel_size`; that gives stage r's offset, never stage 2P-1-r's. Each
layer here is built with its global number instead (`_StageTransformerLayer`), so routers
(aux-loss tracker, bias update) and the final-norm placement see the numbers of the
single-process model.

Initialisation equals the single-process model's: on every rank, with the caller's RNG
state, `dualpipev_chunks` first builds the whole single-process model (`specs.gpt_model`
with Megatron's pipeline rank/size read as 0/1 while it is built), then copies each chunk's
parameters and buffers from it by name (`decoder.layers.{i}` -> `decoder.layers.{offset+i}`),
and drops it; the RNG is left as building the single-process model leaves it. Seed every
rank as the single-process run is seeded before calling.
Only even layouts for now: num_layers must be a multiple of 2P.
"""

from __future__ import annotations

import dataclasses
import re

import torch
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.multi_token_prediction import MultiTokenPredictionBlock
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_layer import TransformerLayer

from megatron_dsv3 import specs


class _StageTransformerLayer(TransformerLayer):
    """A TransformerLayer numbered globally: local number + its stage's first-layer offset."""

    def __init__(self, config, submodules, layer_number: int = 1, *, stage_offset: int, **kwargs):
        super().__init__(config, submodules, layer_number + stage_offset, add_layer_offset=False, **kwargs)


def stage_layers(num_layers: int, num_stages: int, stage: int) -> range:
    """Indices (0-based, global) of the decoder layers of `stage` in an even split."""
    if num_layers % num_stages:
        raise ValueError(
            f"num_layers={num_layers} does not divide into {num_stages} pipeline stages (2P for DualPipeV): "
            f"uneven layouts are not supported yet. Fix: make num_layers a multiple of {num_stages}."
        )
    per_stage = num_layers // num_stages
    return range(stage * per_stage, (stage + 1) * per_stage)


def _stage_block_spec(full_block: TransformerBlockSubmodules, layers: range) -> TransformerBlockSubmodules:
    """The block spec of one stage: its layers of `full_block`, numbered from `layers.start`."""
    stage_specs = []
    for index in layers:
        spec = full_block.layer_specs[index]
        if spec.module is not TransformerLayer:
            raise ValueError(
                f"decoder layer {index + 1} is built by {spec.module.__name__}: DualPipeV chunks renumber "
                "TransformerLayer specs only. Fix: use the specs of megatron_dsv3.specs."
            )
        params = {**spec.params, "stage_offset": layers.start}
        stage_specs.append(dataclasses.replace(spec, module=_StageTransformerLayer, params=params))
    return TransformerBlockSubmodules(layer_specs=stage_specs, layer_norm=full_block.layer_norm)


class _AsSingleProcess:
    """Within it, Megatron's pipeline rank / size read as 0 / 1 (its own override setters),
    so `specs` builds the whole single-process model: all layers, MTP included."""

    def __enter__(self):
        self._saved = (parallel_state._MPU_PIPELINE_MODEL_PARALLEL_RANK, parallel_state._MPU_PIPELINE_MODEL_PARALLEL_WORLD_SIZE)
        parallel_state.set_pipeline_model_parallel_rank(0)
        parallel_state.set_pipeline_model_parallel_world_size(1)

    def __exit__(self, *exc):
        parallel_state.set_pipeline_model_parallel_rank(self._saved[0])
        parallel_state.set_pipeline_model_parallel_world_size(self._saved[1])


def dualpipev_embedding_ranks(pp_ranks: list[int]) -> list[int]:
    """Megatron's embedding group for DualPipeV: pipeline rank 0 alone.

    Megatron's default pairs the first and last pipeline ranks to keep a duplicated
    embedding in sync (an all-reduce when a stage is built, another in finalize_model_grads).
    DualPipeV has no duplicate: the embedding is on rank 0 only (the module note). Pass as
    `initialize_model_parallel(..., get_embedding_ranks=dualpipev_embedding_ranks)`."""
    return [pp_ranks[0]]


def _without_embedding_group() -> ProcessGroupCollection:
    """Megatron's groups, minus the embedding groups: a chunk is built without Megatron's
    start-up all-reduce of a duplicated embedding (there is none to sync)."""
    groups = ProcessGroupCollection.use_mpu_process_groups()
    groups.embd = None
    groups.pos_embd = None
    return groups


def _stage_chunk(config, full_block: TransformerBlockSubmodules, stage: int, num_stages: int) -> GPTModel:
    """Stage `stage` of `num_stages` as a GPTModel (MTP not attached yet)."""
    return GPTModel(
        config=config,
        transformer_layer_spec=_stage_block_spec(full_block, stage_layers(config.num_layers, num_stages, stage)),
        vocab_size=config.vocab_size,
        max_sequence_length=config.seq_length,
        pre_process=stage == 0,
        post_process=stage == num_stages - 1,
        share_embeddings_and_output_weights=config.share_embeddings_and_output_weights,
        position_embedding_type="rope",  # as specs.gpt_model: MLA applies its own RoPE
        mtp_block_spec=None,  # Megatron would put MTP on the last pipeline rank; it goes with the head
        pg_collection=_without_embedding_group(),
    )


def full_model_name(chunk_name: str, layer_offset: int) -> str:
    """The single-process model's name for a chunk's parameter or buffer: decoder layers are
    numbered from the stage's first layer (`layer_offset`), everything else keeps its name."""
    return re.sub(r"^decoder\.layers\.(\d+)\.", lambda m: f"decoder.layers.{int(m.group(1)) + layer_offset}.", chunk_name)


def _copy_from_full(chunk: GPTModel, full: GPTModel, layer_offset: int) -> None:
    """Copy every parameter and buffer of `chunk` from the same tensor of the full model."""
    source = dict(full.named_parameters())
    source.update(full.named_buffers())
    targets = dict(chunk.named_parameters())
    targets.update(chunk.named_buffers())
    with torch.no_grad():
        for name, tensor in targets.items():
            full_name = full_model_name(name, layer_offset)
            if full_name not in source or source[full_name].shape != tensor.shape:
                raise ValueError(f"chunk tensor {name!r} has no counterpart {full_name!r} of shape {tuple(tensor.shape)} in the full model")
            tensor.copy_(source[full_name])


def dualpipev_chunks(config, pp_rank: int, pp_size: int) -> list[GPTModel]:
    """Rank `pp_rank`'s two DualPipeV chunks: [stage pp_rank, stage 2P-1-pp_rank] of 2P stages.

    Call after seeding as the single-process run is seeded (see the module note); the
    chunks' initial values equal that model's. `config.pipeline_model_parallel_size` must
    be `pp_size` (Megatron's pipeline group is what the executor communicates over)."""
    if pp_size < 1 or not 0 <= pp_rank < pp_size:
        raise ValueError(f"pp_rank={pp_rank}, pp_size={pp_size}: need pp_size >= 1 and 0 <= pp_rank < pp_size")
    if config.pipeline_model_parallel_size != pp_size:
        raise ValueError(
            f"config.pipeline_model_parallel_size={config.pipeline_model_parallel_size} but pp_size={pp_size}. "
            "Fix: build the config with pipeline_model_parallel_size=pp_size."
        )
    num_stages = 2 * pp_size
    stages = (pp_rank, num_stages - 1 - pp_rank)
    for stage in stages:
        stage_layers(config.num_layers, num_stages, stage)  # raises on an uneven split

    single = dataclasses.replace(config, pipeline_model_parallel_size=1)
    with _AsSingleProcess():
        full = specs.gpt_model(single)
        full_block = specs.decoder_block_spec(single)
    rng_after_full_model = torch.get_rng_state()  # the single-process run's state after building

    chunks = [_stage_chunk(config, full_block, stage, num_stages) for stage in stages]
    if pp_rank == 0 and config.mtp_num_layers:
        head = chunks[1]
        with _AsSingleProcess():  # Megatron sizes the MTP block by "is this the last pipeline rank"
            head.mtp = MultiTokenPredictionBlock(config=config, spec=specs.mtp_block_spec(config), pg_collection=head.pg_collection)
        head.mtp_process = True
        # Shared, not registered: chunk 0 owns the embedding (module note).
        object.__setattr__(head, "embedding", chunks[0].embedding)
        # Used twice on one rank, as in the single-process model (Megatron marks it there).
        chunks[0].embedding.word_embeddings.weight.zero_out_wgrad = True
    for chunk, stage in zip(chunks, stages):
        _copy_from_full(chunk, full, stage_layers(config.num_layers, num_stages, stage).start)
    torch.set_rng_state(rng_after_full_model)
    return chunks
