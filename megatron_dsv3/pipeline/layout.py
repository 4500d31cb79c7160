"""Model chunks for the two-chunk placements: DualPipeV's V and DualPipe's two directions.

The placements themselves (which rank holds which stage, DualPipe's mirrors) are described in
docs/pipeline.md and defined by `schedule.dualpipev_stages` / `schedule.dualpipe_stages`.
Each chunk is a Megatron `GPTModel` holding the decoder layers of its stage:
  - the first stage has the embedding (`pre_process`);
  - the last stage has the final norm, the output head (`post_process`) and the MTP block.
    Both placements put the first and the last stage on the same ranks (DualPipeV: rank 0;
    DualPipe: ranks 0 and P-1), so the MTP block's embedding is the *same module object* as
    the first stage's on that rank: physically shared, no copy to keep in sync (report §3.2).
    The first stage's chunk owns it (registered there only), so DDP, the optimizer and
    checkpoints see it once per rank; the last stage's chunk only refers to it.
  - every other chunk is decoder layers only.

Layers per stage: even by default (num_layers a multiple of the stage count), or an explicit
`layers_per_stage` list for uneven models (61 layers + MTP over 32 stages), e.g. fewer on
the first and last stages, which also hold the embedding and the head.

Megatron numbers a layer `layer_number + offset`, the offset from its pipeline rank and
`pipeline_model_parallel_size`; that gives stage r's offset only for a one-chunk 1F1B layout.
Each layer here is built with its global number instead (`_StageTransformerLayer`), so routers
(aux-loss tracker, bias update) and the final-norm placement see the numbers of the
single-process model.

Initialisation. By default it equals the single-process model's: on every rank, with the
caller's RNG state, the builder builds the whole single-process model (`single_process_model`:
Megatron's pipeline rank/size read as 0/1 while it is built, and an expert-parallel group of
one), then copies each chunk's parameters and buffers from it by name (`decoder.layers.{i}` ->
`decoder.layers.{offset+i}`; with expert parallelism, a rank's `experts.local_experts.{j}` ->
`experts.local_experts.{ep_rank * local_experts + j}`), and drops it; the RNG is left as building the single-process model leaves it. Seed every
rank as the single-process run is seeded before calling. That needs the whole model in one
rank's memory: for models that do not fit (671B), pass `init_as_single_process=False` and
each chunk keeps the initialisation Megatron gives it (Megatron-LM's seeding), or load a
checkpoint.
"""

from __future__ import annotations

import dataclasses
import re

import torch
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, ShardedTensorFactory
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.multi_token_prediction import MultiTokenPredictionBlock
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_layer import TransformerLayer, get_transformer_layer_offset
from megatron.core.utils import get_pg_rank

from megatron_dsv3 import specs
from megatron_dsv3.pipeline import schedule


class _StageTransformerLayer(TransformerLayer):
    """A TransformerLayer numbered globally: local number + its stage's first-layer offset."""

    def __init__(self, config, submodules, layer_number: int = 1, *, stage_offset: int, **kwargs):
        super().__init__(config, submodules, layer_number + stage_offset, add_layer_offset=False, **kwargs)


class _StageGPTModel(GPTModel):
    """A stage chunk whose decoder holds the global layers from `first_layer` (0-based).

    Checkpoints (`sharded_state_dict`) differ from Megatron's stage in two ways:
      - Megatron keys each layer's local entry `layers.{global - offset}` with the offset of a
        one-chunk-per-rank layout (`get_transformer_layer_offset` of the pipeline rank); here
        the module list starts at `first_layer`, so the local keys are renamed to match it
        (the sharded keys, global numbers, are right as they are);
      - the last stage's MTP block uses the first stage's embedding module on the same rank
        (the module note), not a copy: Megatron's tie of an MTP-stage copy to the first
        stage's embedding does not apply, and the first stage's chunk saves it;
      - a DualPipe mirror (`is_mirror`: chunk 1, whose stage another rank holds as chunk 0)
        marks every entry a non-main replica, so each stage is written once and read into
        both copies.
    """

    def __init__(self, *args, first_layer: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.first_layer = first_layer
        self.is_mirror = False

    def sharded_state_dict(self, prefix: str = "", *args, **kwargs):
        shares_embedding, self.mtp_process = self.mtp_process, False
        try:
            state = super().sharded_state_dict(prefix, *args, **kwargs)
        finally:
            self.mtp_process = shares_embedding
        megatron_offset = get_transformer_layer_offset(self.config, self.vp_stage, get_pg_rank(self.pg_collection.pp))
        local_layer = re.compile(rf"^{re.escape(prefix)}decoder\.layers\.(-?\d+)\.")
        state = {
            local_layer.sub(lambda m: f"{prefix}decoder.layers.{int(m.group(1)) + megatron_offset - self.first_layer}.", key): value
            for key, value in state.items()
        }
        if self.is_mirror:
            dict_list_map_inplace(_as_replica, state)
        return state


def _as_replica(item):
    """A sharded entry marked as another rank's copy (replica id not all zeros)."""
    if isinstance(item, (ShardedTensor, ShardedObject, ShardedTensorFactory)):
        replica = item.replica_id
        item.replica_id = (1, *replica[1:]) if isinstance(replica, tuple) else 1
    return item


def stage_layers(num_layers: int, num_stages: int, stage: int, layers_per_stage=None) -> range:
    """Indices (0-based, global) of the decoder layers of `stage`: an even split, or the
    explicit `layers_per_stage` (one count per stage, summing to num_layers)."""
    counts = check_layers_per_stage(num_layers, num_stages, layers_per_stage)
    return range(sum(counts[:stage]), sum(counts[: stage + 1]))


def check_layers_per_stage(num_layers: int, num_stages: int, layers_per_stage=None) -> list[int]:
    """The layer count of every stage; raises ValueError, naming the fix, on an impossible layout."""
    if layers_per_stage is None:
        if num_layers % num_stages:
            raise ValueError(
                f"num_layers={num_layers} does not divide into {num_stages} pipeline stages (2P for DualPipeV, P for "
                f"DualPipe). Fix: make num_layers a multiple of {num_stages}, or pass layers_per_stage (one count per stage)."
            )
        return [num_layers // num_stages] * num_stages
    counts = list(layers_per_stage)
    if len(counts) != num_stages or sum(counts) != num_layers or min(counts) < 1:
        raise ValueError(
            f"layers_per_stage={counts}: needs {num_stages} counts (one per pipeline stage), each >= 1, summing to "
            f"num_layers={num_layers}; got {len(counts)} counts summing to {sum(counts)}. Fix: list one count "
            "per stage (stage 0 first)."
        )
    return counts


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


def embedding_on_first_rank(pp_ranks: list[int]) -> list[int]:
    """Megatron's embedding group for DualPipe and DualPipeV: pipeline rank 0 alone.

    Megatron's default pairs the first and last pipeline ranks to keep a duplicated
    embedding in sync (an all-reduce when a stage is built, another in finalize_model_grads).
    Here the embedding is shared within a rank (the module note), and DualPipe's mirrored
    copy is summed by the executor with every other mirrored parameter: no all-reduce to do.
    Pass as `initialize_model_parallel(..., get_embedding_ranks=embedding_on_first_rank)`."""
    return [pp_ranks[0]]


def _without_embedding_group() -> ProcessGroupCollection:
    """Megatron's groups, minus the embedding groups: a chunk is built without Megatron's
    start-up all-reduce of a duplicated embedding (there is none to sync)."""
    groups = ProcessGroupCollection.use_mpu_process_groups()
    groups.embd = None
    groups.pos_embd = None
    return groups


def _stage_chunk(config, full_block: TransformerBlockSubmodules, stage: int, num_stages: int, layers: range) -> _StageGPTModel:
    """Stage `stage` of `num_stages`, holding decoder `layers`, as a GPTModel (MTP not attached yet)."""
    return _StageGPTModel(
        first_layer=layers.start,
        config=config,
        transformer_layer_spec=_stage_block_spec(full_block, layers),
        vocab_size=config.vocab_size,
        max_sequence_length=config.seq_length,
        pre_process=stage == 0,
        post_process=stage == num_stages - 1,
        share_embeddings_and_output_weights=False,  # rejected in _two_chunks when the config ties them
        position_embedding_type="rope",  # as specs.gpt_model: MLA applies its own RoPE
        mtp_block_spec=None,  # Megatron would put MTP on the last pipeline rank; it goes with the head
        pg_collection=_without_embedding_group(),
    )


def full_model_name(chunk_name: str, layer_offset: int, expert_offset: int = 0) -> str:
    """The single-process model's name for a chunk's parameter or buffer: decoder layers are
    numbered from the stage's first layer (`layer_offset`), a rank's local experts from its
    first expert (`expert_offset`: expert-parallel rank x local experts), everything else keeps
    its name."""
    name = re.sub(r"^decoder\.layers\.(\d+)\.", lambda m: f"decoder.layers.{int(m.group(1)) + layer_offset}.", chunk_name)
    return re.sub(r"\.experts\.local_experts\.(\d+)\.", lambda m: f".experts.local_experts.{int(m.group(1)) + expert_offset}.", name)


def expert_offset(config) -> int:
    """The single-process index of this rank's first local expert (0 without expert parallelism)."""
    if not config.num_moe_experts or config.expert_model_parallel_size == 1:
        return 0
    return parallel_state.get_expert_model_parallel_rank() * (config.num_moe_experts // config.expert_model_parallel_size)


def single_process_model(config) -> GPTModel:
    """The whole single-process model of `config`, built on this rank with the caller's RNG: all
    layers (pipeline rank / size read as 0 / 1), MTP included, and all experts (an expert-parallel
    group of one: Megatron's MoE layer sizes its experts by the group it is given)."""
    single = dataclasses.replace(config, pipeline_model_parallel_size=1, expert_model_parallel_size=1,
                                 **({"fb_overlap": False} if getattr(config, "fb_overlap", False) else {}))  # it runs no FB
    groups = ProcessGroupCollection.use_mpu_process_groups()
    groups.ep = None  # Megatron's get_pg_size(None) is 1
    with _AsSingleProcess():
        return specs.gpt_model(single, pg_collection=groups)


def copy_single_process_init(chunks: list[GPTModel], config, layer_offsets: list[int], rng_state: torch.Tensor) -> None:
    """Give `chunks` the initialisation of the single-process model (module note): build it from
    `rng_state` (the RNG state before the chunks were built, as the single-process run starts),
    copy each chunk's tensors from it, and leave the RNG as building it left it."""
    torch.set_rng_state(rng_state)
    full = single_process_model(config)
    rng_after_full_model = torch.get_rng_state()
    for chunk, layer_offset in zip(chunks, layer_offsets):
        _copy_from_full(chunk, full, layer_offset, expert_offset(config))
    torch.set_rng_state(rng_after_full_model)


def _copy_from_full(chunk: GPTModel, full: GPTModel, layer_offset: int, expert_offset: int) -> None:
    """Copy every parameter and buffer of `chunk` from the same tensor of the full model."""
    source = dict(full.named_parameters())
    source.update(full.named_buffers())
    targets = dict(chunk.named_parameters())
    targets.update(chunk.named_buffers())
    with torch.no_grad():
        for name, tensor in targets.items():
            full_name = full_model_name(name, layer_offset, expert_offset)
            if full_name not in source or source[full_name].shape != tensor.shape:
                raise ValueError(f"chunk tensor {name!r} has no counterpart {full_name!r} of shape {tuple(tensor.shape)} in the full model")
            tensor.copy_(source[full_name])


def dualpipev_chunks(config, pp_rank: int, pp_size: int, layers_per_stage=None, init_as_single_process: bool = True) -> list[GPTModel]:
    """Rank `pp_rank`'s two DualPipeV chunks: [stage pp_rank, stage 2P-1-pp_rank] of 2P stages."""
    return _two_chunks(config, pp_rank, pp_size, schedule.dualpipev_stages(pp_size), layers_per_stage, init_as_single_process)


def dualpipe_chunks(config, pp_rank: int, pp_size: int, layers_per_stage=None, init_as_single_process: bool = True) -> list[GPTModel]:
    """Rank `pp_rank`'s two DualPipe chunks: [stage pp_rank of direction 0, stage P-1-pp_rank of
    direction 1] of P stages; rank P-1-pp_rank holds their mirrors."""
    chunks = _two_chunks(config, pp_rank, pp_size, schedule.dualpipe_stages(pp_size), layers_per_stage, init_as_single_process)
    if not init_as_single_process:
        _copy_mirrors(chunks)
    # Chunk 1 is the mirror: checkpoints write its stage from the other copy, and gradient
    # norms count each stage once (Megatron's clip_grad_norm skips `shared` parameters).
    chunks[1].is_mirror = True
    for param in chunks[1].parameters():
        param.shared = True
    return chunks


def _copy_mirrors(chunks: list[GPTModel]) -> None:
    """DualPipe's copies of a stage start equal: each rank's chunk 1 takes the values of its
    mirror, chunk 0 of pipeline rank P-1-r (one exchange over Megatron's pipeline group)."""
    group = parallel_state.get_pipeline_model_parallel_group()
    partner = group.size() - 1 - group.rank()
    # chunks are still where they were built (often the CPU); NCCL sends from the GPU
    device = torch.device("cuda", torch.cuda.current_device()) if torch.distributed.get_backend(group) == "nccl" else torch.device("cpu")
    sends = [t.detach().to(device) for t in (*chunks[0].parameters(), *chunks[0].buffers())]
    targets = [t.detach() for t in (*chunks[1].parameters(), *chunks[1].buffers())]
    receives = [torch.empty_like(t, device=device) for t in targets]
    operations = [torch.distributed.P2POp(torch.distributed.isend, t, group=group, group_peer=partner) for t in sends]
    operations += [torch.distributed.P2POp(torch.distributed.irecv, t, group=group, group_peer=partner) for t in receives]
    for request in torch.distributed.batch_isend_irecv(operations):
        request.wait()
    with torch.no_grad():
        for target, received in zip(targets, receives):
            target.copy_(received)


def _two_chunks(config, pp_rank: int, pp_size: int, stage_map: schedule.StageMap, layers_per_stage,
                init_as_single_process: bool) -> list[GPTModel]:
    """The chunks of rank `pp_rank` in `stage_map` (see the module note). `config.pipeline_model_parallel_size`
    must be `pp_size` (Megatron's pipeline group is what the executor communicates over)."""
    if not 0 <= pp_rank < pp_size:
        raise ValueError(f"pp_rank={pp_rank}, pp_size={pp_size}: need 0 <= pp_rank < pp_size")
    stages = tuple(stage for _, stage in stage_map[pp_rank])
    num_stages = schedule.num_stages(stage_map)
    if config.pipeline_model_parallel_size != pp_size:
        raise ValueError(
            f"config.pipeline_model_parallel_size={config.pipeline_model_parallel_size} but pp_size={pp_size}. "
            "Fix: build the config with pipeline_model_parallel_size=pp_size."
        )
    if config.share_embeddings_and_output_weights:
        raise ValueError(
            "share_embeddings_and_output_weights=True: the two-chunk layouts keep the output head apart from the "
            "embedding (DeepSeek-V3 unties them). Fix: set share_embeddings_and_output_weights=False."
        )
    layers = [stage_layers(config.num_layers, num_stages, stage, layers_per_stage) for stage in stages]

    rng_before_chunks = torch.get_rng_state()
    with _AsSingleProcess():
        full_block = specs.decoder_block_spec(dataclasses.replace(config, pipeline_model_parallel_size=1))

    chunks = [_stage_chunk(config, full_block, stage, num_stages, stage_range) for stage, stage_range in zip(stages, layers)]
    if set(stages) == {0, num_stages - 1}:  # first and last stage here: the head shares the embedding
        first, last = (chunks[stages.index(0)], chunks[stages.index(num_stages - 1)])
        if config.mtp_num_layers:
            with _AsSingleProcess():  # Megatron sizes the MTP block by "is this the last pipeline rank"
                last.mtp = MultiTokenPredictionBlock(config=config, spec=specs.mtp_block_spec(config), pg_collection=last.pg_collection)
            last.mtp_process = True
            # Shared, not registered: the first stage owns the embedding (module note).
            object.__setattr__(last, "embedding", first.embedding)
            # Used twice on one rank, as in the single-process model (Megatron marks it there).
            first.embedding.word_embeddings.weight.zero_out_wgrad = True
    for chunk in chunks:
        specs.use_fp8_linears(chunk, config)  # as specs.gpt_model does for the whole model
    if init_as_single_process:
        copy_single_process_init(chunks, config, [stage_range.start for stage_range in layers], rng_before_chunks)
    return chunks
