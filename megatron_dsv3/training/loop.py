"""A compact training loop for DeepSeek-V3-style Megatron models, on CPU now and GPU later.

One process, or several under `torchrun`: data parallel, and pipelined with DualPipeV or
DualPipe (`pipeline_schedule`, `pipeline_size`; each rank then holds two chunks built by
`pipeline.layout`). Per step it applies the gamma and lambda token schedules, runs the
forward/backward schedule over the micro-batches (Megatron's `finalize_model_grads` then
syncs gradients and moves the expert biases), clips the gradient at 1.0, steps AdamW
(PAPER.md §7 betas and weight decay) with warm-up plus cosine LR, folds the parameters into
the CPU EMA when one is kept (PAPER.md §6), and logs LM loss, MTP loss, the sequence-wise
balance loss, each MoE layer's tokens per expert and MaxVio to `metrics.jsonl` (and
TensorBoard when installed). Every `save_interval` steps it writes a resumable checkpoint
(training/checkpoint.py); `resume` continues from the newest one, bit-identically on CPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import socket
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy
import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker, get_moe_layer_wise_logging_tracker
from megatron.core.transformer.module import param_is_not_shared
from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper
from tqdm import tqdm

from megatron_dsv3 import cpu
from megatron_dsv3.config import ConfigError, check_runtime, moe_layer_pattern, preset
from megatron_dsv3.pipeline import layout
from megatron_dsv3.pipeline.dualpipe import record_timeline
from megatron_dsv3.pipeline.install import EXECUTORS
from megatron_dsv3.pipeline.no_pipelining import forward_backward_no_pipelining
from megatron_dsv3.pipeline.simulate import plot_timeline
from megatron_dsv3.routing import expert_load, finalize_model_grads_with_load
from megatron_dsv3.specs import gpt_model
from megatron_dsv3.training import checkpoint
from megatron_dsv3.training.data import build_datasets
from megatron_dsv3.training.ema import ParameterEMA, named_trainable_parameters
from megatron_dsv3.training.monitor import MetricsLog, plot_expert_load, plot_losses
from megatron_dsv3.training.optimizer import AdamWLowPrecisionMoments

PIPELINE_SCHEDULES = ("none", *EXECUTORS)


@dataclass
class TrainArgs:
    preset: str = "tiny"
    overrides: dict = field(default_factory=dict)  # DeepSeekV3Config fields
    steps: int = 300
    micro_batch_size: int = 4
    num_microbatches: int = 2
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 20
    weight_decay: float = 0.1  # PAPER.md §7
    adam_betas: tuple[float, float] = (0.9, 0.95)  # PAPER.md §7
    clip_grad: float = 1.0  # PAPER.md §7
    bf16_moments: bool = False  # PAPER.md §5: AdamW moments in BF16, master weights FP32
    seed: int = 1234
    corpus_bytes: int = 4_000_000
    run_dir: Path = Path("runs/demo")
    progress: bool = True
    pipeline_schedule: str = "none"  # "dualpipev" or "dualpipe": two chunks per rank (pipeline.layout)
    pipeline_size: int = 1  # ranks per pipeline; the rest of the world is data parallel
    layers_per_stage: list[int] | None = None  # an uneven stage layout (pipeline.layout)
    save_interval: int = 0  # steps between checkpoints; 0: none
    resume: bool = False  # continue from <run_dir>/checkpoints/latest
    ema_decay: float | None = None  # keep a CPU EMA of the parameters (PAPER.md §6)

    def __post_init__(self):
        for name in ("steps", "micro_batch_size", "num_microbatches", "pipeline_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be at least 1. Fix: pass a positive value.")
        if self.pipeline_schedule not in PIPELINE_SCHEDULES:
            raise ValueError(f"pipeline_schedule={self.pipeline_schedule!r}: allowed {PIPELINE_SCHEDULES}.")
        if self.pipeline_schedule == "none" and self.pipeline_size != 1:
            raise ValueError(
                f"pipeline_size={self.pipeline_size} with pipeline_schedule='none'. Fix: pass --pipeline-schedule dualpipev "
                "(or dualpipe), or --pp 1."
            )
        if self.layers_per_stage is not None and self.pipeline_schedule == "none":
            raise ValueError("layers_per_stage is a pipeline layout. Fix: pass it with --pipeline-schedule.")
        if self.save_interval < 0:
            raise ValueError(f"save_interval={self.save_interval}: must be >= 0 (0: no checkpoints).")
        if not 0 <= self.warmup_steps < self.steps:
            raise ValueError(f"warmup_steps={self.warmup_steps}: must be in [0, steps={self.steps}). Fix: shorten the warm-up.")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"min_lr={self.min_lr}: must be in [0, lr={self.lr}]. Fix: lower min_lr.")


def init_distributed(pipeline_size: int = 1, two_chunk_layout: bool = False) -> None:
    """Join torchrun's process group, or make a one-process gloo group; then Megatron's groups
    (with a two-chunk layout, the embedding group is pipeline rank 0 alone: pipeline/layout.py)."""
    if not torch.distributed.is_initialized():
        if "RANK" not in os.environ:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1")
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
    if not parallel_state.model_parallel_is_initialized():
        world = torch.distributed.get_world_size()
        if world % pipeline_size:
            raise ValueError(
                f"pipeline_size={pipeline_size} does not divide the {world} processes. Fix: launch a multiple of "
                f"{pipeline_size} processes (torchrun --nproc-per-node), or change --pp."
            )
        parallel_state.initialize_model_parallel(
            pipeline_model_parallel_size=pipeline_size,
            get_embedding_ranks=layout.dualpipev_embedding_ranks if two_chunk_layout else None,
        )


def seed_everything(seed: int) -> None:
    random.seed(seed)
    numpy.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        tensor_parallel.model_parallel_cuda_manual_seed(seed)


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


def clip_grad_norm_(params: list[torch.nn.Parameter], max_norm: float, group, norm_params=None) -> float:
    """Total L2 norm of `norm_params` (default: `params`; disjoint across `group`'s ranks, so
    each parameter counts once) over `group`, then scale every gradient of `params` to max_norm."""
    norm_grads = [p.grad for p in (params if norm_params is None else norm_params) if p.grad is not None]
    squares = torch.stack([g.detach().float().pow(2).sum() for g in norm_grads]).sum()
    torch.distributed.all_reduce(squares, group=group)
    total = float(squares.sqrt())
    if total > max_norm:
        for g in (p.grad for p in params if p.grad is not None):
            g.mul_(max_norm / (total + 1e-6))
    return total


def loss_func(loss_mask: torch.Tensor, per_token_loss: torch.Tensor):
    """Megatron's 3-tuple contract: (sum of losses, token count, values to report)."""
    mask = loss_mask.float()
    loss_sum = (per_token_loss.float() * mask).sum()
    num_tokens = mask.sum().to(torch.int)
    return loss_sum, num_tokens, {"lm loss": torch.stack([loss_sum.detach(), mask.sum()])}


def forward_step(data_iterator, model):
    batch = next(data_iterator)
    device = next(model.parameters()).device
    tokens, labels, loss_mask, position_ids = (
        batch[k].to(device) for k in ("tokens", "labels", "loss_mask", "position_ids")
    )
    per_token_loss = model(tokens, position_ids, None, labels=labels, loss_mask=loss_mask)
    return per_token_loss, partial(loss_func, loss_mask)


def infinite(loader):
    while True:
        yield from loader


def _local_step_sums(losses: list[dict], model_chunks) -> dict:
    """This rank's share of the step's metrics: the loss dicts it returned (rank P-1 of a
    pipeline), the MTP and sequence-balance losses its layers tracked, its layers' loads."""
    sums = {}
    if losses:
        lm = torch.stack([d["lm loss"] for d in losses]).sum(dim=0)
        sums["lm"] = (float(lm[0]), float(lm[1]))
    tracker = MTPLossLoggingHelper.tracker
    if "loss_values" in tracker:  # one mean loss per micro-batch and depth, accumulated
        sums["mtp"] = float(tracker["loss_values"].sum())
        MTPLossLoggingHelper.clean_metrics_in_tracker()
    moe = get_moe_layer_wise_logging_tracker()
    if "seq_load_balancing_loss" in moe:  # sum_i f_i P_i per layer and micro-batch
        sums["seq_balance"] = float(moe["seq_load_balancing_loss"]["values"].sum())
    clear_aux_losses_tracker()
    sums["loads"] = {l.name: {"tokens_per_expert": l.tokens_per_expert, "max_violation": l.max_violation} for l in expert_load(model_chunks)}
    return sums


def _layer_order(name: str) -> tuple[int, int]:
    kind, number = name.split(".")
    return (kind == "mtp", int(number))


def step_metrics(losses: list[dict], config, model_chunks, num_microbatches: int, pipeline_group=None, data_parallel_group=None) -> dict:
    """LM, MTP and sequence-balance losses of the step just run, and each MoE layer's load:
    gathered over the pipeline, and the losses summed over data-parallel replicas
    (collectives on the groups given). Loads are already global (routing.py). DualPipe's
    mirrored layers report the same load twice: one is kept."""
    local = _local_step_sums(losses, model_chunks)
    parts = [local]
    if pipeline_group is not None and pipeline_group.size() > 1:
        parts = [None] * pipeline_group.size()
        torch.distributed.all_gather_object(parts, local, group=pipeline_group)
    lm_sum, lm_tokens = next(part["lm"] for part in parts if "lm" in part)
    sums = torch.tensor([lm_sum, lm_tokens, sum(part.get("mtp", 0.0) for part in parts), sum(part.get("seq_balance", 0.0) for part in parts)],
                        dtype=torch.float64)
    replicas = 1
    if data_parallel_group is not None and data_parallel_group.size() > 1:
        torch.distributed.all_reduce(sums, group=data_parallel_group)
        replicas = data_parallel_group.size()
    microbatches = num_microbatches * replicas
    record = {"lm_loss": float(sums[0] / sums[1])}
    if any("mtp" in part for part in parts):
        record["mtp_loss"] = float(sums[2]) / (microbatches * config.mtp_num_layers)
    if any("seq_balance" in part for part in parts):
        # report alpha * the mean over layers and micro-batches
        moe_layers = sum(moe_layer_pattern(config)) + (config.mtp_num_layers or 0)
        record["seq_balance_loss"] = float(sums[3]) / microbatches / moe_layers * config.moe_aux_loss_coeff
    loads = {}
    for part in parts:
        loads.update(part["loads"])
    record["expert_load"] = {name: loads[name] for name in sorted(loads, key=_layer_order)}
    values = [load["max_violation"] for load in loads.values()]
    record["max_violation"] = sum(values) / len(values) if values else None
    return record


def build_model_chunks(config, args: TrainArgs) -> list[torch.nn.Module]:
    """This rank's model chunks, unwrapped: the whole model, or its two pipeline chunks."""
    if args.pipeline_schedule == "none":
        return [gpt_model(config)]
    build = {"dualpipev": layout.dualpipev_chunks, "dualpipe": layout.dualpipe_chunks}[args.pipeline_schedule]
    return build(config, parallel_state.get_pipeline_model_parallel_rank(), args.pipeline_size, args.layers_per_stage)


def _model_config(args: TrainArgs):
    overrides = dict(args.overrides)
    if args.pipeline_size > 1:
        overrides.update(pipeline_model_parallel_size=args.pipeline_size, pipeline_dtype=torch.float32)
    config = preset(args.preset, **overrides)
    if config.bf16 or config.fp16 or config.params_dtype != torch.float32:
        raise ConfigError(
            "params_dtype", config.params_dtype,
            "the compact loop keeps FP32 master weights and has no mixed-precision wrapper (Float16Module)",
            "train with params_dtype=float32, bf16=False (use --bf16-moments for BF16 optimizer state, "
            "fp8_blockwise for FP8 GEMMs)",
        )
    if config.pipeline_model_parallel_size != args.pipeline_size:
        raise ValueError(
            f"pipeline_model_parallel_size={config.pipeline_model_parallel_size} in the overrides, pipeline_size="
            f"{args.pipeline_size}. Fix: set the pipeline size with --pp only."
        )
    for name in ("tensor_model_parallel_size", "expert_model_parallel_size", "context_parallel_size"):
        if getattr(config, name) != 1:
            raise ValueError(
                f"{name}={getattr(config, name)}: the compact loop runs data and pipeline parallelism only. "
                f"Fix: set {name}=1, or launch examples/pretrain_dsv3.py through Megatron-LM."
            )
    if args.pipeline_schedule != "none":
        stages = layout.chunk_stages(args.pipeline_schedule, 0, args.pipeline_size)[1]
        layout.check_layers_per_stage(config.num_layers, stages, args.layers_per_stage)
    return config


def _run_settings(args: TrainArgs, config, dp_size: int) -> dict:
    """What a resumed run must share with the run that saved (checkpoint.load checks it)."""
    return {
        "preset": args.preset, "micro_batch_size": args.micro_batch_size, "num_microbatches": args.num_microbatches,
        "data_parallel_size": dp_size, "pipeline_schedule": args.pipeline_schedule, "pipeline_size": args.pipeline_size,
        "seq_length": config.seq_length, "steps": args.steps, "seed": args.seed, "corpus_bytes": args.corpus_bytes,
    }


def train(args: TrainArgs) -> dict | None:
    """Train; returns the summary on global rank 0 (None on the other ranks)."""
    config = _model_config(args)
    init_distributed(args.pipeline_size, two_chunk_layout=args.pipeline_schedule != "none")
    on_cpu = cpu.enable(config)
    if not on_cpu:
        check_runtime(config, "cuda")
    seed_everything(args.seed)
    device = torch.device("cuda", torch.cuda.current_device()) if not on_cpu else torch.device("cpu")
    is_logger = torch.distributed.get_rank() == 0
    run_dir = Path(args.run_dir)
    checkpoints = run_dir / "checkpoints"
    if args.save_interval and not args.resume and checkpoint.latest_step(checkpoints) is not None:
        raise ValueError(
            f"{checkpoints} already holds step {checkpoint.latest_step(checkpoints)}. Fix: pass --resume to continue "
            "that run, or choose a new --run-dir."
        )
    run_dir.mkdir(parents=True, exist_ok=True)

    chunks = [
        DistributedDataParallel(config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), chunk.to(device))
        for chunk in build_model_chunks(config, args)
    ]
    config.no_sync_func = [chunk.no_sync for chunk in chunks] if len(chunks) > 1 else chunks[0].no_sync
    config.finalize_model_grads_func = finalize_model_grads_with_load
    forward_backward = forward_backward_no_pipelining if args.pipeline_schedule == "none" else EXECUTORS[args.pipeline_schedule]

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

    dp_size = parallel_state.get_data_parallel_world_size()
    global_batch = args.micro_batch_size * args.num_microbatches * dp_size
    tokens_per_step = global_batch * config.seq_length
    total_tokens = args.steps * tokens_per_step
    run_settings = _run_settings(args, config, dp_size)

    first_step = 1
    if args.resume:
        progress = checkpoint.load(checkpoints, state, run_settings)
        first_step = progress["step"] + 1

    # The data order is fixed by the seed: a resumed run starts after the samples the saved
    # steps consumed. The loader draws from its own generator, not the restored global RNG.
    train_set, _ = build_datasets(
        run_dir.parent / ".corpus-cache", config.seq_length, args.steps * global_batch, global_batch, args.seed, args.corpus_bytes
    )
    unconsumed = torch.utils.data.Subset(train_set, range((first_step - 1) * global_batch, len(train_set)))
    sampler = torch.utils.data.DistributedSampler(
        unconsumed, num_replicas=dp_size, rank=parallel_state.get_data_parallel_rank(), shuffle=False
    )
    loader = torch.utils.data.DataLoader(
        unconsumed, batch_size=args.micro_batch_size, sampler=sampler, generator=torch.Generator().manual_seed(args.seed)
    )
    data_iterator = infinite(loader)

    log = MetricsLog(run_dir, keep_steps_up_to=first_step - 1) if is_logger else None
    if is_logger:
        resolved = {f.name: repr(getattr(config, f.name)) for f in dataclasses.fields(config)}
        (run_dir / "config.json").write_text(json.dumps(
            {"train": {k: str(v) for k, v in dataclasses.asdict(args).items()}, "model": resolved}, indent=2
        ))
    pipeline_group = parallel_state.get_pipeline_model_parallel_group()
    MTPLossLoggingHelper.tracker.clear()  # process-global and sized by the first model that logs
    clear_aux_losses_tracker()
    bar = tqdm(range(first_step, args.steps + 1), desc=f"train {args.preset}", initial=first_step - 1, total=args.steps,
               disable=not (args.progress and is_logger), dynamic_ncols=True)
    timeline = None
    for step in bar:
        config.apply_token_schedules(consumed_tokens=(step - 1) * tokens_per_step, total_tokens=total_tokens)
        for chunk in chunks:
            chunk.zero_grad_buffer()
        optimizer.zero_grad(set_to_none=True)
        record_this_step = step == args.steps and args.pipeline_schedule != "none"
        with record_timeline() if record_this_step else contextlib.nullcontext() as recorder:
            losses = forward_backward(
                forward_step_func=forward_step,
                data_iterator=data_iterator,
                model=chunks,
                num_microbatches=args.num_microbatches,
                seq_length=config.seq_length,
                micro_batch_size=args.micro_batch_size,
            )
        if recorder is not None:
            timeline = recorder.timeline(pipeline_group)
        for p in params:  # Megatron DDP accumulates into main_grad
            p.grad = p.main_grad
        grad_norm = clip_grad_norm_(params, args.clip_grad, parallel_state.get_model_parallel_group(), norm_params)
        optimizer.step()
        scheduler.step(1)
        if ema is not None:
            ema.update()
        record = {
            "step": step,
            "lr": optimizer.param_groups[0]["lr"],
            "gamma": config.moe_router_bias_update_rate,
            "mtp_lambda": config.mtp_loss_scaling_factor,
            "grad_norm": grad_norm,
            **step_metrics(losses, config, chunks, args.num_microbatches, pipeline_group,
                           parallel_state.get_data_parallel_group()),
        }
        if is_logger:
            log.write(record)
            bar.set_postfix(lm=f"{record['lm_loss']:.3f}", mtp=f"{record.get('mtp_loss', 0):.3f}", maxvio=f"{record['max_violation'] or 0:.3f}")
        if args.save_interval and step % args.save_interval == 0:
            checkpoint.save(checkpoints, state, {"step": step, "consumed_samples": step * global_batch,
                                                 "consumed_tokens": step * tokens_per_step}, run_settings)
    bar.close()
    if ema is not None:
        ema.wait()
    if not is_logger:
        return None
    log.close()
    plot_losses(log.records, run_dir / "loss.png")
    plot_expert_load(log.records, run_dir / "expert_load.png")
    if timeline is not None:
        plot_timeline(timeline, run_dir / "pipeline_timeline.png",
                      title=f"{args.pipeline_schedule}, P={args.pipeline_size}, step {args.steps}: measured, bubble "
                            f"{timeline.bubble():.2f} s of {timeline.makespan():.2f} s")
    return summarize(log.records)


def summarize(records: list[dict]) -> dict:
    """First vs final LM loss, and MaxVio over the first vs the last 10% of steps."""
    tenth = max(1, len(records) // 10)
    def mean(key, rows):
        values = [r[key] for r in rows if r.get(key) is not None]
        return sum(values) / len(values) if values else None
    return {
        "steps": len(records),
        "first_lm_loss": records[0]["lm_loss"],
        "final_lm_loss": mean("lm_loss", records[-tenth:]),
        "max_violation_first_10pct": mean("max_violation", records[:tenth]),
        "max_violation_last_10pct": mean("max_violation", records[-tenth:]),
    }
