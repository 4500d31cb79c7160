"""Pre-train a DeepSeek-V3-style model with Megatron-LM's `pretrain` and megatron_dsv3's specs.

    torchrun --nproc-per-node 8 examples/pretrain_dsv3.py --dsv3-preset proxy --bf16 \\
        --expert-model-parallel-size 8 --micro-batch-size 4 --global-batch-size 256 \\
        --train-iters 1000 --lr 2.2e-4 --eval-interval 100 --mock-data --tokenizer-type NullTokenizer --vocab-size 129279
    python examples/pretrain_dsv3.py --dry-run ...   # check the flags, print the layout (no GPU)
    examples/slurm/*.sbatch                           # the paper's layout, and two smaller ones

Your data: Megatron-LM's own flags, in place of --mock-data and the NullTokenizer,
    --data-path 0.3 data/a_text_document 0.7 data/b_text_document --split 99,1,0 \\
    --tokenizer-type HuggingFaceTokenizer --tokenizer-model TOKENIZER_DIR
(prefixes of `.bin`/`.idx` pairs as Megatron-LM's tools/preprocess_data.py writes them, with
optional weights; the directory of the HF tokenizer they were tokenized with). Before any process
group, `megatron_dsv3.launch.check_data` refuses a blend Megatron would misread, a missing `.idx`
or `.bin`, a dataset whose id dtype (its `.idx` header) cannot hold the tokenizer's ids, and a
tokenizer larger than `--padded-vocab-size` (a preset sets it: pass a larger one after
`--dsv3-preset`), naming the flag, the value and the fix (the rules: megatron_dsv3/datasets.py).

Beyond Megatron-LM's own flags (megatron_dsv3.launch.add_args):
  --dsv3-preset NAME           a preset's model flags (megatron_dsv3.launch.PRESET_FLAGS); later flags override them
  --dsv3-fp8 {none,te,emulate,scaled_mm,auto}     blockwise FP8 (report §3.3)
  --dsv3-gamma-schedule, --dsv3-lambda-schedule   gamma and lambda by the fraction of the run's tokens
  --pipeline-schedule {1f1b,dualpipe,dualpipev}  Megatron's own 1F1B, or ours (installed)
  --dsv3-init-as-single-process   every rank initialises like the single-process model (models that fit on one rank)
  --dry-run
On a machine without CUDA (pass --distributed-backend gloo) it runs on CPU processes
(megatron_dsv3.launch.runtime, docs/cpu.md).
The model is `megatron_dsv3.specs.gpt_model` of the `DeepSeekV3Config` of the flags; under
DualPipe(V) with more than one pipeline rank, a rank's two chunks built by the schedule's record
(`megatron_dsv3.pipeline.registry`; stages and their layers: docs/pipeline.md). Each micro-batch's forward step
first sets gamma (the bias update speed) and lambda (the MTP loss weight) from the tokens consumed
by the steps before (`DeepSeekV3Config.apply_token_schedules`; Megatron reads both every step).
"""

import dataclasses
import sys
from functools import partial

import torch
from megatron.core import mpu
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset
from megatron.core.enums import ModelType
from megatron.core.utils import get_model_config
from megatron.training import get_args, get_tokenizer, pretrain
from megatron.training.argument_utils import pretrain_cfg_container_from_args
from megatron.training.global_vars import set_global_variables
from megatron.training.utils import get_blend_and_blend_per_split

from megatron_dsv3 import launch, specs
from megatron_dsv3.config import ConfigError
from megatron_dsv3.launch import runtime
from megatron_dsv3.pipeline import install, registry
from megatron_dsv3.training.forward_step import loss_func


class ModelChunks(list):
    """A rank's chunks from one model_provider call: Megatron-LM's `get_model` sets
    `model_type` on what the provider returns (a plain list takes no attribute), then uses a
    list as the rank's chunks."""


def model_provider(pre_process=True, post_process=True, config=None, pg_collection=None):
    """Megatron-LM's model provider (no virtual pipeline: megatron_dsv3.launch rejects it).
    `config` is only passed for RL inference models; the model config is built from the flags."""
    args = get_args()
    model_config = launch.model_config(args)
    pp_size = args.pipeline_model_parallel_size
    schedule = registry.SCHEDULES[args.pipeline_schedule]
    if args.dsv3_init_as_single_process:  # every rank from --seed (Megatron-LM offsets it by pipeline rank)
        torch.manual_seed(args.seed)
    if not schedule.ours or pp_size == 1:
        return specs.gpt_model(model_config, pre_process, post_process, pg_collection=pg_collection)
    layers_per_stage = launch.stage_layers(args, model_config)
    # The stages carry their own layer counts, read from Megatron's per-rank ones (megatron_dsv3/launch/layout.py).
    stage_config = dataclasses.replace(model_config, num_layers_in_first_pipeline_stage=None, num_layers_in_last_pipeline_stage=None)
    # By default each chunk is initialised on its own (Megatron-LM's seeding): the
    # single-process-equal initialisation builds the whole model on every rank, which a 671B
    # model cannot; --dsv3-init-as-single-process asks for it (models that fit on one rank).
    chunks = schedule.build_chunks(stage_config, mpu.get_pipeline_model_parallel_rank(), pp_size, layers_per_stage,
                                   init_as_single_process=args.dsv3_init_as_single_process)
    return ModelChunks(chunks)


def total_train_tokens(args) -> int:
    samples = args.train_samples if args.train_samples else args.train_iters * args.global_batch_size
    return samples * args.seq_length


def forward_step(data_iterator, model):
    """One micro-batch: gamma and lambda for this step, then the model's per-token loss.

    Ranks that hold neither end of the pipeline have no data iterator (Megatron-LM builds the
    data on the first and last stage only) and pass activations only."""
    args = get_args()
    get_model_config(model).apply_token_schedules(args.consumed_train_samples * args.seq_length, total_train_tokens(args))
    tokens = labels = loss_mask = position_ids = None
    if data_iterator is not None:
        batch = next(data_iterator)
        device = next(model.parameters()).device
        tokens, labels, loss_mask, position_ids = (batch[k].to(device) for k in ("tokens", "labels", "loss_mask", "position_ids"))
    per_token_loss = model(tokens, position_ids, None, labels=labels, loss_mask=loss_mask)
    return per_token_loss, partial(loss_func, loss_mask)


def is_dataset_built_on_rank() -> bool:
    return mpu.is_pipeline_first_stage() or mpu.is_pipeline_last_stage()


def datasets_provider(train_val_test_num_samples):
    """Megatron's GPT datasets (or mock data) of `--data-path` / `--mock-data`, with Megatron-LM's
    tokenizer (`--tokenizer-type`); main() checked them first (`launch.check_data`)."""
    args = get_args()
    blend, blend_per_split = get_blend_and_blend_per_split(args)
    config = GPTDatasetConfig(
        random_seed=args.seed,
        sequence_length=args.seq_length,
        blend=blend,
        blend_per_split=blend_per_split,
        split=args.split,
        path_to_cache=args.data_cache_path,
        tokenizer=get_tokenizer(),
        reset_position_ids=args.reset_position_ids,
        reset_attention_mask=args.reset_attention_mask,
        eod_mask_loss=args.eod_mask_loss,
        create_attention_mask=False,  # MLA attends causally without a mask tensor
    )
    dataset_type = MockGPTDataset if args.mock_data else GPTDataset
    return BlendedMegatronDatasetBuilder(dataset_type, train_val_test_num_samples, is_dataset_built_on_rank, config).build()


datasets_provider.is_distributed = True  # each rank's builder decides (is_dataset_built_on_rank)


def main() -> int:
    try:
        sys.argv[1:] = launch.expand_argv(sys.argv[1:])
        args = launch.parse_args()
        if args.dry_run:
            print(launch.dry_run(args))
            return 0
        set_global_variables(args)  # also builds the tokenizer, which pads the vocabulary
        launch.check_data(args, get_tokenizer())  # the data flags against the tokenizer and --padded-vocab-size
        model_config = launch.model_config(args)
        launch.pipeline_layout(args, model_config)  # fail before any process group exists
        # Fixes to the wheel; on a machine without CUDA, its checks, the CPU layer and the process groups.
        runtime.prepare(args, model_config)
    except (launch.LaunchError, ConfigError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    schedule = registry.SCHEDULES[args.pipeline_schedule]
    if schedule.ours:
        install.install(schedule.name)
    pretrain(
        pretrain_cfg_container_from_args(args),
        datasets_provider,
        ModelType.encoder_or_decoder,
        forward_step,
        model_provider=model_provider,
        get_embedding_ranks=schedule.get_embedding_ranks,  # two-chunk schedules: one embedding, on pipeline rank 0
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
