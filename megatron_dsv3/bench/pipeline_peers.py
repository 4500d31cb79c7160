"""pipeline --peers: measured step time of three pipeline schedules on P CPU processes.

Design note
-----------
What runs. P processes (gloo, one thread each: they share the host's cores) build the
`tiny` preset without MTP, 2P decoder layers (one per DualPipeV stage), and time one global
batch of M micro-batches (forward + backward, no optimizer step) under
  ours_dualpipev    the registry's DualPipeV executor over `layout.dualpipev_chunks` (2P stages
                    in a V: rank r holds stages r and 2P-1-r);
  torch_dualpipev   torch.distributed.pipelining's `ScheduleDualPipeV`, the same 2P stages
                    on the same ranks;
  torch_1f1b        torch's `Schedule1F1B`, P stages: rank r holds stages 2r and 2r+1 of
                    the same split, run one after the other.
Every stage is a chunk built by `dualpipev_chunks` from the same seed, so all three start
from the weights of one single-process model, and all read the same M micro-batches.
MTP is off: the MTP block (with the head, last stage) uses the embedding of the first
stage. Our DualPipeV shares that module on rank 0 (layout.py); in torch's 1F1B the two
stages are on different ranks, and torch's stages have no way to share a module.

Torch's stages. `_TorchStage` wraps one or two chunks as an nn.Module with one tensor in
and one out: token ids [b, s] -> hidden [s, b, h] (the stage with the embedding), hidden ->
hidden (Megatron's `set_input_tensor`: a GPTModel without `pre_process` ignores
`decoder_input=` and reads the tensor set on its decoder), and -> logits [b, s, V] (the
stage with the head; GPTModel returns logits when given no labels). torch's loss_fn is the
mean token cross-entropy of a micro-batch, what Megatron's loss (loss_mask all ones)
computes; torch then divides the gradients by M (`scale_grads`), Megatron divides each
micro-batch's loss by M. Megatron's forward_step also sets the MoE auxiliary-loss gradient
scale to 1/M, a process-wide setting; torch's runs set it back to 1, so the three produce
the same gradients, not just the same losses.

Timing. Each step starts and ends with a barrier of the pipeline group; its wall time is
the global batch's. The schedules take turns, one step each per round, so that a change in
the host's load falls on all three alike. The first `warmup_steps` rounds (at least one)
are not timed: in the first, Megatron's fused router functions are compiled (torch.compile,
once per process: whichever schedule runs first pays, seconds) and torch sets up its
stages' P2P. No optimizer runs, so every step computes the same thing; the first step's
loss (mean over tokens of the M micro-batches) and total gradient norm are reported per
schedule with their relative difference to ours. Gradients live in `param.grad` (no DDP for
any schedule) and are cleared before each step.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Callable

import torch
import torch.multiprocessing as mp
from megatron.core import parallel_state
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleDualPipeV

from megatron_dsv3 import cpu
from megatron_dsv3.config import preset
from megatron_dsv3.distributed import free_port, init_distributed, local_process_env, seed_everything
from megatron_dsv3.pipeline.registry import SCHEDULES
from megatron_dsv3.training.forward_step import forward_step, random_microbatches

DUALPIPEV = SCHEDULES["dualpipev"]

SCHEDULE_NAMES = ("ours_dualpipev", "torch_dualpipev", "torch_1f1b")


@dataclasses.dataclass(frozen=True)
class PeersSetup:
    """What to measure: P ranks, M micro-batches of micro_batch_size x seq_length tokens,
    warm-up and timed rounds; validated on construction (ValueError with the fix)."""

    num_ranks: int = 2
    num_microbatches: int = 8
    micro_batch_size: int = 2
    seq_length: int = 64
    warmup_steps: int = 2
    timed_steps: int = 5
    seed: int = 0

    def __post_init__(self):
        if self.num_ranks < 2:
            raise ValueError(f"num_ranks={self.num_ranks}: a pipeline needs at least 2 ranks. Fix: pass --peers-pp 2 or more.")
        if self.num_microbatches < 2 * self.num_ranks:
            raise ValueError(
                f"num_microbatches={self.num_microbatches}: torch's ScheduleDualPipeV needs at least one per stage "
                f"(2P = {2 * self.num_ranks}). Fix: pass --peers-microbatches {2 * self.num_ranks} or more."
            )
        for name in ("micro_batch_size", "seq_length", "timed_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be at least 1. Fix: pass a positive value.")
        if self.warmup_steps < 1:
            raise ValueError(
                f"warmup_steps={self.warmup_steps}: the first round compiles Megatron's fused functions and sets up "
                "torch's stages, seconds that are no step's. Fix: pass --peers-warmup 1 or more."
            )

    @property
    def num_layers(self) -> int:
        return 2 * self.num_ranks  # one decoder layer per DualPipeV stage


def run_peers(setup: PeersSetup) -> dict:
    """Spawn the P processes, time the three schedules; the "peers" JSON object.

    keys: P, microbatches, micro_batch_size, seq_length, num_layers, warmup_steps,
    timed_steps, threads_per_rank, schedules ({name: mean_step_s, median_step_s, step_s, first_step_loss,
    first_step_grad_norm, loss_rel_diff_vs_ours, grad_norm_rel_diff_vs_ours})."""
    port = free_port()
    queue = mp.get_context("spawn").SimpleQueue()
    print(f"peers: spawning {setup.num_ranks} gloo processes; each builds the three schedules, then runs "
          f"{setup.warmup_steps} warm-up and {setup.timed_steps} timed rounds of one step each", flush=True)
    mp.spawn(_worker, args=(setup, port, queue), nprocs=setup.num_ranks, join=True)
    schedules = queue.get()
    ours = schedules["ours_dualpipev"]
    for row in schedules.values():
        row["loss_rel_diff_vs_ours"] = abs(row["first_step_loss"] - ours["first_step_loss"]) / abs(ours["first_step_loss"])
        row["grad_norm_rel_diff_vs_ours"] = abs(row["first_step_grad_norm"] - ours["first_step_grad_norm"]) / ours["first_step_grad_norm"]
    return {
        "P": setup.num_ranks,
        "microbatches": setup.num_microbatches,
        "micro_batch_size": setup.micro_batch_size,
        "seq_length": setup.seq_length,
        "num_layers": setup.num_layers,
        "warmup_steps": setup.warmup_steps,
        "timed_steps": setup.timed_steps,
        "threads_per_rank": 1,
        "schedules": schedules,
    }


def format_peers(peers: dict) -> str:
    lines = [
        f"Pipeline schedules, measured: P={peers['P']} gloo processes (1 thread each), tiny preset without MTP, "
        f"{peers['num_layers']} layers, M={peers['microbatches']} micro-batches of {peers['micro_batch_size']}x{peers['seq_length']} tokens, "
        f"mean of {peers['timed_steps']} steps after {peers['warmup_steps']} warm-up",
        f"{'schedule':>16} | {'mean s':>8} {'median s':>8} | {'first loss':>10} {'rel diff':>8} | {'grad norm':>10} {'rel diff':>8}",
    ]
    for name, row in peers["schedules"].items():
        lines.append(
            f"{name:>16} | {row['mean_step_s']:>8.4f} {row['median_step_s']:>8.4f} | {row['first_step_loss']:>10.6f} {row['loss_rel_diff_vs_ours']:>8.1e} | "
            f"{row['first_step_grad_norm']:>10.6f} {row['grad_norm_rel_diff_vs_ours']:>8.1e}"
        )
    lines.append("rel diff: relative to ours_dualpipev (same weights, same data: they compute the same model)")
    return "\n".join(lines)


# -- in each of the P processes ----------------------------------------------------------


def _worker(rank: int, setup: PeersSetup, port: int, queue) -> None:
    local_process_env(rank, setup.num_ranks, port)
    torch.set_num_threads(1)
    init_distributed(setup.num_ranks, get_embedding_ranks=DUALPIPEV.get_embedding_ranks, backend="gloo")
    config = preset(
        "tiny", num_layers=setup.num_layers, seq_length=setup.seq_length, mtp_num_layers=None,
        pipeline_model_parallel_size=setup.num_ranks, pipeline_dtype=torch.float32,
    )
    cpu.enable(config)
    microbatches = random_microbatches(setup.seed, setup.num_microbatches, setup.micro_batch_size, setup.seq_length,
                                       config.vocab_size)
    group = parallel_state.get_pipeline_model_parallel_group()
    builders = {"ours_dualpipev": _ours_dualpipev, "torch_dualpipev": _torch_dualpipev, "torch_1f1b": _torch_1f1b}
    schedules = {name: builders[name](config, rank, setup, microbatches, group) for name in SCHEDULE_NAMES}
    results = _measure(schedules, setup, group, rank)
    if rank == 0:
        queue.put(results)
    torch.distributed.destroy_process_group()


@dataclasses.dataclass
class _Schedule:
    """One schedule on this rank: `step()` runs a global batch and returns its mean loss on
    the rank that computes the loss, else None; `modules` hold this rank's parameters."""

    step: Callable[[], float | None]
    modules: list[torch.nn.Module]

    def timed_step(self, group) -> tuple[float, float | None]:
        """(wall seconds of one step, between barriers of the pipeline group; its loss)."""
        for module in self.modules:
            module.zero_grad(set_to_none=True)
        torch.distributed.barrier(group)
        start = time.perf_counter()
        loss = self.step()
        torch.distributed.barrier(group)
        return time.perf_counter() - start, loss


def _measure(schedules: dict[str, _Schedule], setup: PeersSetup, group, rank: int) -> dict:
    """Rounds of one step of each schedule in turn, so that a change in the host's load
    falls on all of them alike; the first `warmup_steps` rounds are not timed. One row per
    schedule: mean_step_s, median_step_s, step_s, first_step_loss, first_step_grad_norm."""
    rows = {name: {"step_s": []} for name in schedules}
    num_rounds = setup.warmup_steps + setup.timed_steps
    for index in range(num_rounds):
        warmup = index < setup.warmup_steps
        for name, schedule in schedules.items():
            seconds, loss = schedule.timed_step(group)
            if index == 0:
                rows[name]["first_step_loss"] = _from_any_rank(loss, group)
                rows[name]["first_step_grad_norm"] = _grad_norm(schedule.modules, group)
            if not warmup:
                rows[name]["step_s"].append(seconds)
            if rank == 0:
                print(f"peers: round {index + 1}/{num_rounds} ({'warm-up' if warmup else 'timed'}) {name}: {seconds:.4f} s", flush=True)
    for row in rows.values():
        row["mean_step_s"] = statistics.mean(row["step_s"])
        row["median_step_s"] = statistics.median(row["step_s"])  # less moved by a busy host's spikes
    return rows


def _from_any_rank(value: float | None, group) -> float:
    """The value the one rank that has it holds, on every rank."""
    tensor = torch.tensor(0.0 if value is None else value, dtype=torch.float64)
    torch.distributed.all_reduce(tensor, group=group)
    return float(tensor)


def _grad_norm(modules: list[torch.nn.Module], group) -> float:
    """The L2 norm of all gradients of the model (each parameter lives on one rank)."""
    squares = sum(float(p.grad.double().pow(2).sum()) for m in modules for p in m.parameters() if p.grad is not None)
    return _from_any_rank(squares, group) ** 0.5


def _ours_dualpipev(config, rank: int, setup: PeersSetup, microbatches: list[dict], group):
    seed_everything(setup.seed)
    chunks = DUALPIPEV.build_chunks(config, rank, setup.num_ranks)

    def step():
        losses = DUALPIPEV.forward_backward_func(
            forward_step_func=forward_step, data_iterator=iter(microbatches), model=chunks,
            num_microbatches=setup.num_microbatches, seq_length=setup.seq_length, micro_batch_size=setup.micro_batch_size,
        )
        if not losses:  # the loss dicts are returned on Megatron's last pipeline stage only
            return None
        total = torch.stack([d["lm loss"] for d in losses]).sum(dim=0)
        return float(total[0] / total[1])

    return _Schedule(step, chunks)


class _TorchStage(torch.nn.Module):
    """Consecutive GPTModel chunks as one torch pipelining stage (the design note)."""

    def __init__(self, chunks):
        super().__init__()
        self.chunks = torch.nn.ModuleList(chunks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for chunk in self.chunks:
            if chunk.pre_process:
                position_ids = torch.arange(x.shape[1]).expand_as(x)
                x = chunk(x, position_ids, None)
            else:
                chunk.set_input_tensor(x)
                x = chunk(None, None, None)
        return x


def _token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """torch's loss_fn: the mean cross-entropy over a micro-batch's tokens."""
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())


def _torch_pipeline_stage(chunks, stage: int, num_stages: int, config, setup: PeersSetup, group) -> PipelineStage:
    """`chunks` as stage `stage` of `num_stages`, with example inputs and outputs given, so
    torch skips its shape inference. torch reads `requires_grad` from them too: a received
    activation gets a gradient only if its example requires one."""
    b, s, h = setup.micro_batch_size, setup.seq_length, config.hidden_size
    hidden = torch.empty(s, b, h, requires_grad=True)
    return PipelineStage(
        _TorchStage(chunks), stage, num_stages, torch.device("cpu"),
        input_args=torch.empty(b, s, dtype=torch.long) if stage == 0 else hidden,
        output_args=torch.empty(b, s, config.vocab_size, requires_grad=True) if stage == num_stages - 1 else hidden,
        group=group,
    )


def _torch_step(schedule, microbatches: list[dict], has_last_stage: bool):
    """torch's step over the pre-split micro-batches; the mean loss where the last stage is."""
    def step():
        MoEAuxLossAutoScaler.set_loss_scale(torch.ones(()))  # torch scales all gradients by 1/M (design note)
        losses = [] if has_last_stage else None
        schedule.step(arg_mbs=[(mb["tokens"],) for mb in microbatches], target_mbs=[mb["labels"] for mb in microbatches],
                      losses=losses, return_outputs=False)
        return float(torch.stack(losses).detach().mean()) if has_last_stage else None

    return step


def _torch_dualpipev(config, rank: int, setup: PeersSetup, microbatches: list[dict], group):
    num_stages = 2 * setup.num_ranks
    seed_everything(setup.seed)
    chunks = DUALPIPEV.build_chunks(config, rank, setup.num_ranks)
    stages = [_torch_pipeline_stage([chunk], stage, num_stages, config, setup, group)
              for chunk, stage in zip(chunks, (rank, num_stages - 1 - rank))]
    schedule = ScheduleDualPipeV(stages, n_microbatches=setup.num_microbatches, loss_fn=_token_loss)
    return _Schedule(_torch_step(schedule, microbatches, has_last_stage=rank == 0), chunks)


def _split_stage(config, setup: PeersSetup, stage: int):
    """Stage `stage` of the 2P-stage DualPipeV split, built as the rank holding it builds it."""
    p = setup.num_ranks
    holder, chunk = (stage, 0) if stage < p else (2 * p - 1 - stage, 1)
    seed_everything(setup.seed)
    return DUALPIPEV.build_chunks(config, holder, p)[chunk]


def _torch_1f1b(config, rank: int, setup: PeersSetup, microbatches: list[dict], group):
    chunks = [_split_stage(config, setup, stage) for stage in (2 * rank, 2 * rank + 1)]
    stage = _torch_pipeline_stage(chunks, rank, setup.num_ranks, config, setup, group)
    schedule = Schedule1F1B(stage, n_microbatches=setup.num_microbatches, loss_fn=_token_loss)
    return _Schedule(_torch_step(schedule, microbatches, has_last_stage=rank == setup.num_ranks - 1), chunks)
