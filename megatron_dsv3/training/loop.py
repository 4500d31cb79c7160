"""A compact training loop for DeepSeek-V3-style Megatron models, on CPU and GPU.

One process, or several under `torchrun`: data parallel, and pipelined with DualPipeV or
DualPipe (`pipeline_schedule`, `pipeline_size`; each rank then holds the two chunks the
schedule's record builds, pipeline/registry.py). Per step it applies the gamma and lambda
token schedules, runs the forward/backward schedule over the micro-batches (Megatron's
`finalize_model_grads` then syncs gradients and moves the expert biases), clips the gradient
at 1.0, steps AdamW (report §4.2 betas and weight decay) with warm-up plus cosine LR, folds
the parameters into the CPU EMA when one is kept (report §3.2.3), and logs LM loss, MTP loss,
the sequence-wise balance loss, each MoE layer's tokens per expert and MaxVio to
`metrics.jsonl` (and TensorBoard when installed). Every `eval_interval` steps and after the
last it evaluates the validation split (`_validate`). Every `save_interval` steps it writes a
resumable checkpoint (training/checkpoint.py); `resume` continues from the newest one,
bit-identically on CPU.

`train` reads as its parts: `_datasets` (train and validation splits, checked),
`_build` (model chunks, optimizer, schedule, EMA), `_data` (the loader, past what a resumed
run consumed), `_train_step` (one global batch), `_validate` (forward only over the same
first validation batches each time) and `_finish` (plots and the summary).

Validation, design note
-----------------------
`--eval-interval N` evaluates after steps N, 2N, ... and after the last step: `--eval-iters`
global batches (micro_batch_size x num_microbatches x data-parallel replicas sequences each)
of the validation split, forward only through the training schedule (no pipelining, DualPipe
or DualPipeV, with expert parallelism and the FB overlap: the executor runs an FB's forward
only). The batches are the split's first eval_iters x global batch samples, read once before
training (`_validation_batches`), so every evaluation sees the same ones and none consumes
the training iterator: curves are comparable, and a resume is bit-identical with or without
evaluation. The record of an evaluated step gets `val_lm_loss` (the token mean over every
validation micro-batch), `val_ppl` (exp of it), `val_mtp_loss` (as the step's `mtp_loss`)
and, with `--ema-decay`, the same for the EMA weights (`ema_val_*`, under
`ParameterEMA.swapped_in`). An evaluation changes no state of the run:
  - the chunks are in eval mode (no dropout) under `torch.no_grad()`: the routers count no
    tokens for the bias update or the load, and add no auxiliary loss (both need grad);
  - Megatron's GPTModel logs MTP losses only in training mode (`process_mtp_loss`'s
    `is_training` is the GPTModel's own flag): that one flag is set, every submodule stays in
    eval mode; the MTP tracker is read and cleared before the next step;
  - the torch and Megatron RNG states are restored after it (eval mode draws nothing; this
    makes it certain).
The embedded corpus holds out 2% of its documents; `--data-path` trains on all of its own,
so `--eval-interval` with it is refused (TrainArgs).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32, get_grad_norm_fp32
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.transformer.moe.moe_logging import MoEMetricsTracker, set_moe_metrics_tracker
from megatron.core.transformer.module import param_is_not_shared
from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper
from tqdm import tqdm

from megatron_dsv3 import cpu
from megatron_dsv3.config import ConfigError, DeepSeekV3Config, parse_override, preset
from megatron_dsv3.distributed import init_distributed, seed_everything
from megatron_dsv3.overlap import link
from megatron_dsv3.overlap.link import LinkSpec, link_flag
from megatron_dsv3.pipeline import layout, registry
from megatron_dsv3.pipeline.dualpipe import TimelineRecorder
from megatron_dsv3.pipeline.no_pipelining import forward_backward_no_pipelining
from megatron_dsv3.pipeline.simulate import plot_timeline
from megatron_dsv3.routing import finalize_model_grads_with_load
from megatron_dsv3.specs import gpt_model
from megatron_dsv3.training import checkpoint, init_from
from megatron_dsv3.training.data import build_datasets, build_user_dataset, check_user_data
from megatron_dsv3.training.ema import ParameterEMA, named_trainable_parameters
from megatron_dsv3.training.forward_step import forward_step
from megatron_dsv3.training.metrics import step_metrics, summarize, validation_metrics
from megatron_dsv3.training.monitor import MetricsLog, plot_expert_load, plot_losses
from megatron_dsv3.training.optimizer import AdamWLowPrecisionMoments
from megatron_dsv3.weight_grad import check_deferrable


def _option(help: str, default=dataclasses.MISSING, *, default_factory=dataclasses.MISSING, **cli):
    """A TrainArgs field and its command-line option: `help`, and argparse settings in `cli`
    (`flag` renames the option; the rest follows the field's type, training/__main__.py)."""
    return field(default=default, default_factory=default_factory, metadata={"help": help, "cli": cli})


@dataclass
class TrainArgs:
    """Everything a run is given; `python -m megatron_dsv3.training` has one option per field."""

    preset: str = _option("model preset (megatron_dsv3.config.PRESETS)", "tiny")
    overrides: dict = _option("override a config field, e.g. --set num_layers=4 --set moe_router_topk=4",
                              default_factory=dict, flag="--set", action="append", type=parse_override, metavar="FIELD=JSON")
    steps: int = _option("optimizer steps", 300)
    micro_batch_size: int = _option("sequences per micro-batch", 4)
    num_microbatches: int = _option("micro-batches per step and data-parallel replica", 2)
    lr: float = _option("peak learning rate (after warm-up, then cosine to --min-lr)", 3e-3)
    min_lr: float = _option("final learning rate", 3e-4)
    warmup_steps: int = _option("linear warm-up steps", 20)
    weight_decay: float = _option("AdamW weight decay (report §4.2)", 0.1)
    adam_betas: tuple[float, float] = _option("AdamW betas (report §4.2)", (0.9, 0.95), metavar=("BETA1", "BETA2"))
    clip_grad: float = _option("gradient clipping norm (report §4.2)", 1.0)
    bf16_moments: bool = _option("AdamW moments in BF16 (report §3.3); master weights stay FP32", False)
    seed: int = _option("seed of the initialisation and the data order", 1234)
    corpus_bytes: int = _option("bytes of stdlib source to train on", 4_000_000)
    data_path: list[str] | None = _option(
        "train on your Megatron indexed datasets instead of the stdlib corpus: PREFIX [PREFIX ...], or a blend WEIGHT "
        "PREFIX [WEIGHT PREFIX ...] (Megatron-LM's --data-path: PREFIX.bin and PREFIX.idx as its tools/preprocess_data.py "
        "writes them); every document trains. Needs --tokenizer", None, nargs="+", type=str, metavar="PREFIX")
    tokenizer: str | None = _option(
        "the HF tokenizer the --data-path data was tokenized with: its tokenizer.json, or the directory holding it "
        "(read by Megatron's HuggingFaceTokenizer); its vocabulary must fit vocab_size", None, metavar="PATH")
    run_dir: Path = _option("metrics, plots, config.json and checkpoints go here", Path("runs/demo"))
    progress: bool = _option("progress bar (on rank 0)", True)
    pipeline_schedule: str = _option("1f1b: no pipelining (--pp 1); dualpipev / dualpipe: pipeline over --pp ranks with two "
                                     "chunks per rank (report §3.2.1)",
                                     registry.DEFAULT, choices=registry.RUNNABLE)
    pipeline_size: int = _option("ranks per pipeline (the rest are data parallel)", 1, flag="--pp")
    expert_parallel_size: int = _option(
        "ranks that split every MoE layer's experts (expert parallelism, report §3.2.2), taken from the data-parallel "
        "ranks: each holds num_moe_experts / EP experts, and tokens reach them through the alltoall dispatcher", 1,
        flag="--ep")
    fb_overlap: bool = _option(
        "overlap DualPipe's FB steps (report §3.2.1): one micro-batch's forward and another's backward take turns at their "
        "expert-parallel all-to-alls, each exchange in flight while the other computes; bit for bit the same training. "
        "Needs --ep > 1 and --pipeline-schedule dualpipev or dualpipe", False)
    emulate_link: LinkSpec | None = _option(
        "time every expert-parallel all-to-all and pipeline send as over a link of GBPS (10^9 bytes per second) and "
        "LATENCY_US microseconds, waiting off the compute thread (megatron_dsv3/overlap/link.py); e.g. 0.05,20", None,
        type=link_flag, metavar="GBPS,LATENCY_US")
    layers_per_stage: list[int] | None = _option("uneven pipeline layout, one layer count per stage, e.g. '[1,2,2,1]'", None)
    save_interval: int = _option("write a checkpoint to RUN_DIR/checkpoints every N steps (0: never)", 0)
    resume: bool = _option("continue from RUN_DIR/checkpoints/latest", False)
    init_from: Path | None = _option(
        "start from these weights (fine-tuning; optimizer, LR schedule and data start fresh): an HF DeepSeek-V3 "
        "directory (converted once into RUN_DIR/init-from-hf) or a dist_checkpointing checkpoint (the converter's "
        "output, a compact-loop or Megatron-LM checkpoint), resharded to this run's layout (training/init_from.py)",
        None, metavar="DIR")
    overwrite: bool = _option("start in a RUN_DIR that holds another run: its files are removed first", False)
    distributed_timeout_minutes: float = _option(
        "a peer that neither answers nor fails (stopped, stuck) ends the job after this long: the process groups' "
        "timeout, pipeline P2P included", 10.0)
    ema_decay: float | None = _option("keep an EMA of the parameters in CPU memory (report §3.2.3)", None)
    eval_interval: int = _option(
        "evaluate the validation split (the embedded corpus's documents held out of training, 2 percent) after every "
        "N steps and after the last: LM loss, perplexity and MTP loss into the step's record, and the EMA weights' with "
        "--ema-decay; forward only through the training schedule (0: never)", 0, metavar="N")
    eval_iters: int = _option(
        "global batches of the validation split per evaluation (each as a step's: micro-batch size x micro-batches x "
        "data-parallel replicas sequences): the split's first ones, the same every time", 1, metavar="N")

    def __post_init__(self):
        for name in ("steps", "micro_batch_size", "num_microbatches", "pipeline_size", "expert_parallel_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be at least 1. Fix: pass a positive value.")
        schedule = registry.get(self.pipeline_schedule, runnable=True)
        if not schedule.ours and self.pipeline_size != 1:
            raise ValueError(
                f"pipeline_size={self.pipeline_size} with pipeline_schedule={self.pipeline_schedule!r}: the compact loop "
                f"pipelines with two chunks per rank only. Fix: pass --pipeline-schedule one of {registry.OURS}, or --pp 1."
            )
        if self.fb_overlap and not schedule.ours:
            raise ValueError(
                f"fb_overlap with pipeline_schedule={self.pipeline_schedule!r}: FB steps are the two-chunk schedules'. "
                f"Fix: pass --pipeline-schedule one of {registry.OURS} (at any --pp, 1 included)."
            )
        if self.layers_per_stage is not None and not schedule.ours:
            raise ValueError(f"layers_per_stage is a pipeline layout. Fix: pass it with --pipeline-schedule one of {registry.OURS}.")
        if self.save_interval < 0:
            raise ValueError(f"save_interval={self.save_interval}: must be >= 0 (0: no checkpoints).")
        if self.eval_interval < 0:
            raise ValueError(f"eval_interval={self.eval_interval}: must be >= 0 (0: no evaluation). Fix: pass e.g. "
                             "--eval-interval 20.")
        if self.eval_interval and self.eval_iters < 1:
            raise ValueError(f"eval_iters={self.eval_iters} with eval_interval={self.eval_interval}: an evaluation runs "
                             "at least one global batch. Fix: pass --eval-iters 1 or more.")
        if self.eval_interval and self.data_path is not None:
            raise ValueError(
                f"eval_interval={self.eval_interval} with --data-path: the compact loop trains on every document of "
                "--data-path data and holds none out for validation (only the embedded corpus has a validation split). "
                "Fix: leave out --eval-interval, or evaluate with Megatron-LM's loop (examples/pretrain_dsv3.py "
                "--data-path ... --split 99,1,0 --eval-interval N)."
            )
        if not 0 <= self.warmup_steps < self.steps:
            raise ValueError(f"warmup_steps={self.warmup_steps}: must be in [0, steps={self.steps}). Fix: shorten the warm-up.")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"min_lr={self.min_lr}: must be in [0, lr={self.lr}]. Fix: lower min_lr.")
        if self.resume and self.overwrite:
            raise ValueError("resume and overwrite: one continues the run in RUN_DIR, the other replaces it. Fix: pass one.")
        if not self.distributed_timeout_minutes > 0:
            raise ValueError(f"distributed_timeout_minutes={self.distributed_timeout_minutes}: must be positive. "
                             "Fix: pass e.g. --distributed-timeout-minutes 10.")

    @property
    def schedule(self) -> registry.PipelineSchedule:
        return registry.SCHEDULES[self.pipeline_schedule]

    @property
    def pipelined(self) -> bool:
        """Two chunks per rank, run by our executor (at any pipeline size, 1 included)."""
        return self.schedule.ours


def decay_param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only; norms' scales and biases are not decayed."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay, "wd_mult": 1.0},
        {"params": no_decay, "weight_decay": 0.0, "wd_mult": 0.0},
    ]


def clip_grad_norm_(params: list[torch.nn.Parameter], max_norm: float, norm_params=None) -> float:
    """Clip every gradient of `params` to a total L2 norm of `max_norm`; returns the norm before.

    Megatron's `get_grad_norm_fp32` and `clip_grad_by_total_norm_fp32` (optimizer/clip_grads.py),
    grouped as its ChainedOptimizer groups them for a model with experts: the norm of the dense
    gradients over the model-parallel group (each pipeline stage's once; data-parallel copies are
    equal), that of the expert gradients over the expert x pipeline group (each rank holds other
    experts), and the total their root sum of squares. `norm_params` (default: `params`) are the
    parameters counted: DualPipe's mirrored stage once (pipeline/layout.py marks it `shared`)."""
    counted = [p for p in (params if norm_params is None else norm_params) if p.grad is not None]
    dense = [p.grad for p in counted if getattr(p, "allreduce", True)]  # Megatron marks experts allreduce=False
    experts = [p.grad for p in counted if not getattr(p, "allreduce", True)]
    with cpu.cuda_on_cpu():  # clip_grads makes its sums on "cuda" and asserts CUDA gradients
        squares = float(get_grad_norm_fp32(dense, grad_stats_parallel_group=parallel_state.get_model_parallel_group())) ** 2
        squares += float(get_grad_norm_fp32(
            experts, grad_stats_parallel_group=parallel_state.get_expert_tensor_model_pipeline_parallel_group())) ** 2
        total = math.sqrt(squares)
        clip_grad_by_total_norm_fp32(params, max_norm, total)
    return total


def infinite(loader):
    while True:
        yield from loader


def build_model_chunks(config, args: TrainArgs) -> list[torch.nn.Module]:
    """This rank's model chunks, unwrapped: the whole model, or the schedule's two chunks. Both
    start as the single-process model does (pipeline/layout.py), expert parallelism included."""
    if not args.pipelined:
        rng_before_model = torch.get_rng_state()
        model = gpt_model(config)
        if config.expert_model_parallel_size > 1:
            layout.copy_single_process_init([model], config, [0], rng_before_model)
        return [model]
    return args.schedule.build_chunks(config, parallel_state.get_pipeline_model_parallel_rank(), args.pipeline_size, args.layers_per_stage)


def _model_config(args: TrainArgs):
    """The model config of the run, with every rule the loop adds checked before any work."""
    overrides = dict(args.overrides)
    if args.pipeline_size > 1:
        overrides.update(pipeline_model_parallel_size=args.pipeline_size, pipeline_dtype=torch.float32)
    if args.expert_parallel_size > 1:
        overrides.update(expert_model_parallel_size=args.expert_parallel_size)
    if args.fb_overlap:
        overrides.update(fb_overlap=True)
    config = preset(args.preset, **overrides)
    if config.bf16 or config.fp16 or config.params_dtype != torch.float32:
        raise ConfigError(
            "params_dtype", config.params_dtype,
            "the compact loop keeps FP32 master weights and has no mixed-precision wrapper (Float16Module)",
            "train with params_dtype=float32, bf16=False (use --bf16-moments for BF16 optimizer state, "
            "fp8_blockwise for FP8 GEMMs)",
        )
    check_user_data(args.data_path, args.tokenizer, config.vocab_size)  # the data and its tokenizer against vocab_size
    if config.pipeline_model_parallel_size != args.pipeline_size:
        raise ValueError(
            f"pipeline_model_parallel_size={config.pipeline_model_parallel_size} in the overrides, pipeline_size="
            f"{args.pipeline_size}. Fix: set the pipeline size with --pp only."
        )
    if config.expert_model_parallel_size != args.expert_parallel_size:
        raise ValueError(
            f"expert_model_parallel_size={config.expert_model_parallel_size} in the overrides, expert_parallel_size="
            f"{args.expert_parallel_size}. Fix: set the expert-parallel size with --ep only."
        )
    if args.expert_parallel_size > 1 and config.moe_token_dispatcher_type != "alltoall":
        raise ConfigError(
            "moe_token_dispatcher_type", config.moe_token_dispatcher_type,
            f"expert_parallel_size={args.expert_parallel_size}: the compact loop sends tokens to other ranks' experts "
            "with the alltoall dispatcher (megatron_dsv3/overlap/dispatch.py)",
            "pass --set moe_token_dispatcher_type='\"alltoall\"'",
        )
    for name in ("tensor_model_parallel_size", "context_parallel_size"):
        if getattr(config, name) != 1:
            raise ValueError(
                f"{name}={getattr(config, name)}: the compact loop runs data, pipeline and expert parallelism only. "
                f"Fix: set {name}=1, or launch examples/pretrain_dsv3.py through Megatron-LM."
            )
    if args.pipelined:
        layout.check_layers_per_stage(config.num_layers, args.schedule.num_stages(args.pipeline_size), args.layers_per_stage)
        check_deferrable(config)
    return config


def _run_settings(args: TrainArgs, config, dp_size: int) -> dict:
    """What a resumed run must share with the run that saved (checkpoint.load checks it, field by
    field, before loading anything): the model (the preset and every --set override: together
    they are the resolved config), the batch and the layout, the data, and the optimizer and its
    schedule (a resume continues the saved run; it changes none of them)."""
    return {
        "preset": args.preset, "overrides": dict(sorted(args.overrides.items())),
        "micro_batch_size": args.micro_batch_size, "num_microbatches": args.num_microbatches,
        "data_parallel_size": dp_size, "pipeline_schedule": args.pipeline_schedule, "pipeline_size": args.pipeline_size,
        "expert_parallel_size": args.expert_parallel_size, "layers_per_stage": args.layers_per_stage,
        "seq_length": config.seq_length, "steps": args.steps, "seed": args.seed, "corpus_bytes": args.corpus_bytes,
        "data_path": args.data_path, "tokenizer": args.tokenizer,
        "lr": args.lr, "min_lr": args.min_lr, "warmup_steps": args.warmup_steps, "weight_decay": args.weight_decay,
        "adam_betas": tuple(args.adam_betas), "clip_grad": args.clip_grad, "bf16_moments": args.bf16_moments,
        "ema_decay": args.ema_decay, "init_from": None if args.init_from is None else str(args.init_from),
    }


def _check_run_dir(run_dir: Path, args: TrainArgs) -> None:
    """A run directory holds one run: another's metrics, config and checkpoints are continued
    (--resume) or replaced (--overwrite), never mixed with a new run's."""
    held = sorted(path.name for path in run_dir.iterdir()) if run_dir.is_dir() else []
    if held and not (args.resume or args.overwrite):
        listing = ", ".join(held[:4]) + (", ..." if len(held) > 4 else "")
        raise ValueError(
            f"{run_dir} holds another run ({listing}). Fix: pass --resume to continue it, --overwrite to replace it, "
            "or choose a new --run-dir."
        )


@dataclass
class _Run:
    """What `_build` makes and the rest of `train` uses."""

    config: DeepSeekV3Config
    chunks: list  # this rank's DDP-wrapped chunks
    forward_backward: Callable[..., list]  # the schedule's forward_backward_func
    params: list  # every trainable parameter of this rank, once
    norm_params: list  # those counted in the gradient norm (DualPipe: a stage's mirror once)
    optimizer: torch.optim.Optimizer
    scheduler: OptimizerParamScheduler
    ema: ParameterEMA | None
    state: checkpoint.TrainingState


def train(args: TrainArgs) -> dict | None:
    """Train; returns the summary on global rank 0 (None on the other ranks)."""
    config = _model_config(args)
    init_source = None if args.resume else init_from.resolve(args.init_from, config)  # a resume has its weights
    run_dir = Path(args.run_dir)
    checkpoints = run_dir / "checkpoints"
    _check_run_dir(run_dir, args)
    init_distributed(args.pipeline_size, get_embedding_ranks=args.schedule.get_embedding_ranks,
                     timeout=datetime.timedelta(minutes=args.distributed_timeout_minutes),
                     expert_model_parallel_size=args.expert_parallel_size)
    cpu.enable(config)
    link.emulate(args.emulate_link)
    seed_everything(args.seed)
    is_logger = torch.distributed.get_rank() == 0
    if args.overwrite and is_logger and run_dir.exists():
        shutil.rmtree(run_dir)
    torch.distributed.barrier()  # every rank sees the directory after rank 0 cleared it
    run_dir.mkdir(parents=True, exist_ok=True)

    dp_size = parallel_state.get_data_parallel_world_size()
    global_batch = args.micro_batch_size * args.num_microbatches * dp_size
    tokens_per_step = global_batch * config.seq_length
    train_set, valid_set = _datasets(args, config, run_dir, global_batch)  # the split's size checked before the model
    validation = _validation_batches(args, valid_set, global_batch, dp_size) if args.eval_interval else None
    run = _build(config, args, init_source)
    run_settings = _run_settings(args, config, dp_size)
    first_step = 1
    if args.resume:
        first_step = checkpoint.load(checkpoints, run.state, run_settings)["step"] + 1
    data_iterator = _data(args, train_set, first_step, global_batch, dp_size)

    log = MetricsLog(run_dir, keep_steps_up_to=first_step - 1) if is_logger else None
    if is_logger:
        resolved = {f.name: repr(getattr(config, f.name)) for f in dataclasses.fields(config)}
        (run_dir / "config.json").write_text(json.dumps(
            {"train": {k: str(v) for k, v in dataclasses.asdict(args).items()}, "model": resolved}, indent=2
        ))
    # Process-global, and sized by the first model that logs (the MoE tracker's clear() keeps its
    # entries): fresh ones, so that this run's model sizes them (train() may run more than once).
    MTPLossLoggingHelper.tracker.clear()
    set_moe_metrics_tracker(MoEMetricsTracker())
    bar = tqdm(range(first_step, args.steps + 1), desc=f"train {args.preset}", initial=first_step - 1, total=args.steps,
               disable=not (args.progress and is_logger), dynamic_ncols=True)
    timeline = None
    for step in bar:
        config.apply_token_schedules(consumed_tokens=(step - 1) * tokens_per_step, total_tokens=args.steps * tokens_per_step)
        if step == args.steps and args.pipelined:  # the last step's timeline is plotted
            timeline = TimelineRecorder()
        record = {"step": step, **_train_step(run, args, data_iterator, timeline, step)}
        if validation is not None and (step % args.eval_interval == 0 or step == args.steps):
            record.update(_validate(run, args, validation))
        if is_logger:
            log.write(record)
            bar.set_postfix(lm=f"{record['lm_loss']:.3f}", mtp=f"{record.get('mtp_loss', 0):.3f}", maxvio=f"{record['max_violation'] or 0:.3f}")
        if args.save_interval and step % args.save_interval == 0:
            checkpoint.save(checkpoints, run.state, {"step": step, "consumed_samples": step * global_batch,
                                                     "consumed_tokens": step * tokens_per_step}, run_settings)
    bar.close()
    if run.ema is not None:
        run.ema.wait()
    gathered = timeline.timeline(parallel_state.get_pipeline_model_parallel_group()) if timeline is not None else None
    if not is_logger:
        return None
    log.close()
    return _finish(args, run_dir, log.records, gathered)


def _build(config, args: TrainArgs, init_source: init_from.Source | None) -> _Run:
    """This rank's chunks (with the --init-from weights) under Megatron DDP, AdamW, the LR schedule
    and the EMA."""
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    unwrapped = build_model_chunks(config, args)
    if init_source is not None:
        init_from.load_weights(init_source, unwrapped, config, Path(args.run_dir), args.preset, args.overrides)
    chunks = [
        DistributedDataParallel(config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), chunk.to(device))
        for chunk in unwrapped
    ]
    config.no_sync_func = [chunk.no_sync for chunk in chunks] if len(chunks) > 1 else chunks[0].no_sync
    config.finalize_model_grads_func = finalize_model_grads_with_load
    forward_backward = args.schedule.forward_backward_func if args.pipelined else forward_backward_no_pipelining

    params = [p for chunk in chunks for p in chunk.parameters() if p.requires_grad]  # each once: see layout.py
    norm_params = [p for p in params if param_is_not_shared(p)]  # DualPipe: a stage's mirror counts once
    param_groups = decay_param_groups(torch.nn.ModuleList(chunks), args.weight_decay)
    if args.bf16_moments:
        optimizer = AdamWLowPrecisionMoments(param_groups, lr=args.lr, betas=args.adam_betas, moments_dtype=torch.bfloat16)
    else:
        optimizer = torch.optim.AdamW(param_groups, lr=args.lr, betas=args.adam_betas)
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=args.lr,
        min_lr=args.min_lr,
        lr_warmup_steps=args.warmup_steps,
        lr_decay_steps=args.steps,
        lr_decay_style="cosine",
        start_wd=args.weight_decay,
        end_wd=args.weight_decay,
        wd_incr_steps=args.steps,
        wd_incr_style="constant",
    )
    ema_names = named_trainable_parameters([chunk.module for chunk in chunks])
    ema = ParameterEMA(ema_names, args.ema_decay, optimizer=optimizer) if args.ema_decay is not None else None
    state = checkpoint.TrainingState(chunks, optimizer, scheduler, ema, ema_names)
    return _Run(config, chunks, forward_backward, params, norm_params, optimizer, scheduler, ema, state)


def _datasets(args: TrainArgs, config, run_dir: Path, global_batch: int):
    """The training split, and the validation split (None without --eval-interval). The data:
    the embedded corpus, or --data-path with its --tokenizer (checked by _model_config before
    any work; the tokenizer is loaded once). An evaluation must fit in one pass over the
    validation split (Megatron's GPTDataset would repeat its documents to fill the request)."""
    cache_dir = run_dir.parent / ".corpus-cache"
    blend, tokenizer = check_user_data(args.data_path, args.tokenizer, config.vocab_size)
    if blend is not None:  # TrainArgs refuses --eval-interval with it
        return build_user_dataset(cache_dir, config.seq_length, args.steps * global_batch, args.seed, blend, tokenizer), None
    valid_samples = args.eval_iters * global_batch if args.eval_interval else global_batch
    train_set, valid_set = build_datasets(cache_dir, config.seq_length, args.steps * global_batch, valid_samples, args.seed,
                                          args.corpus_bytes)
    if not args.eval_interval:
        return train_set, None
    # the samples of one epoch: GPTDataset's count (its sample index), from the split's documents
    tokens = int(valid_set.dataset.sequence_lengths[valid_set.indices].sum())
    holds = (tokens - valid_set.config.add_extra_token_to_sequence) // config.seq_length
    if valid_samples > holds:
        fix = (f"lower --eval-iters to {holds // global_batch} or less" if holds >= global_batch
               else "lower --micro-batch-size or --num-microbatches")
        raise ValueError(
            f"eval_iters={args.eval_iters}: {args.eval_iters} global batches of {global_batch} sequences are {valid_samples} "
            f"validation sequences of seq_length {config.seq_length}, and the validation split (the corpus's held-out "
            f"{len(valid_set.indices)} document(s), {tokens} tokens) holds {holds}. Fix: {fix}, or raise --corpus-bytes."
        )
    return train_set, valid_set


def _validation_batches(args: TrainArgs, valid_set, global_batch: int, dp_size: int) -> list[list[dict]]:
    """This replica's share of the validation split's first eval_iters x global batch samples, as
    eval_iters lists of num_microbatches micro-batches: replica r of D reads samples r, r + D, ...,
    as the training loader does. Read once, so each evaluation runs the same batches."""
    first = torch.utils.data.Subset(valid_set, range(args.eval_iters * global_batch))
    sampler = torch.utils.data.DistributedSampler(first, num_replicas=dp_size, rank=parallel_state.get_data_parallel_rank(), shuffle=False)
    loader = torch.utils.data.DataLoader(first, batch_size=args.micro_batch_size, sampler=sampler,
                                         generator=torch.Generator().manual_seed(args.seed))  # not the global RNG
    microbatches = list(loader)
    m = args.num_microbatches
    return [microbatches[i * m:(i + 1) * m] for i in range(args.eval_iters)]


def _data(args: TrainArgs, train_set, first_step: int, global_batch: int, dp_size: int):
    """This replica's micro-batches from `first_step` on. The data order is fixed by the seed: a
    resumed run starts after the samples the saved steps consumed. The loader draws from its
    own generator, not the restored global RNG."""
    unconsumed = torch.utils.data.Subset(train_set, range((first_step - 1) * global_batch, len(train_set)))
    sampler = torch.utils.data.DistributedSampler(
        unconsumed, num_replicas=dp_size, rank=parallel_state.get_data_parallel_rank(), shuffle=False
    )
    loader = torch.utils.data.DataLoader(
        unconsumed, batch_size=args.micro_batch_size, sampler=sampler, generator=torch.Generator().manual_seed(args.seed)
    )
    return infinite(loader)


def _train_step(run: _Run, args: TrainArgs, data_iterator, timeline: TimelineRecorder | None, step: int) -> dict:
    """One global batch: forward and backward, clip, AdamW, LR, EMA; the step's metrics. A
    non-finite gradient norm stops the run before the optimizer step (every rank sees the same
    all-reduced norm, so all stop)."""
    for chunk in run.chunks:
        chunk.zero_grad_buffer()
    run.optimizer.zero_grad(set_to_none=True)
    recording = {"timeline": timeline} if timeline is not None else {}
    losses = run.forward_backward(
        forward_step_func=forward_step,
        data_iterator=data_iterator,
        model=run.chunks,
        num_microbatches=args.num_microbatches,
        seq_length=run.config.seq_length,
        micro_batch_size=args.micro_batch_size,
        **recording,
    )
    for p in run.params:  # Megatron DDP accumulates into main_grad
        p.grad = p.main_grad
    grad_norm = clip_grad_norm_(run.params, args.clip_grad, run.norm_params)
    if not math.isfinite(grad_norm):
        raise FloatingPointError(
            f"step {step}: the gradient norm is {grad_norm}; {_first_non_finite_gradient(run.chunks)}. The run stops "
            "before the optimizer step (nothing of this step is saved). Fix: lower --lr, or check the data and the "
            "--set overrides."
        )
    run.optimizer.step()
    run.scheduler.step(1)
    if run.ema is not None:
        run.ema.update()
    return {
        "lr": run.optimizer.param_groups[0]["lr"],
        "gamma": run.config.moe_router_bias_update_rate,
        "mtp_lambda": run.config.mtp_loss_scaling_factor,
        "grad_norm": grad_norm,
        **step_metrics(losses, run.config, run.chunks, args.num_microbatches, parallel_state.get_pipeline_model_parallel_group(),
                       parallel_state.get_data_parallel_group()),
    }


def _validate(run: _Run, args: TrainArgs, batches: list[list[dict]]) -> dict:
    """The validation fields of the step's record (module note): the training weights', then the
    EMA weights' when the run keeps an EMA."""
    fields = {f"val_{key}": value for key, value in _evaluate(run, args, batches).items()}
    if run.ema is not None:
        with run.ema.swapped_in():
            fields.update({f"ema_val_{key}": value for key, value in _evaluate(run, args, batches).items()})
    return fields


def _evaluate(run: _Run, args: TrainArgs, batches: list[list[dict]]) -> dict:
    """LM loss, perplexity and MTP loss of the model as it is over `batches`, forward only
    through the training schedule; changes no state of the run (module note)."""
    rng_states = torch.get_rng_state(), tensor_parallel.get_cuda_rng_tracker().get_states()
    cuda_rng_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    for chunk in run.chunks:
        chunk.eval()
        chunk.module.training = True  # the GPTModel's own flag only: it logs the MTP loss (module note)
    losses = []
    try:
        with torch.no_grad():
            for microbatches in batches:
                losses += run.forward_backward(
                    forward_step_func=forward_step,
                    data_iterator=iter(microbatches),
                    model=run.chunks,
                    num_microbatches=args.num_microbatches,
                    seq_length=run.config.seq_length,
                    micro_batch_size=args.micro_batch_size,
                    forward_only=True,
                )
    finally:
        for chunk in run.chunks:
            chunk.train()
        torch.set_rng_state(rng_states[0])
        tensor_parallel.get_cuda_rng_tracker().set_states(rng_states[1])
        if cuda_rng_states is not None:
            torch.cuda.set_rng_state_all(cuda_rng_states)
    return validation_metrics(losses, run.config, args.num_microbatches * len(batches),
                              parallel_state.get_pipeline_model_parallel_group(), parallel_state.get_data_parallel_group())


def _first_non_finite_gradient(chunks) -> str:
    for index, chunk in enumerate(chunks):
        for name, param in chunk.module.named_parameters():
            if param.requires_grad and not torch.isfinite(param.main_grad).all():
                return f"the first non-finite gradient on this rank, in parameter order, is {name} (chunk {index})"
    return "every gradient on this rank is finite (another rank's is not)"


def _finish(args: TrainArgs, run_dir: Path, records: list[dict], timeline) -> dict:
    """Rank 0: the plots and the summary."""
    plot_losses(records, run_dir / "loss.png")
    plot_expert_load(records, run_dir / "expert_load.png")
    if timeline is not None:
        plot_timeline(timeline, run_dir / "pipeline_timeline.png",
                      title=f"{args.pipeline_schedule}, P={args.pipeline_size}, step {args.steps}: measured, bubble "
                            f"{timeline.bubble():.2f} s of {timeline.makespan():.2f} s")
    return summarize(records)
