"""A compact training loop for DeepSeek-V3-style Megatron models, on CPU now and GPU later.

One process here (the pipeline issue makes it multi-rank). Per step it applies the gamma and
lambda token schedules, runs the forward/backward schedule over the micro-batches (Megatron's
`finalize_model_grads` then syncs gradients and moves the expert biases), clips the gradient
at 1.0, steps AdamW (PAPER.md §7 betas and weight decay) with warm-up plus cosine LR, and logs
LM loss, MTP loss, the sequence-wise balance loss and MaxVio to `metrics.jsonl`.
"""

from __future__ import annotations

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
from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper
from tqdm import tqdm

from megatron_dsv3 import cpu
from megatron_dsv3.config import ConfigError, check_runtime, moe_layer_pattern, preset
from megatron_dsv3.pipeline.no_pipelining import forward_backward_no_pipelining
from megatron_dsv3.routing import expert_load, finalize_model_grads_with_load
from megatron_dsv3.specs import gpt_model
from megatron_dsv3.training.data import build_datasets
from megatron_dsv3.training.monitor import MetricsLog, plot_expert_load, plot_losses
from megatron_dsv3.training.optimizer import AdamWLowPrecisionMoments


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

    def __post_init__(self):
        for name in ("steps", "micro_batch_size", "num_microbatches"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be at least 1. Fix: pass a positive value.")
        if not 0 <= self.warmup_steps < self.steps:
            raise ValueError(f"warmup_steps={self.warmup_steps}: must be in [0, steps={self.steps}). Fix: shorten the warm-up.")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"min_lr={self.min_lr}: must be in [0, lr={self.lr}]. Fix: lower min_lr.")


def init_distributed() -> None:
    """Join torchrun's process group, or make a one-process gloo group; then Megatron's groups."""
    if not torch.distributed.is_initialized():
        if "RANK" not in os.environ:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1")
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel()


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


def clip_grad_norm_(params: list[torch.nn.Parameter], max_norm: float, group) -> float:
    """Total L2 norm over `group` (params are disjoint across its ranks), then scale to max_norm."""
    grads = [p.grad for p in params if p.grad is not None]
    squares = torch.stack([g.detach().float().pow(2).sum() for g in grads]).sum()
    torch.distributed.all_reduce(squares, group=group)
    total = float(squares.sqrt())
    if total > max_norm:
        for g in grads:
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


def step_metrics(losses: list[dict], config, model_chunks, num_microbatches: int) -> dict:
    """LM, MTP and sequence-balance losses of the step just run, and each MoE layer's load."""
    lm = torch.stack([d["lm loss"] for d in losses]).sum(dim=0)
    record = {"lm_loss": float(lm[0] / lm[1])}
    tracker = MTPLossLoggingHelper.tracker
    if "loss_values" in tracker:
        # one mean loss per micro-batch and depth was accumulated
        record["mtp_loss"] = float(tracker["loss_values"].sum() / (num_microbatches * config.mtp_num_layers))
        MTPLossLoggingHelper.clean_metrics_in_tracker()
    moe = get_moe_layer_wise_logging_tracker()
    if "seq_load_balancing_loss" in moe:
        # recorded as sum_i f_i P_i per layer and micro-batch; report alpha * mean over layers
        moe_layers = sum(moe_layer_pattern(config)) + (config.mtp_num_layers or 0)
        values = moe["seq_load_balancing_loss"]["values"]
        record["seq_balance_loss"] = float(values.sum() / num_microbatches / moe_layers * config.moe_aux_loss_coeff)
    clear_aux_losses_tracker()
    loads = expert_load(model_chunks)
    record["expert_load"] = {
        l.name: {"tokens_per_expert": l.tokens_per_expert, "max_violation": l.max_violation} for l in loads
    }
    record["max_violation"] = sum(l.max_violation for l in loads) / len(loads) if loads else None
    return record


def train(args: TrainArgs) -> dict:
    config = preset(args.preset, **args.overrides)
    if config.bf16 or config.fp16 or config.params_dtype != torch.float32:
        raise ConfigError(
            "params_dtype", config.params_dtype,
            "the compact loop keeps FP32 master weights and has no mixed-precision wrapper (Float16Module)",
            "train with params_dtype=float32, bf16=False (use --bf16-moments for BF16 optimizer state, "
            "fp8_blockwise for FP8 GEMMs)",
        )
    for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "expert_model_parallel_size", "context_parallel_size"):
        if getattr(config, name) != 1:
            raise ValueError(
                f"{name}={getattr(config, name)}: the compact loop runs data parallelism only for now "
                f"(its gradient clipping assumes disjoint parameters). Fix: set {name}=1, or launch "
                "examples/ through Megatron-LM."
            )
    init_distributed()
    on_cpu = cpu.enable(config)
    if not on_cpu:
        check_runtime(config, "cuda")
    seed_everything(args.seed)
    device = torch.device("cuda", torch.cuda.current_device()) if not on_cpu else torch.device("cpu")
    run_dir = Path(args.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)

    model = gpt_model(config).to(device)
    ddp_model = DistributedDataParallel(
        config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model
    )
    config.no_sync_func = ddp_model.no_sync
    config.finalize_model_grads_func = finalize_model_grads_with_load

    param_groups = decay_param_groups(ddp_model, args.weight_decay)
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

    dp_size = parallel_state.get_data_parallel_world_size()
    global_batch = args.micro_batch_size * args.num_microbatches * dp_size
    train_set, _ = build_datasets(
        run_dir.parent / ".corpus-cache", config.seq_length, args.steps * global_batch, global_batch, args.seed, args.corpus_bytes
    )
    sampler = torch.utils.data.DistributedSampler(
        train_set, num_replicas=dp_size, rank=parallel_state.get_data_parallel_rank(), shuffle=False
    )
    data_iterator = infinite(torch.utils.data.DataLoader(train_set, batch_size=args.micro_batch_size, sampler=sampler))

    tokens_per_step = global_batch * config.seq_length
    total_tokens = args.steps * tokens_per_step
    log = MetricsLog(run_dir)
    resolved = {f.name: repr(getattr(config, f.name)) for f in dataclasses.fields(config)}
    (run_dir / "config.json").write_text(json.dumps(
        {"train": {k: str(v) for k, v in dataclasses.asdict(args).items()}, "model": resolved}, indent=2
    ))
    params = [p for p in ddp_model.parameters() if p.requires_grad]
    MTPLossLoggingHelper.tracker.clear()  # process-global and sized by the first model that logs
    clear_aux_losses_tracker()
    bar = tqdm(range(1, args.steps + 1), desc=f"train {args.preset}", disable=not args.progress, dynamic_ncols=True)
    for step in bar:
        config.apply_token_schedules(consumed_tokens=(step - 1) * tokens_per_step, total_tokens=total_tokens)
        ddp_model.zero_grad_buffer()
        optimizer.zero_grad(set_to_none=True)
        losses = forward_backward_no_pipelining(
            forward_step_func=forward_step,
            data_iterator=data_iterator,
            model=[ddp_model],
            num_microbatches=args.num_microbatches,
            seq_length=config.seq_length,
            micro_batch_size=args.micro_batch_size,
        )
        for p in params:  # Megatron DDP accumulates into main_grad
            p.grad = p.main_grad
        grad_norm = clip_grad_norm_(params, args.clip_grad, parallel_state.get_model_parallel_group())
        optimizer.step()
        scheduler.step(1)
        record = {
            "step": step,
            "lr": optimizer.param_groups[0]["lr"],
            "gamma": config.moe_router_bias_update_rate,
            "mtp_lambda": config.mtp_loss_scaling_factor,
            "grad_norm": grad_norm,
            **step_metrics(losses, config, [ddp_model], args.num_microbatches),
        }
        log.write(record)
        bar.set_postfix(lm=f"{record['lm_loss']:.3f}", mtp=f"{record.get('mtp_loss', 0):.3f}", maxvio=f"{record['max_violation'] or 0:.3f}")
    bar.close()

    plot_losses(log.records, run_dir / "loss.png")
    plot_expert_load(log.records, run_dir / "expert_load.png")
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
